#include "matmul.h"

#include <algorithm>
#include <cstring>

namespace onnxvq {
namespace {

// Lookup tables of one block of subvector positions stay within this many bytes (L2-sized).
constexpr int64_t kTableBytes = 256 << 10;
// Activation rows per pass of the lookup-table path (the accumulators are N x this).
constexpr int64_t kRowsPerPass = 32;
// Decoded tile of the weight in the tiled path, in floats (4 MiB).
constexpr int64_t kTileFloats = 1 << 20;

}  // namespace

EncodedMatMul::EncodedMatMul(const Ort::ConstKernelInfo& info) {
  // An invoked op gets no attribute defaults: every one is set.
  OpAttributes attributes;
  attributes.SetInt("transA", 0);
  attributes.SetInt("transB", 1);
  attributes.SetFloat("alpha", 1.0f);
  attributes.SetFloat("beta", 1.0f);
  const char* type_names[] = {"T"};
  ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  gemm_ = Ort::Op::Create(info, "Gemm", "", 13, type_names, types, 1, attributes.values().data(),
                          attributes.values().size(), 2, 1);
}

bool EncodedMatMul::UsesLookupTables(const EncodedWeight& w) {
  // A table entry costs d multiply-adds per activation row and saves d per output row reading
  // it: worth it while the codebook is small against the outputs. Signs flip entries inside a
  // subvector, so sign-split weights are decoded instead.
  return !w.has_signs() && w.k() <= 4096 && w.k() <= 2 * w.rows();
}

void EncodedMatMul::Run(const EncodedWeight& w, const float* a, int64_t m, float* y,
                        const Ort::KernelContext& context) const {
  if (m == 0 || w.rows() == 0) return;
  if (w.cols() == 0) {
    std::fill(y, y + m * w.rows(), 0.0f);
    return;
  }
  if (UsesLookupTables(w)) {
    RunLookupTables(w, a, m, y, context);
  } else {
    RunTiles(w, a, m, y, context);
  }
}

// For activation rows a_i and position j: T[j][c][i] = a_i[jd : jd + d] . C'[c] (the last
// position's tail only), then Y[i][n] = scale[n] * sum_j T[j][Q[n, j]][i].
void EncodedMatMul::RunLookupTables(const EncodedWeight& w, const float* a, int64_t m, float* y,
                                    const Ort::KernelContext& context) const {
  const int64_t n_out = w.rows(), cols = w.cols(), d = w.d(), k = w.k(), n_sub = w.n_sub();
  const float* cw = w.codewords();
  const float* scales = w.scales();
  for (int64_t i0 = 0; i0 < m; i0 += kRowsPerPass) {
    const int64_t rows = std::min(kRowsPerPass, m - i0);
    const int64_t per_position = k * rows;
    const int64_t block = std::max<int64_t>(1, kTableBytes / (per_position * static_cast<int64_t>(sizeof(float))));
    Scratch table(static_cast<size_t>(std::min(block, n_sub) * per_position));
    Scratch acc(static_cast<size_t>(n_out * rows));
    std::fill(acc.data(), acc.data() + n_out * rows, 0.0f);
    for (int64_t j0 = 0; j0 < n_sub; j0 += block) {
      const int64_t j1 = std::min(n_sub, j0 + block);
      float* t = table.data();
      ParallelFor(context, static_cast<size_t>(j1 - j0), 0, [&](size_t jj) {
        const int64_t j = j0 + static_cast<int64_t>(jj);
        const int64_t start = j * d, len = std::min(d, cols - start);
        float* tj = t + jj * per_position;
        for (int64_t c = 0; c < k; ++c) {
          const float* word = cw + c * d;
          for (int64_t i = 0; i < rows; ++i) {
            const float* x = a + (i0 + i) * cols + start;
            float s = 0.0f;
            for (int64_t u = 0; u < len; ++u) s += x[u] * word[u];
            tj[c * rows + i] = s;
          }
        }
      });
      const int64_t chunk = 64;
      ParallelFor(context, static_cast<size_t>((n_out + chunk - 1) / chunk), 0, [&](size_t b) {
        const int64_t n0 = static_cast<int64_t>(b) * chunk, n1 = std::min(n_out, n0 + chunk);
        for (int64_t n = n0; n < n1; ++n) {
          float* out = acc.data() + n * rows;
          for (int64_t j = j0; j < j1; ++j) {
            const float* entry = t + (j - j0) * per_position + static_cast<int64_t>(w.Code(n, j)) * rows;
            for (int64_t i = 0; i < rows; ++i) out[i] += entry[i];
          }
        }
      });
    }
    for (int64_t n = 0; n < n_out; ++n) {
      const float s = scales != nullptr ? scales[n] : 1.0f;
      for (int64_t i = 0; i < rows; ++i) y[(i0 + i) * n_out + n] = acc.data()[n * rows + i] * s;
    }
  }
}

// Decodes tiles of output rows into a bounded buffer and multiplies each with the standard Gemm
// (onnxruntime's own, on the session's threads).
void EncodedMatMul::RunTiles(const EncodedWeight& w, const float* a, int64_t m, float* y,
                             const Ort::KernelContext& context) const {
  const int64_t n_out = w.rows(), cols = w.cols();
  const int64_t tile = std::max<int64_t>(16, std::min(n_out, kTileFloats / cols));
  Scratch decoded(static_cast<size_t>(std::min(tile, n_out) * cols));
  Scratch product(static_cast<size_t>(m * std::min(tile, n_out)));
  Ort::Value input = WrapFloats(const_cast<float*>(a), {m, cols});
  for (int64_t n0 = 0; n0 < n_out; n0 += tile) {
    const int64_t n1 = std::min(n_out, n0 + tile), width = n1 - n0;
    const int64_t rows_per_task = 16;
    ParallelFor(context, static_cast<size_t>((width + rows_per_task - 1) / rows_per_task), 0, [&](size_t b) {
      const int64_t r0 = n0 + static_cast<int64_t>(b) * rows_per_task, r1 = std::min(n1, r0 + rows_per_task);
      w.DecodeRows(r0, r1, decoded.data() + (r0 - n0) * cols);
    });
    Ort::Value weight = WrapFloats(decoded.data(), {width, cols});
    Ort::Value out = WrapFloats(product.data(), {m, width});
    const OrtValue* inputs[] = {input, weight};
    OrtValue* outputs[] = {out};
    gemm_.Invoke(context.GetOrtKernelContext(), inputs, 2, outputs, 1);
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(y + i * n_out + n0, product.data() + i * width, static_cast<size_t>(width) * sizeof(float));
    }
  }
}

}  // namespace onnxvq
