#include "matmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace onnxvq {
namespace {

// Lookup tables of one block of subvector positions stay within this many bytes: measured on a
// 4096 x 4096 MatMul (AMD EPYC, 32 KiB L1d, 1 MiB L2 per core), 128 KiB was fastest up to 16
// rows per pass and 64 KiB at 32 (where one position's table is already 32 KiB).
constexpr int64_t TableBytes(int64_t rows) { return rows >= 32 ? (64 << 10) : (128 << 10); }
// Activation rows per pass of the lookup-table path (the accumulators are N x this).
constexpr int64_t kRowsPerPass = 32;
// Up to this many passes of unequal sizes run one after the other, each spread over the threads:
// run side by side instead, two passes of 32 and 8 rows (a recognizer's 40 time steps) take as
// long on 2 threads as the first alone. Equal passes (64 rows: a 1024-wide encoder at 64 tokens
// runs 1.8x slower on 2 threads the other way, its tables rebuilt in many short parallel steps)
// and more passes than that run side by side, whole passes at a time.
constexpr int64_t kInnerParallelPasses = 4;
// Up to this many activation rows, the decoded path dots each decoded row at once (RunRowByRow;
// measured on sign-split weights: at 16 and 32 rows the tiles and onnxruntime's Gemm are faster).
constexpr int64_t kRowByRowRows = 4;
// Decoded tile of the weight in the tiled path, in floats (4 MiB).
constexpr int64_t kTileFloats = 1 << 20;

}  // namespace

EncodedMatMul::EncodedMatMul(const Ort::ConstKernelInfo& info) {
  // ONNXVQ_MATMUL_PATH=tables|tiles forces one path (tests and benchmarks compare them).
  const char* forced = std::getenv("ONNXVQ_MATMUL_PATH");
  if (forced != nullptr && std::strcmp(forced, "tables") == 0) forced_ = Path::kTables;
  if (forced != nullptr && std::strcmp(forced, "tiles") == 0) forced_ = Path::kTiles;
  // An invoked op gets no attribute defaults: every one is set.
  OpAttributes attributes;
  attributes.SetInt("transA", 0);
  attributes.SetInt("transB", 1);
  attributes.SetFloat("alpha", 1.0f);
  attributes.SetFloat("beta", 1.0f);
  gemm_ = CreateStandardOp(info, "Gemm", 13, attributes, 2, 1);
}

bool EncodedMatMul::UsesLookupTables(const EncodedWeight& w, int64_t m) {
  // Signs flip entries inside a subvector, so sign-split weights are always decoded.
  if (w.has_signs() || w.k() > 4096) return false;
  // Estimated cost of each path, in about one cycle per unit (fitted on 256 x 256 to 4096 x 4096
  // MatMuls, AVX2 on one core). The tables: per pass of up to 32 activation rows (padded to R =
  // 1, 8, 16 or 32), k * K * R multiply-adds to build, 16 per cycle in vectors (8 for R = 1,
  // vectors over codewords), and per output and subvector one table read: a scalar gather for
  // R = 1, else R / 8 vector adds at two a cycle. The tiles: a cycle per decoded weight and
  // onnxruntime's Gemm at about 32 multiply-adds a cycle. The tables win when the codebook is
  // small against the outputs.
  const double rows = static_cast<double>(m), k = static_cast<double>(w.k()), cols = static_cast<double>(w.cols());
  const double outputs = static_cast<double>(w.rows()), positions = static_cast<double>(w.n_sub());
  const double per_pass = std::min(rows, static_cast<double>(kRowsPerPass));
  const double r = per_pass <= 1 ? 1 : per_pass <= 8 ? 8 : per_pass <= 16 ? 16 : 32;
  const double passes = std::ceil(rows / static_cast<double>(kRowsPerPass));
  const double build = r == 1 ? k * cols / 8.0 : k * cols * r / 16.0;
  const double reads = r == 1 ? outputs * positions : outputs * positions * r / 16.0;
  const double tables = passes * (build + reads);
  const double tiles = outputs * cols + rows * outputs * cols / 32.0;
  return tables < tiles;
}

