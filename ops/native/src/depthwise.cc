// Depthwise 2-D convolution: see depthwise.h.
//
// Each task computes one or more output planes. For each it first copies the input plane,
// zero-padded, into scratch, split by column phase modulo the stride (phase p holds padded
// columns p, p + sx, ...), so that for every window offset (ky, kx) the inputs of consecutive
// outputs are consecutive floats. Outputs are then computed kBlock at a time, the block's sums held in registers over
// the kh * kw window: one contiguous load and one multiply-add per window tap and vector.
#include "depthwise.h"

#include <algorithm>
#include <cstring>

#include "matmul.h"  // ParallelFor

namespace onnxvq {
namespace {

// Sums are held in GCC/Clang vector types, which compile to the widest registers -march allows
// (written out because the compiler does not keep a plain float array's sums in registers across
// the window loops). Outputs per block of one row: kVecs vectors of 16, 4 AVX2 or 2 AVX-512
// registers.
typedef float Vec __attribute__((vector_size(64)));
typedef float UnalignedVec __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kVecs = 2;
constexpr int64_t kBlock = kVecs * 16;

int64_t At(const std::vector<int64_t>& values, size_t i, int64_t fallback) {
  return i < values.size() ? values[i] : fallback;
}

// Output rows computed together: each row's kVecs sums are independent chains of multiply-adds,
// and the FMA units need about 8 in flight (4 cycles of latency, 2 per cycle) to be kept busy; with
// 16 AVX2 registers (a Vec takes two) only 2 rows fit.
// (The remainder of a plane's rows runs 2 and then 1 at a time.)
#if defined(__AVX512F__)
constexpr int64_t kRows = 4;
#else
constexpr int64_t kRows = 2;
#endif

// What SumRows needs of a plane's layout.
struct Geometry {
  int64_t taps;            // kh * kw
  const int64_t* offsets;  // per tap, its read offset in the padded plane (DepthwiseConv2D)
  int64_t row_step;        // padded floats between consecutive output rows (sy * phase_w)
  int64_t blocks;          // kBlock-wide blocks per output row
  int64_t out_w;
};

// Output rows i .. i + Rows - 1 of one plane: out[r][j] = b + sum_t taps[t] * p[(i + r) * row_step + j + offsets[t]].
template <int64_t Rows>
void SumRows(const float* p, int64_t i, const float* taps, float b, const Geometry& g, float* out) {
  for (int64_t blk = 0; blk < g.blocks; ++blk) {
    const int64_t j0 = blk * kBlock;
    Vec acc[Rows][kVecs];
    for (int64_t r = 0; r < Rows; ++r)
      for (int64_t v = 0; v < kVecs; ++v) acc[r][v] = Vec{} + b;
    const float* base = p + i * g.row_step + j0;
    for (int64_t t = 0; t < g.taps; ++t) {
      const float tap = taps[t];
      const float* at = base + g.offsets[t];
      for (int64_t r = 0; r < Rows; ++r) {
        const UnalignedVec* s = reinterpret_cast<const UnalignedVec*>(at + r * g.row_step);
        for (int64_t v = 0; v < kVecs; ++v) acc[r][v] += tap * s[v];
      }
    }
    const int64_t count = std::min(kBlock, g.out_w - j0);
    for (int64_t r = 0; r < Rows; ++r)
      std::memcpy(out + (i + r) * g.out_w + j0, static_cast<const void*>(acc[r]), sizeof(float) * static_cast<size_t>(count));
  }
}

// Leading pad of spatial axis i (0 = rows, 1 = columns), following Conv's auto_pad.
int64_t LeadingPad(const ConvAttributes& a, size_t i, int64_t in, int64_t out, int64_t k) {
  const int64_t stride = At(a.strides, i, 1), dilation = At(a.dilations, i, 1);
  if (a.auto_pad == "SAME_UPPER" || a.auto_pad == "SAME_LOWER") {
    const int64_t total = std::max<int64_t>(0, (out - 1) * stride + dilation * (k - 1) + 1 - in);
    return a.auto_pad == "SAME_UPPER" ? total / 2 : total - total / 2;
  }
  if (a.auto_pad == "VALID") return 0;
  return At(a.pads, i, 0);
}

}  // namespace

bool IsDepthwiseConv2D(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const ConvAttributes& a) {
  return x.size() == 4 && w.size() == 4 && w[1] == 1 && a.group == x[1] && a.group > 1 && w[0] % a.group == 0;
}

void DepthwiseConv2D(const float* x, const std::vector<int64_t>& x_shape, const float* w,
                     const std::vector<int64_t>& w_shape, const float* bias, const ConvAttributes& a,
                     float* y, const std::vector<int64_t>& y_shape, const Ort::KernelContext& context) {
  const int64_t batch = x_shape[0], c_in = x_shape[1], in_h = x_shape[2], in_w = x_shape[3];
  const int64_t c_out = w_shape[0], kh = w_shape[2], kw = w_shape[3], multiplier = c_out / c_in;
  const int64_t out_h = y_shape[2], out_w = y_shape[3];
  const int64_t sy = At(a.strides, 0, 1), sx = At(a.strides, 1, 1);
  const int64_t dy = At(a.dilations, 0, 1), dx = At(a.dilations, 1, 1);
  const int64_t pad_top = LeadingPad(a, 0, in_h, out_h, kh), pad_left = LeadingPad(a, 1, in_w, out_w, kw);
  if (out_h <= 0 || out_w <= 0) return;

  // The padded plane: rows every output row reads, and for each column phase the columns that
  // every block of outputs (out_w rounded up to kBlock) reads.
  const int64_t blocks = (out_w + kBlock - 1) / kBlock;
  const int64_t padded_h = (out_h - 1) * sy + (kh - 1) * dy + 1;
  const int64_t phase_w = blocks * kBlock + ((kw - 1) * dx) / sx + 1;
  const int64_t plane_floats = sx * padded_h * phase_w;

  // Where tap (ky, kx) of output (i, j) reads in the padded plane, relative to row i * sy and
  // column j: padded column j * sx + kx * dx is phase kx*dx % sx, index j + kx*dx / sx.
  std::vector<int64_t> offsets(static_cast<size_t>(kh * kw));
  for (int64_t ky = 0; ky < kh; ++ky) {
    for (int64_t kx = 0; kx < kw; ++kx) {
      const int64_t c = kx * dx;
      offsets[static_cast<size_t>(ky * kw + kx)] = ((c % sx) * padded_h + ky * dy) * phase_w + c / sx;
    }
  }

  const Geometry geometry{kh * kw, offsets.data(), sy * phase_w, blocks, out_w};

  // One output plane (n, o): its input plane copied zero-padded into p, then the sums.
  auto compute_plane = [&](int64_t plane, float* p) {
    const int64_t n = plane / c_out, o = plane % c_out;
    const float* in = x + (n * c_in + o / multiplier) * in_h * in_w;
    std::memset(p, 0, sizeof(float) * static_cast<size_t>(plane_floats));
    for (int64_t r = 0; r < padded_h; ++r) {
      const int64_t src_r = r - pad_top;
      if (src_r < 0 || src_r >= in_h) continue;
      const float* src = in + src_r * in_w;
      // Padded column c = source column c - pad_left, stored at phase c % sx, index c / sx.
      const int64_t c0 = std::max<int64_t>(0, pad_left), c1 = std::min(pad_left + in_w, sx * phase_w);
      if (sx == 1) {
        if (c1 > c0) std::memcpy(p + r * phase_w + c0, src + c0 - pad_left, sizeof(float) * static_cast<size_t>(c1 - c0));
        continue;
      }
      for (int64_t c = c0; c < c1; ++c) p[((c % sx) * padded_h + r) * phase_w + c / sx] = src[c - pad_left];
    }

    const float* taps = w + o * kh * kw;
    const float b = bias != nullptr ? bias[o] : 0.0f;
    float* out = y + plane * out_h * out_w;
    int64_t i = 0;
    for (; i + kRows <= out_h; i += kRows) SumRows<kRows>(p, i, taps, b, geometry, out);
    if (out_h - i >= 2) {
      SumRows<2>(p, i, taps, b, geometry, out);
      i += 2;
    }
    if (i < out_h) SumRows<1>(p, i, taps, b, geometry, out);
  };

  // Planes per task: at least ~64K multiply-adds each, so that small planes (a classifier's 2 x 96
  // maps, thousands of them at batch 32) do not pay a task and a scratch buffer each.
  const int64_t plane_work = out_h * out_w * kh * kw, planes = batch * c_out;
  const int64_t per_task = std::min(planes, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, plane_work)));
  ParallelFor(context, static_cast<size_t>((planes + per_task - 1) / per_task), 0, [&](size_t task) {
    Scratch padded(static_cast<size_t>(plane_floats));
    const int64_t first = static_cast<int64_t>(task) * per_task, last = std::min(planes, first + per_task);
    for (int64_t plane = first; plane < last; ++plane) compute_plane(plane, padded.data());
  });
}

}  // namespace onnxvq
