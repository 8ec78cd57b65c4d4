// Y = A @ W^T for an encoded weight whose rows are the outputs (W: N x K, A: M x K, Y: M x N),
// without ever holding W: the core of VQGemm and VQMatMul.
#pragma once

#include <type_traits>

#include "encoded_weight.h"

namespace onnxvq {

class EncodedMatMul {
 public:
  // `info` creates the standard Gemm the tiled path runs on decoded tiles.
  explicit EncodedMatMul(const Ort::ConstKernelInfo& info);

  // y (m x N) = a (m x K) @ W^T, W's per-row scales included.
  void Run(const EncodedWeight& w, const float* a, int64_t m, float* y, const Ort::KernelContext& context) const;

  // Whether Run uses the lookup-table path for this weight and m activation rows (else decoded
  // tiles and onnxruntime's Gemm).
  static bool UsesLookupTables(const EncodedWeight& w, int64_t m);

 private:
  void RunLookupTables(const EncodedWeight& w, const float* a, int64_t m, float* y,
                       const Ort::KernelContext& context) const;
  void RunTiles(const EncodedWeight& w, const float* a, int64_t m, float* y, const Ort::KernelContext& context) const;
  void RunRowByRow(const EncodedWeight& w, const float* a, int64_t m, float* y,
                   const Ort::KernelContext& context) const;

  enum class Path { kAuto, kTables, kTiles };
  Path forced_ = Path::kAuto;
  mutable Ort::Op gemm_{nullptr};  // Invoke is not const; the op itself holds no call state
};

// Runs fn(i) for i in [0, total) on the session's intra-op threads, in at most `batches` chunks.
template <typename Fn>
void ParallelFor(const Ort::KernelContext& context, size_t total, size_t batches, Fn&& fn) {
  if (total == 0) return;
  if (total == 1) {
    fn(0);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  auto trampoline = [](void* data, size_t i) { (*static_cast<F*>(data))(i); };
  context.ParallelFor(trampoline, total, batches, const_cast<void*>(static_cast<const void*>(&fn)));
}

}  // namespace onnxvq