void EncodedMatMul::Run(const EncodedWeight& w, const float* a, int64_t m, float* y,
                        const Ort::KernelContext& context) const {
  if (m == 0 || w.rows() == 0) return;
  if (w.cols() == 0) {
    std::fill(y, y + m * w.rows(), 0.0f);
    return;
  }
  const bool tables = forced_ == Path::kAuto ? UsesLookupTables(w, m) : forced_ == Path::kTables && !w.has_signs();
  if (tables) {
    RunLookupTables(w, a, m, y, context);
  } else {
    RunTiles(w, a, m, y, context);
  }
}

namespace {

// Eight floats in a vector register (GCC/Clang vector extensions: AVX with -march=native,
// SSE pairs otherwise), loaded and stored unaligned.
typedef float V8 __attribute__((vector_size(32)));
typedef float V8u __attribute__((vector_size(32), aligned(4), may_alias));
inline V8 Load(const float* p) { return *reinterpret_cast<const V8u*>(p); }
inline void Store(float* p, V8 v) { *reinterpret_cast<V8u*>(p) = v; }
inline V8 Broadcast(float x) { return V8{x, x, x, x, x, x, x, x}; }

// T_j[c][i] = sum_t C'[c][jd + t] x_i[jd + t] for one position j (its `len` entries): a k x len
// by len x R product, xt the pass's rows transposed (cols x R). cwt is the codebook transposed
// (d x k). Four vector sums are in flight at a time (one chain would wait on each multiply-add's
// latency).
template <int R>
void BuildTable(const float* __restrict cwt, int64_t k, const float* __restrict xt, int64_t start, int64_t len,
                float* __restrict table) {
  if (R == 1) {  // vectors over eight codewords, 32 at a time
    const float* __restrict x = xt + start;
    int64_t c0 = 0;
    for (; c0 + 32 <= k; c0 += 32) {
      V8 sums[4] = {};
      for (int64_t t = 0; t < len; ++t) {
        const V8 xb = Broadcast(x[t]);
        for (int v = 0; v < 4; ++v) sums[v] += Load(cwt + t * k + c0 + 8 * v) * xb;
      }
      for (int v = 0; v < 4; ++v) Store(table + c0 + 8 * v, sums[v]);
    }
    for (; c0 < k; ++c0) {
      float sum = 0.0f;
      for (int64_t t = 0; t < len; ++t) sum += cwt[t * k + c0] * x[t];
      table[c0] = sum;
    }
    return;
  }
  constexpr int V = R >= 8 ? R / 8 : 1;     // vectors per table entry (R is 8, 16 or 32 here)
  constexpr int CB = V >= 4 ? 1 : 4 / V;    // codewords per step
  int64_t c0 = 0;
  for (; c0 + CB <= k; c0 += CB) {
    V8 sums[CB][V] = {};
    for (int64_t t = 0; t < len; ++t) {
      V8 x[V];
      for (int v = 0; v < V; ++v) x[v] = Load(xt + (start + t) * R + 8 * v);
      for (int cb = 0; cb < CB; ++cb) {
        const V8 weight = Broadcast(cwt[t * k + c0 + cb]);
        for (int v = 0; v < V; ++v) sums[cb][v] += weight * x[v];
      }
    }
    for (int cb = 0; cb < CB; ++cb)
      for (int v = 0; v < V; ++v) Store(table + (c0 + cb) * R + 8 * v, sums[cb][v]);
  }
  for (; c0 < k; ++c0) {
    V8 sums[V] = {};
    for (int64_t t = 0; t < len; ++t) {
      const V8 weight = Broadcast(cwt[t * k + c0]);
      for (int v = 0; v < V; ++v) sums[v] += weight * Load(xt + (start + t) * R + 8 * v);
    }
    for (int v = 0; v < V; ++v) Store(table + c0 * R + 8 * v, sums[v]);
  }
}

// acc[n][i] += sum_{j0 <= j < j1} T_j[Q[n, j]][i] for outputs n0..n1, R rows per table entry.
template <int Bits, int R>
void Accumulate(const EncodedWeight& w, const float* __restrict table, int64_t j0, int64_t j1, int64_t n0, int64_t n1,
                float* __restrict acc) {
  const int64_t stride = w.k() * R;
  for (int64_t n = n0; n < n1; ++n) {
    const auto code = w.row_codes<Bits>(n);
    if (R == 1) {  // batch 1: four independent sums hide the gathers' latency
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4) {
        for (int u = 0; u < 4; ++u) s[u] += table[(j + u - j0) * stride + code(j + u)];
      }
      for (; j < j1; ++j) s[0] += table[(j - j0) * stride + code(j)];
      acc[n] += (s[0] + s[1]) + (s[2] + s[3]);
      continue;
    }
    // S interleaved sets of vector sums, four vectors in flight per position step.
    constexpr int V = R >= 8 ? R / 8 : 1;
    constexpr int S = V >= 4 ? 1 : 4 / V;
    V8 sums[S][V] = {};
    int64_t j = j0;
    for (; j + S <= j1; j += S) {
      for (int u = 0; u < S; ++u) {
        const float* entry = table + (j + u - j0) * stride + code(j + u) * R;
        for (int v = 0; v < V; ++v) sums[u][v] += Load(entry + 8 * v);
      }
    }
    for (; j < j1; ++j) {
      const float* entry = table + (j - j0) * stride + code(j) * R;
      for (int v = 0; v < V; ++v) sums[0][v] += Load(entry + 8 * v);
    }
    for (int v = 0; v < V; ++v) {
      V8 total = sums[0][v];
      for (int u = 1; u < S; ++u) total += sums[u][v];
      Store(acc + n * R + 8 * v, Load(acc + n * R + 8 * v) + total);
    }
  }
}

