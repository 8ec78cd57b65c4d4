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

namespace {

// T_j (k x rows) = C' (k x d) @ X_j (d x rows) for position j, X the pass's activation rows
// transposed (cols x rows), so the innermost loop runs over the rows (vectorised).
void BuildTable(const float* __restrict cw, int64_t k, int64_t d, const float* __restrict xt, int64_t rows,
                int64_t start, int64_t len, float* __restrict table) {
  if (rows == 1) {  // batch 1: a dot product per codeword
    const float* __restrict x = xt + start;
    for (int64_t c = 0; c < k; ++c) {
      const float* __restrict word = cw + c * d;
      float s = 0.0f;
      for (int64_t t = 0; t < len; ++t) s += word[t] * x[t];
      table[c] = s;
    }
    return;
  }
  float sums[kRowsPerPass];  // local, so the compiler keeps them in registers (no aliasing)
  for (int64_t c = 0; c < k; ++c) {
    for (int64_t i = 0; i < rows; ++i) sums[i] = 0.0f;
    const float* __restrict word = cw + c * d;
    for (int64_t t = 0; t < len; ++t) {
      const float weight = word[t];
      const float* __restrict x = xt + (start + t) * rows;
      for (int64_t i = 0; i < rows; ++i) sums[i] += weight * x[i];
    }
    float* __restrict out = table + c * rows;
    for (int64_t i = 0; i < rows; ++i) out[i] = sums[i];
  }
}

// acc[n][i] += sum_{j0 <= j < j1} T_j[Q[n, j]][i] for outputs n0..n1.
template <int Bits>
void Accumulate(const EncodedWeight& w, const float* table, int64_t j0, int64_t j1, int64_t rows, int64_t n0,
                int64_t n1, float* acc) {
  const int64_t k = w.k(), stride = k * rows;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q8 = Bits == 16 ? nullptr : w.codes8_row(n);
    const uint16_t* q16 = Bits == 16 ? w.codes16_row(n) : nullptr;
    auto code = [&](int64_t j) -> int64_t {
      if (Bits == 4) return (j & 1) ? (q8[j >> 1] >> 4) : (q8[j >> 1] & 0x0F);
      if (Bits == 8) return q8[j];
      return q16[j];
    };
    float* out = acc + n * rows;
    if (rows == 1) {  // batch 1: four independent sums hide the gathers' latency
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4) {
        for (int u = 0; u < 4; ++u) s[u] += table[(j + u - j0) * stride + code(j + u)];
      }
      for (; j < j1; ++j) s[0] += table[(j - j0) * stride + code(j)];
      out[0] += (s[0] + s[1]) + (s[2] + s[3]);
      continue;
    }
    for (int64_t j = j0; j < j1; ++j) {
      const float* entry = table + (j - j0) * stride + code(j) * rows;
      for (int64_t i = 0; i < rows; ++i) out[i] += entry[i];
    }
  }
}

}  // namespace

// For activation rows a_i and position j: T[j][c][i] = a_i[jd : jd + d] . C'[c] (the last
// position's tail only), then Y[i][n] = scale[n] * sum_j T[j][Q[n, j]][i]: per output and
// subvector one table read instead of d multiply-adds, and 1 to 2 bytes of codes read instead of
// 4d bytes of weights.
void EncodedMatMul::RunLookupTables(const EncodedWeight& w, const float* a, int64_t m, float* y,
                                    const Ort::KernelContext& context) const {
  const int64_t n_out = w.rows(), cols = w.cols(), d = w.d(), k = w.k(), n_sub = w.n_sub();
  const float* cw = w.codewords();
  const float* scales = w.scales();
  for (int64_t i0 = 0; i0 < m; i0 += kRowsPerPass) {
    const int64_t rows = std::min(kRowsPerPass, m - i0);
    const int64_t per_position = k * rows;
    const int64_t block = std::max<int64_t>(1, kTableBytes / (per_position * static_cast<int64_t>(sizeof(float))));
    Scratch xt(static_cast<size_t>(cols * rows));
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < cols; ++c) xt.data()[c * rows + i] = a[(i0 + i) * cols + c];
    Scratch table(static_cast<size_t>(std::min(block, n_sub) * per_position));
    Scratch acc(static_cast<size_t>(n_out * rows));
    std::fill(acc.data(), acc.data() + n_out * rows, 0.0f);
    for (int64_t j0 = 0; j0 < n_sub; j0 += block) {
      const int64_t j1 = std::min(n_sub, j0 + block);
      float* t = table.data();
      ParallelFor(context, static_cast<size_t>(j1 - j0), 0, [&](size_t jj) {
        const int64_t j = j0 + static_cast<int64_t>(jj);
        BuildTable(cw, k, d, xt.data(), rows, j * d, std::min(d, cols - j * d), t + jj * per_position);
      });
      const int64_t chunk = 128;
      ParallelFor(context, static_cast<size_t>((n_out + chunk - 1) / chunk), 0, [&](size_t b) {
        const int64_t n0 = static_cast<int64_t>(b) * chunk, n1 = std::min(n_out, n0 + chunk);
        switch (w.code_bits()) {
          case 4: Accumulate<4>(w, t, j0, j1, rows, n0, n1, acc.data()); break;
          case 8: Accumulate<8>(w, t, j0, j1, rows, n0, n1, acc.data()); break;
          default: Accumulate<16>(w, t, j0, j1, rows, n0, n1, acc.data()); break;
        }
      });
    }
    for (int64_t i = 0; i < rows; ++i) {
      float* out = y + (i0 + i) * n_out;
      for (int64_t n = 0; n < n_out; ++n) out[n] = acc.data()[n * rows + i] * (scales != nullptr ? scales[n] : 1.0f);
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
