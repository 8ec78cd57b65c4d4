#include "shapes.h"

#include <algorithm>

namespace onnxvq {

std::vector<int64_t> MatMulShape(std::vector<int64_t> a, std::vector<int64_t> b) {
  const bool a_vector = a.size() == 1, b_vector = b.size() == 1;
  if (a_vector) a.insert(a.begin(), 1);
  if (b_vector) b.push_back(1);
  if (a.back() != b[b.size() - 2]) Fail("onnxvq: MatMul operands do not agree on K");
  std::vector<int64_t> batch_a(a.begin(), a.end() - 2), batch_b(b.begin(), b.end() - 2);
  size_t rank = std::max(batch_a.size(), batch_b.size());
  batch_a.insert(batch_a.begin(), rank - batch_a.size(), 1);
  batch_b.insert(batch_b.begin(), rank - batch_b.size(), 1);
  std::vector<int64_t> out;
  for (size_t i = 0; i < rank; ++i) {
    if (batch_a[i] != batch_b[i] && batch_a[i] != 1 && batch_b[i] != 1) Fail("onnxvq: MatMul batch axes do not broadcast");
    out.push_back(batch_a[i] == 1 ? batch_b[i] : batch_a[i]);
  }
  if (!a_vector) out.push_back(a[a.size() - 2]);
  if (!b_vector) out.push_back(b.back());
  return out;
}

void ConvAttributes::Read(const Ort::ConstKernelInfo& info) {
  auto_pad = StringAttr(info, "auto_pad", "NOTSET");
  dilations = IntsAttr(info, "dilations");
  kernel_shape = IntsAttr(info, "kernel_shape");
  pads = IntsAttr(info, "pads");
  strides = IntsAttr(info, "strides");
  output_padding = IntsAttr(info, "output_padding");
  output_shape = IntsAttr(info, "output_shape");
  group = IntAttr(info, "group", 1);
}

namespace {

int64_t At(const std::vector<int64_t>& values, size_t i, int64_t fallback) {
  return i < values.size() ? values[i] : fallback;
}

}  // namespace

std::vector<int64_t> ConvShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const ConvAttributes& a) {
  const size_t spatial = x.size() - 2;
  std::vector<int64_t> out = {x[0], w[0]};
  for (size_t i = 0; i < spatial; ++i) {
    const int64_t in = x[2 + i], k = At(a.kernel_shape, i, w[2 + i]);
    const int64_t stride = At(a.strides, i, 1), dilation = At(a.dilations, i, 1);
    const int64_t extent = dilation * (k - 1) + 1;
    int64_t size;
    if (a.auto_pad == "SAME_UPPER" || a.auto_pad == "SAME_LOWER") {
      size = (in + stride - 1) / stride;
    } else if (a.auto_pad == "VALID") {
      size = (in - extent) / stride + 1;
    } else {
      const int64_t pad = At(a.pads, i, 0) + At(a.pads, i + spatial, 0);
      size = (in + pad - extent) / stride + 1;
    }
    out.push_back(size);
  }
  return out;
}

std::vector<int64_t> ConvTransposeShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                        const ConvAttributes& a) {
  const size_t spatial = x.size() - 2;
  std::vector<int64_t> out = {x[0], w[1] * a.group};
  for (size_t i = 0; i < spatial; ++i) {
    if (!a.output_shape.empty()) {
      // output_shape may list the spatial sizes only, or every axis.
      out.push_back(a.output_shape.size() == spatial ? a.output_shape[i] : a.output_shape[2 + i]);
      continue;
    }
    const int64_t in = x[2 + i], k = At(a.kernel_shape, i, w[2 + i]);
    const int64_t stride = At(a.strides, i, 1), dilation = At(a.dilations, i, 1);
    if (a.auto_pad == "SAME_UPPER" || a.auto_pad == "SAME_LOWER") {
      out.push_back(in * stride);
      continue;
    }
    int64_t pad = 0;
    if (a.auto_pad != "VALID") pad = At(a.pads, i, 0) + At(a.pads, i + spatial, 0);
    out.push_back(stride * (in - 1) + At(a.output_padding, i, 0) + (k - 1) * dilation + 1 - pad);
  }
  return out;
}

}  // namespace onnxvq