template <int R>
void AccumulateRows(const EncodedWeight& w, const float* table, int64_t j0, int64_t j1, int64_t n0, int64_t n1,
                    float* acc) {
  switch (w.code_bits()) {
    case 4: Accumulate<4, R>(w, table, j0, j1, n0, n1, acc); break;
    case 8: Accumulate<8, R>(w, table, j0, j1, n0, n1, acc); break;
    default: Accumulate<16, R>(w, table, j0, j1, n0, n1, acc); break;
  }
}

// One pass of up to kRowsPerPass activation rows, padded to R (1, 8, 16 or 32) with zero rows.
template <int R>
void LookupPass(const EncodedWeight& w, const float* xt, float* acc, const Ort::KernelContext* context) {
  const int64_t n_out = w.rows(), cols = w.cols(), d = w.d(), k = w.k(), n_sub = w.n_sub();
  const int64_t per_position = k * R;
  const int64_t block = std::max<int64_t>(1, TableBytes(R) / (per_position * static_cast<int64_t>(sizeof(float))));
  Scratch table(static_cast<size_t>(std::min(block, n_sub) * per_position));
  std::fill(acc, acc + n_out * R, 0.0f);
  // With a context the pass spreads its work over the session's threads; without, it runs here
  // (one pass of many running side by side).
  auto for_each = [&](size_t total, auto&& fn) {
    if (context != nullptr) {
      ParallelFor(*context, total, 0, fn);
    } else {
      for (size_t i = 0; i < total; ++i) fn(i);
    }
  };
  for (int64_t j0 = 0; j0 < n_sub; j0 += block) {
    const int64_t j1 = std::min(n_sub, j0 + block);
    float* t = table.data();
    for_each(static_cast<size_t>(j1 - j0), [&](size_t jj) {
      const int64_t j = j0 + static_cast<int64_t>(jj);
      BuildTable<R>(w.codewords_transposed(), k, xt, j * d, std::min(d, cols - j * d), t + jj * per_position);
    });
    const int64_t chunk = 128;
    for_each(static_cast<size_t>((n_out + chunk - 1) / chunk), [&](size_t b) {
      const int64_t n0 = static_cast<int64_t>(b) * chunk, n1 = std::min(n_out, n0 + chunk);
      AccumulateRows<R>(w, t, j0, j1, n0, n1, acc);
    });
  }
}

