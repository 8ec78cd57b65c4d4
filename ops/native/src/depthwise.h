// Depthwise 2-D convolution (every group reads one input channel) on a decoded weight.
//
// onnxruntime's plain Conv kernel runs a grouped convolution as one im2col and one small GEMM per
// group, which for a depthwise layer (C groups of 1 channel, a 3x3..7x7 window) is about ten
// times slower than the direct loop below; in an fp32 model the layer is rewritten into
// onnxruntime's blocked NCHWc kernels instead, which a custom op cannot reach. So VQConv runs
// depthwise layers here and every other convolution through the standard Conv.
#pragma once

#include "common.h"
#include "shapes.h"

namespace onnxvq {

// Whether DepthwiseConv2D computes Conv for input shape x, weight shape w and these attributes:
// 4-D input, w = (C_out, 1, kh, kw), group = C_in = a divisor of C_out.
bool IsDepthwiseConv2D(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const ConvAttributes& a);

// y = Conv(x, w, bias) for a depthwise layer (IsDepthwiseConv2D), y of shape y_shape (ConvShape):
//   y[n, o, i, j] = bias[o] + sum_{ky, kx} w[o, 0, ky, kx] * x[n, o / m, i*sy + ky*dy - pt, j*sx + kx*dx - pl]
// with m = C_out / C_in and x zero outside the image; (pt, pl) the leading pads (explicit, or
// auto_pad's SAME_UPPER / SAME_LOWER split). `bias` may be null. Planes run on the session's threads.
void DepthwiseConv2D(const float* x, const std::vector<int64_t>& x_shape, const float* w,
                     const std::vector<int64_t>& w_shape, const float* bias, const ConvAttributes& a,
                     float* y, const std::vector<int64_t>& y_shape, const Ort::KernelContext& context);

}  // namespace onnxvq
