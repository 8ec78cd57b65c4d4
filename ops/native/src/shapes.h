// Output shapes of the standard ops the kernels invoke on decoded weights (an invoked op writes
// into tensors its caller allocates), following the ONNX operator definitions.
#pragma once

#include <string>
#include <vector>

#include "common.h"

namespace onnxvq {

// numpy matmul of shapes a @ b (1-D operands promoted and their axis dropped).
std::vector<int64_t> MatMulShape(std::vector<int64_t> a, std::vector<int64_t> b);

struct ConvAttributes {
  std::string auto_pad = "NOTSET";
  std::vector<int64_t> dilations, kernel_shape, pads, strides, output_padding, output_shape;
  int64_t group = 1;
  void Read(const Ort::ConstKernelInfo& info);
};

// Conv's Y shape for input x and weight w (O, I/g, k...).
std::vector<int64_t> ConvShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const ConvAttributes& a);
// ConvTranspose's Y shape for input x and weight w (I, O/g, k...).
std::vector<int64_t> ConvTransposeShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                        const ConvAttributes& a);

}  // namespace onnxvq