// Rows [i0, i0 + rows) of Y, one pass (rows <= kRowsPerPass).
void LookupRows(const EncodedWeight& w, const float* a, int64_t i0, int64_t rows, float* y,
                const Ort::KernelContext* context) {
  const int64_t n_out = w.rows(), cols = w.cols();
  const float* scales = w.scales();
  // Padded with zero rows to a whole vector: 1, 8, 16 or 32 rows per table entry.
  const int64_t padded = rows == 1 ? 1 : rows <= 8 ? 8 : rows <= 16 ? 16 : 32;
  Scratch xt(static_cast<size_t>(cols * padded));
  std::fill(xt.data(), xt.data() + cols * padded, 0.0f);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c) xt.data()[c * padded + i] = a[(i0 + i) * cols + c];
  Scratch acc(static_cast<size_t>(n_out * padded));
  switch (padded) {
    case 1: LookupPass<1>(w, xt.data(), acc.data(), context); break;
    case 8: LookupPass<8>(w, xt.data(), acc.data(), context); break;
    case 16: LookupPass<16>(w, xt.data(), acc.data(), context); break;
    default: LookupPass<32>(w, xt.data(), acc.data(), context); break;
  }
  // Y[i0 + i][n] = scale[n] * acc[n][i], in chunks of outputs whose acc rows (32 KiB at most)
  // stay in L1 while each Y row's run is written in order.
  const int64_t chunk = 256;
  auto transpose = [&](size_t b) {
    const int64_t n0 = static_cast<int64_t>(b) * chunk, n1 = std::min(n_out, n0 + chunk);
    for (int64_t i = 0; i < rows; ++i) {
      float* out = y + (i0 + i) * n_out;
      for (int64_t n = n0; n < n1; ++n) out[n] = acc.data()[n * padded + i] * (scales != nullptr ? scales[n] : 1.0f);
    }
  };
  const size_t chunks = static_cast<size_t>((n_out + chunk - 1) / chunk);
  if (context != nullptr) {
    ParallelFor(*context, chunks, 0, transpose);
  } else {
    for (size_t b = 0; b < chunks; ++b) transpose(b);
  }
}

}  // namespace

// For activation rows a_i and position j: T[j][c][i] = a_i[jd : jd + d] . C'[c] (the last
// position's tail only), then Y[i][n] = scale[n] * sum_j T[j][Q[n, j]][i]: per output and
// subvector one table read instead of d multiply-adds, and 1 to 2 bytes of codes read instead of
// 4d bytes of weights.
void EncodedMatMul::RunLookupTables(const EncodedWeight& w, const float* a, int64_t m, float* y,
                                    const Ort::KernelContext& context) const {
  const int64_t passes = (m + kRowsPerPass - 1) / kRowsPerPass;
  // One pass, or a few of unequal sizes: one after the other, each spread over the threads.
  if (passes == 1 || (passes <= kInnerParallelPasses && m % kRowsPerPass != 0)) {
    for (int64_t i0 = 0; i0 < m; i0 += kRowsPerPass) LookupRows(w, a, i0, std::min(kRowsPerPass, m - i0), y, &context);
    return;
  }
  // Many passes: whole passes side by side, each on one thread (a pass's own parallel steps
  // are too short to be worth waking the threads, thousands of times a layer).
  ParallelFor(context, static_cast<size_t>(passes), 0, [&](size_t p) {
    const int64_t i0 = static_cast<int64_t>(p) * kRowsPerPass;
    LookupRows(w, a, i0, std::min(kRowsPerPass, m - i0), y, nullptr);
  });
}

// A few activation rows against decoded weight rows: each output row is decoded into a buffer
// that stays in L1 and dotted with the rows at once, so nothing of the weight is written out
// (the tiles' Gemm would read back a decoded tile it cannot reuse for so few rows).
// Sign-split at d = 8 (the default) with 8-bit codes: sign byte j holds subvector j's signs.
bool SignedRowByRow(const EncodedWeight& w) {
  return w.has_signs() && w.d() == 8 && w.cols() % 8 == 0 && w.code_bits() == 8;
}

