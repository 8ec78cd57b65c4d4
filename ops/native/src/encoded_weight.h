// The VQ-encoded weight every ai.onnxvq op reads (the C++ twin of onnxvq.ops.vq_weight's
// decode_weight, which is the definition):
//
//   S[r, j, :] = C'[Q[r, j], :]        C' = C (k x d), or C @ projection (k x rank -> k x d)
//   M[r, :]    = S.reshape(rows, n_sub * d)[r, :cols] * signs[r, :] * scales[r]
//
// Q are the packed codes (4 bits: byte j holds codes 2j (low nibble) and 2j+1; 8 and 16 bits:
// one uint8/uint16 each), signs are packed 8 per byte, least significant bit first (set = -1).
// Which of projection/signs/scales follow the codebook is the node's `extra_inputs` attribute.
#pragma once

#include <memory>
#include <mutex>
#include <optional>

#include "common.h"

namespace onnxvq {

// SIGN_TABLE of onnxvq.ops.signs, 256 x 8: row b holds the eight +-1 factors of sign byte b
// (-1 where bit t of b is set).
const float* SignTable256x8();

// A codebook as float32 codewords C' (k x d: C, or C @ projection), and on first use their d x k
// transpose (the lookup tables' layout; convolutions never ask for it). Kernels whose codebook and
// projection are the same constant tensors share one (a vq4all model's universal codebook of
// 65,536 words is 4 MiB as float32: once per session, not once per node).
class Codewords {
 public:
  Codewords(std::vector<float> rows, int64_t k, int64_t d) : rows_(std::move(rows)), k_(k), d_(d) {}
  const float* rows() const { return rows_.data(); }
  const float* transposed() const;
  int64_t k() const { return k_; }
  int64_t d() const { return d_; }

 private:
  std::vector<float> rows_;
  int64_t k_, d_;
  mutable std::once_flag transposed_once_;
  mutable std::vector<float> transposed_;
};

class EncodedWeight {
 public:
  // `first` is the index of the codes input; the codebook and the extras follow it.
  EncodedWeight(const Ort::ConstKernelInfo& info, size_t first);

  // Index of the first input after the encoded ones (the consumer's optional inputs).
  size_t next_input() const { return first_ + 2 + n_extras_; }
  // The weight for one call: this one when its tensors are constants (read at creation); else a
  // copy in `bound` holding the call's inputs, or, for constants with a small codebook, the call's
  // float32 codewords (calls of one session may run concurrently, so the kernel's own state is
  // never rebound).
  const EncodedWeight& ForCall(const Ort::KernelContext& context, std::optional<EncodedWeight>& bound) const;

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t n_sub() const { return n_sub_; }
  int64_t d() const { return d_; }
  int64_t k() const { return k_; }
  const std::vector<int64_t>& weight_shape() const { return weight_shape_; }
  bool has_signs() const { return signs_ != nullptr; }
  const uint8_t* sign_row(int64_t r) const { return signs_ + r * sign_bytes_; }  // with has_signs()
  const float* codewords() const { return codewords_->rows(); }  // k x d
  const float* codewords_transposed() const { return codewords_->transposed(); }  // d x k
  const float* scales() const { return scales_ ? scales_->data() : nullptr; }

  int64_t code_bits() const { return code_bits_; }
  // Row r's packed codes (uint8 for 4 and 8 bits, uint16 for 16).
  const uint8_t* codes8_row(int64_t r) const { return codes8_ + r * codes_cols_; }
  const uint16_t* codes16_row(int64_t r) const { return codes16_ + r * codes_cols_; }

  // Row r's codes at a code width known when compiling (the kernels' inner loops).
  template <int Bits>
  struct RowCodes {
    const uint8_t* q8;
    const uint16_t* q16;
    uint32_t operator()(int64_t j) const {
      if (Bits == 4) return (j & 1) ? (q8[j >> 1] >> 4) : (q8[j >> 1] & 0x0F);
      if (Bits == 8) return q8[j];
      return q16[j];
    }
  };
  template <int Bits>
  RowCodes<Bits> row_codes(int64_t r) const {
    return Bits == 16 ? RowCodes<Bits>{nullptr, codes16_row(r)} : RowCodes<Bits>{codes8_row(r), nullptr};
  }

  // Code of subvector j of row r.
  inline uint32_t Code(int64_t r, int64_t j) const {
    switch (code_bits_) {
      case 4: return row_codes<4>(r)(j);
      case 8: return row_codes<8>(r)(j);
      default: return row_codes<16>(r)(j);
    }
  }

  // Rows [r0, r1) of M, row-major with `cols` floats per row.
  void DecodeRows(int64_t r0, int64_t r1, float* out) const;
  // The dense weight in its own shape (M, or per batch entry M transposed back when the layout
  // is transposed: `transposed` as in onnxvq.layout).
  void DecodeWeight(bool transposed, float* out) const;

 private:
  void Bind(const Ort::KernelContext& context);  // Prepare from the call's inputs
  // `shared`: the tensors are constants of the session, so the codewords may be shared.
  void Prepare(const Ort::ConstValue& codes, const Ort::ConstValue& codebook, const Ort::ConstValue* projection,
               const Ort::ConstValue* signs, const Ort::ConstValue* scales, bool shared);

  size_t first_;
  size_t n_extras_ = 0;
  int projection_at_ = -1, signs_at_ = -1, scales_at_ = -1;  // input indices, -1 when absent
  bool constant_ = false;
  bool per_call_codewords_ = false;  // constant, but codewords_ made by ForCall (a small codebook)
  static constexpr int64_t kPerCallCodebookBytes = 64 * 1024;
  int64_t code_bits_ = 8;
  std::vector<int64_t> weight_shape_;
  int64_t rows_ = 0, cols_ = 0, n_sub_ = 0, d_ = 0, k_ = 0, codes_cols_ = 0, sign_bytes_ = 0;
  const uint8_t* codes8_ = nullptr;
  const uint16_t* codes16_ = nullptr;
  const uint8_t* signs_ = nullptr;
  std::shared_ptr<const Codewords> codewords_;
  // Shared, like codewords_, so that a per-call copy (ForCall) copies no per-row data.
  std::shared_ptr<const std::vector<float>> scales_;
};

}  // namespace onnxvq