void EncodedMatMul::RunRowByRow(const EncodedWeight& w, const float* a, int64_t m, float* y,
                                const Ort::KernelContext& context) const {
  const int64_t n_out = w.rows(), cols = w.cols(), chunk = 64;
  if (SignedRowByRow(w)) {
    // Each codeword times its eight signs is dotted with the rows without being stored.
    const float* cw = w.codewords();
    const float* scales = w.scales();
    const float* sign_table = SignTable256x8();
    ParallelFor(context, static_cast<size_t>((n_out + chunk - 1) / chunk), 0, [&](size_t b) {
      const int64_t n0 = static_cast<int64_t>(b) * chunk, n1 = std::min(n_out, n0 + chunk);
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* codes = w.codes8_row(n);
        const uint8_t* signs = w.sign_row(n);
        V8 sums[kRowByRowRows] = {};
        int64_t j = 0;
        if (m == 1) {  // four sums in flight (one chain waits on each multiply-add's latency)
          for (; j + 4 <= cols / 8; j += 4) {
            for (int u = 0; u < 4; ++u) {
              const V8 weight = Load(cw + codes[j + u] * 8) * Load(sign_table + signs[j + u] * 8);
              sums[u] += weight * Load(a + (j + u) * 8);
            }
          }
        }
        for (; j < cols / 8; ++j) {
          const V8 weight = Load(cw + codes[j] * 8) * Load(sign_table + signs[j] * 8);
          for (int64_t i = 0; i < m; ++i) sums[i] += weight * Load(a + i * cols + j * 8);
        }
        if (m == 1) sums[0] += (sums[1] + sums[2]) + sums[3];
        const float scale = scales != nullptr ? scales[n] : 1.0f;
        for (int64_t i = 0; i < m; ++i) {
          float s = 0.0f;
          for (int u = 0; u < 8; ++u) s += sums[i][u];
          y[i * n_out + n] = s * scale;
        }
      }
    });
    return;
  }
  ParallelFor(context, static_cast<size_t>((n_out + chunk - 1) / chunk), 0, [&](size_t b) {
    const int64_t n0 = static_cast<int64_t>(b) * chunk, n1 = std::min(n_out, n0 + chunk);
    Scratch row(static_cast<size_t>(cols));
    const float* r = row.data();
    for (int64_t n = n0; n < n1; ++n) {
      w.DecodeRows(n, n + 1, row.data());
      for (int64_t i = 0; i < m; ++i) {
        const float* x = a + i * cols;
        V8 sums[2] = {};
        int64_t c = 0;
        for (; c + 16 <= cols; c += 16) {
          sums[0] += Load(r + c) * Load(x + c);
          sums[1] += Load(r + c + 8) * Load(x + c + 8);
        }
        V8 total = sums[0] + sums[1];
        float s = 0.0f;
        for (int u = 0; u < 8; ++u) s += total[u];
        for (; c < cols; ++c) s += r[c] * x[c];
        y[i * n_out + n] = s;
      }
    }
  });
}

// Decodes tiles of output rows into a bounded buffer and multiplies each with the standard Gemm
// (onnxruntime's own, on the session's threads).
void EncodedMatMul::RunTiles(const EncodedWeight& w, const float* a, int64_t m, float* y,
                             const Ort::KernelContext& context) const {
  const int64_t n_out = w.rows(), cols = w.cols();
  if (m <= kRowByRowRows) {
    RunRowByRow(w, a, m, y, context);
    return;
  }
  const int64_t tile = std::max<int64_t>(16, std::min(n_out, kTileFloats / cols));
  Scratch decoded(static_cast<size_t>(std::min(tile, n_out) * cols));
  Scratch product(tile < n_out ? static_cast<size_t>(m * tile) : 0);
  Ort::Value input = WrapFloats(const_cast<float*>(a), {m, cols});
  for (int64_t n0 = 0; n0 < n_out; n0 += tile) {
    const int64_t n1 = std::min(n_out, n0 + tile), width = n1 - n0;
    const int64_t rows_per_task = 16;
    ParallelFor(context, static_cast<size_t>((width + rows_per_task - 1) / rows_per_task), 0, [&](size_t b) {
      const int64_t r0 = n0 + static_cast<int64_t>(b) * rows_per_task, r1 = std::min(n1, r0 + rows_per_task);
      w.DecodeRows(r0, r1, decoded.data() + (r0 - n0) * cols);
    });
    Ort::Value weight = WrapFloats(decoded.data(), {width, cols});
    const bool whole = width == n_out;  // one tile: the Gemm writes Y itself
    Ort::Value out = WrapFloats(whole ? y : product.data(), {m, width});
    const OrtValue* inputs[] = {input, weight};
    OrtValue* outputs[] = {out};
    gemm_.Invoke(context.GetOrtKernelContext(), inputs, 2, outputs, 1);
    if (whole) break;
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(y + i * n_out + n0, product.data() + i * width, static_cast<size_t>(width) * sizeof(float));
    }
  }
}

}  // namespace onnxvq
