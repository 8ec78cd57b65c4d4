#include "encoded_weight.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>
#include <tuple>

namespace onnxvq {
namespace {

// A float16/float32 (or bfloat16) tensor's values as float32.
std::vector<float> ToFloats(const Ort::ConstValue& value) {
  auto info = value.GetTensorTypeAndShapeInfo();
  size_t n = info.GetElementCount();
  std::vector<float> out(n);
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      std::memcpy(out.data(), value.GetTensorData<float>(), n * sizeof(float));
      break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: {
      const Ort::Float16_t* p = value.GetTensorData<Ort::Float16_t>();
      for (size_t i = 0; i < n; ++i) out[i] = p[i].ToFloat();
      break;
    }
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: {
      const Ort::BFloat16_t* p = value.GetTensorData<Ort::BFloat16_t>();
      for (size_t i = 0; i < n; ++i) out[i] = p[i].ToFloat();
      break;
    }
    default:
      Fail("onnxvq: a codebook, projection or scales tensor must be float32, float16 or bfloat16");
  }
  return out;
}

// C' = C (k x rank) @ P (rank x d), or C when there is no projection.
std::shared_ptr<const Codewords> MakeCodewords(const Ort::ConstValue& codebook, const Ort::ConstValue* projection) {
  std::vector<int64_t> shape = codebook.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != 2) Fail("onnxvq: the codebook must be 2-D");
  const int64_t k = shape[0], rank = shape[1];
  std::vector<float> rows = ToFloats(codebook);
  if (projection == nullptr) return std::make_shared<const Codewords>(std::move(rows), k, rank);
  std::vector<int64_t> p_shape = projection->GetTensorTypeAndShapeInfo().GetShape();
  if (p_shape.size() != 2 || p_shape[0] != rank) Fail("onnxvq: the projection must be (rank, d)");
  std::vector<float> p = ToFloats(*projection);
  const int64_t d = p_shape[1];
  std::vector<float> decoded(static_cast<size_t>(k * d), 0.0f);
  for (int64_t c = 0; c < k; ++c) {
    for (int64_t t = 0; t < rank; ++t) {
      const float a = rows[c * rank + t];
      for (int64_t u = 0; u < d; ++u) decoded[c * d + u] += a * p[t * d + u];
    }
  }
  return std::make_shared<const Codewords>(std::move(decoded), k, d);
}

// MakeCodewords for constant tensors, shared by every kernel that reads the same ones (the
// same addresses, type and shapes) while any of them lives. A constant's buffer lives as long as
// its session, whose kernels hold the entry, so an address is not reused while its entry lives.
std::shared_ptr<const Codewords> SharedCodewords(const Ort::ConstValue& codebook, const Ort::ConstValue* projection) {
  auto identity = [](const Ort::ConstValue* value) {
    if (value == nullptr) return std::make_tuple(static_cast<const void*>(nullptr), 0, std::vector<int64_t>());
    auto info = value->GetTensorTypeAndShapeInfo();
    return std::make_tuple(value->GetTensorRawData(), static_cast<int>(info.GetElementType()), info.GetShape());
  };
  const auto key = std::make_pair(identity(&codebook), identity(projection));
  static std::mutex mutex;
  static std::map<decltype(key), std::weak_ptr<const Codewords>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end();) {  // forget entries no kernel holds
    it = it->second.expired() ? cache.erase(it) : std::next(it);
  }
  if (auto found = cache.find(key); found != cache.end()) return found->second.lock();
  std::shared_ptr<const Codewords> made = MakeCodewords(codebook, projection);
  cache.emplace(key, made);
  return made;
}

std::vector<std::string> SplitCommas(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, ',')) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

}  // namespace

EncodedWeight::EncodedWeight(const Ort::ConstKernelInfo& info, size_t first) : first_(first) {
  const std::string missing = "\x01";
  std::string extras = StringAttr(info, "extra_inputs", missing);
  if (extras == missing) {
    Fail("onnxvq: node '" + info.GetNodeName() +
         "' has no 'extra_inputs' attribute (written by an older onnxvq): compress the model again, "
         "or run it without the native library");
  }
  int at = static_cast<int>(first + 2);
  for (const std::string& name : SplitCommas(extras)) {
    if (name == "projection") {
      projection_at_ = at++;
    } else if (name == "signs") {
      signs_at_ = at++;
    } else if (name == "scales") {
      scales_at_ = at++;
    } else {
      Fail("onnxvq: node '" + info.GetNodeName() + "' names an unknown extra input '" + name + "'");
    }
  }
  n_extras_ = static_cast<size_t>(at) - first - 2;
  code_bits_ = IntAttr(info, "code_bits", 8);
  if (code_bits_ != 4 && code_bits_ != 8 && code_bits_ != 16) Fail("onnxvq: code_bits must be 4, 8 or 16");
  Ort::AllocatorWithDefaultOptions allocator;
  Ort::Value shape = info.GetTensorAttribute("weight_shape", allocator);
  auto shape_info = shape.GetTensorTypeAndShapeInfo();
  const int64_t* dims = shape.GetTensorData<int64_t>();
  weight_shape_.assign(dims, dims + shape_info.GetElementCount());
  int64_t weight_dtype = IntAttr(info, "weight_dtype", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  if (weight_dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    Fail("onnxvq: the native kernels run float32 weights only; node '" + info.GetNodeName() +
         "' has another weight_dtype: run it without the native library");
  }

  // Constant tensors (initializers) are read once, here; otherwise every call binds its inputs.
  int is_constant = 0;
  std::vector<Ort::ConstValue> values;
  std::vector<int> indices = {static_cast<int>(first), static_cast<int>(first + 1)};
  for (int i : {projection_at_, signs_at_, scales_at_}) {
    if (i >= 0) indices.push_back(i);
  }
  constant_ = true;
  for (int i : indices) {
    Ort::ConstValue value = info.GetTensorConstantInput(static_cast<size_t>(i), &is_constant);
    if (!is_constant) {
      constant_ = false;
      break;
    }
    values.push_back(value);
  }
  if (constant_) {
    auto named = [&](int index) -> const Ort::ConstValue* {
      if (index < 0) return nullptr;
      return &values[std::find(indices.begin(), indices.end(), index) - indices.begin()];
    };
    Prepare(values[0], values[1], named(projection_at_), named(signs_at_), named(scales_at_), true);
    // A small codebook is converted again at each call rather than held as float32 (a k = 256,
    // d = 8 codebook is 2,048 values, about a microsecond): between calls the kernel holds nothing
    // but the file's own tensors. A large one (vq4all's) is held, once per session.
    if (k_ * d_ * static_cast<int64_t>(sizeof(float)) <= kPerCallCodebookBytes) {
      codewords_.reset();
      per_call_codewords_ = true;
    }
  }
}

const EncodedWeight& EncodedWeight::ForCall(const Ort::KernelContext& context,
                                            std::optional<EncodedWeight>& bound) const {
  if (constant_ && !per_call_codewords_) return *this;
  bound.emplace(*this);
  if (constant_) {  // the same tensors; only the codewords are made for this call
    Ort::ConstValue projection{nullptr};
    if (projection_at_ >= 0) projection = context.GetInput(static_cast<size_t>(projection_at_));
    bound->codewords_ = MakeCodewords(context.GetInput(first_ + 1), projection_at_ >= 0 ? &projection : nullptr);
    return *bound;
  }
  bound->Bind(context);
  return *bound;
}

void EncodedWeight::Bind(const Ort::KernelContext& context) {
  Ort::ConstValue codes = context.GetInput(first_);
  Ort::ConstValue codebook = context.GetInput(first_ + 1);
  Ort::ConstValue projection{nullptr}, signs{nullptr}, scales{nullptr};
  if (projection_at_ >= 0) projection = context.GetInput(static_cast<size_t>(projection_at_));
  if (signs_at_ >= 0) signs = context.GetInput(static_cast<size_t>(signs_at_));
  if (scales_at_ >= 0) scales = context.GetInput(static_cast<size_t>(scales_at_));
  Prepare(codes, codebook, projection_at_ >= 0 ? &projection : nullptr, signs_at_ >= 0 ? &signs : nullptr,
          scales_at_ >= 0 ? &scales : nullptr, false);
}

void EncodedWeight::Prepare(const Ort::ConstValue& codes, const Ort::ConstValue& codebook,
                            const Ort::ConstValue* projection, const Ort::ConstValue* signs,
                            const Ort::ConstValue* scales, bool shared) {
  auto codes_info = codes.GetTensorTypeAndShapeInfo();
  std::vector<int64_t> codes_shape = codes_info.GetShape();
  if (codes_shape.size() != 2) Fail("onnxvq: codes must be 2-D (rows, packed codes)");
  rows_ = codes_shape[0];
  codes_cols_ = codes_shape[1];
  int64_t numel = Numel(weight_shape_);
  if (rows_ <= 0 || numel % rows_ != 0) Fail("onnxvq: the codes' rows do not divide the weight's size");
  cols_ = numel / rows_;
  auto code_type = codes_info.GetElementType();
  if (code_bits_ == 16) {
    if (code_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16) Fail("onnxvq: 16-bit codes must be uint16");
    codes16_ = codes.GetTensorData<uint16_t>();
  } else {
    if (code_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) Fail("onnxvq: 4- and 8-bit codes must be uint8");
    codes8_ = codes.GetTensorData<uint8_t>();
  }
  codewords_ = shared ? SharedCodewords(codebook, projection) : MakeCodewords(codebook, projection);
  k_ = codewords_->k();
  d_ = codewords_->d();
  n_sub_ = (cols_ + d_ - 1) / d_;
  int64_t per_row = code_bits_ == 4 ? codes_cols_ * 2 : codes_cols_;
  if (per_row < n_sub_) Fail("onnxvq: the codes hold fewer subvectors than the weight's rows need");
  // Every code is checked once here, so that the kernels can index the codebook unchecked.
  uint32_t largest = 0;
  for (int64_t r = 0; r < rows_; ++r) {
    for (int64_t j = 0; j < n_sub_; ++j) largest = std::max(largest, Code(r, j));
  }
  if (rows_ > 0 && largest >= static_cast<uint32_t>(k_)) Fail("onnxvq: a code is out of the codebook's range");
  if (signs != nullptr) {
    sign_bytes_ = (cols_ + 7) / 8;
    std::vector<int64_t> s_shape = signs->GetTensorTypeAndShapeInfo().GetShape();
    if (s_shape.size() != 2 || s_shape[0] != rows_ || s_shape[1] != sign_bytes_) {
      Fail("onnxvq: signs must be (rows, ceil(cols / 8)) uint8");
    }
    signs_ = signs->GetTensorData<uint8_t>();
  } else {
    signs_ = nullptr;
  }
  if (scales != nullptr) {
    auto values = std::make_shared<const std::vector<float>>(ToFloats(*scales));
    if (static_cast<int64_t>(values->size()) != rows_) Fail("onnxvq: scales must hold one value per row");
    scales_ = std::move(values);
  } else {
    scales_.reset();
  }
}

namespace {

// SIGN_TABLE of onnxvq.ops.signs: values[b][t] = -1 when bit t of b is set, else +1.
struct SignTable {
  float values[256][8];
  SignTable() {
    for (int b = 0; b < 256; ++b)
      for (int t = 0; t < 8; ++t) values[b][t] = ((b >> t) & 1) ? -1.0f : 1.0f;
  }
};

const SignTable& Signs() {
  static const SignTable table;
  return table;
}

// Row r of M without signs and scales: the codewords of its codes, the last one's tail only.
template <int Bits>
void GatherCodewords(const EncodedWeight& w, int64_t r, float* row) {
  const int64_t d = w.d(), cols = w.cols(), n_sub = w.n_sub();
  const float* cw = w.codewords();
  const auto code = w.row_codes<Bits>(r);
  const int64_t full = cols / d;  // subvectors with no padding
  if (d == 8) {  // the common length, unrolled
    for (int64_t j = 0; j < full; ++j) {
      const float* src = cw + code(j) * 8;
      float* dst = row + j * 8;
      for (int t = 0; t < 8; ++t) dst[t] = src[t];
    }
  } else {
    for (int64_t j = 0; j < full; ++j) std::memcpy(row + j * d, cw + code(j) * d, static_cast<size_t>(d) * sizeof(float));
  }
  if (full < n_sub) {
    std::memcpy(row + full * d, cw + code(full) * d, static_cast<size_t>(cols - full * d) * sizeof(float));
  }
}

}  // namespace

const float* SignTable256x8() { return &Signs().values[0][0]; }

const float* Codewords::transposed() const {
  std::call_once(transposed_once_, [&] {
    transposed_.resize(rows_.size());
    for (int64_t c = 0; c < k_; ++c)
      for (int64_t t = 0; t < d_; ++t) transposed_[t * k_ + c] = rows_[c * d_ + t];
  });
  return transposed_.data();
}

void EncodedWeight::DecodeRows(int64_t r0, int64_t r1, float* out) const {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = out + (r - r0) * cols_;
    switch (code_bits_) {
      case 4: GatherCodewords<4>(*this, r, row); break;
      case 8: GatherCodewords<8>(*this, r, row); break;
      default: GatherCodewords<16>(*this, r, row); break;
    }
    const float s = scales_ ? (*scales_)[r] : 1.0f;
    if (signs_ != nullptr) {
      // Eight entries per sign byte at once, through the 256 x 8 table of +-1 (as the bodies
      // do): no branch on data bits, and the multiply vectorises.
      const SignTable& table = Signs();
      const uint8_t* bits = signs_ + r * sign_bytes_;
      const int64_t whole = cols_ / 8;
      for (int64_t b = 0; b < whole; ++b) {
        const float* sign = table.values[bits[b]];
        float* out = row + b * 8;
        for (int t = 0; t < 8; ++t) out[t] *= s * sign[t];
      }
      for (int64_t c = whole * 8; c < cols_; ++c) row[c] *= s * table.values[bits[c >> 3]][c & 7];
    } else if (scales_) {
      for (int64_t c = 0; c < cols_; ++c) row[c] *= s;
    }
  }
}

void EncodedWeight::DecodeWeight(bool transposed, float* out) const {
  if (!transposed) {
    DecodeRows(0, rows_, out);
    return;
  }
  // M holds, per batch entry, the (N x K) transpose of that entry's (K x N) weight.
  size_t rank = weight_shape_.size();
  int64_t k = weight_shape_[rank - 2], n = weight_shape_[rank - 1];
  int64_t batch = Numel(weight_shape_) / (k * n);
  Scratch block(static_cast<size_t>(n * k));
  for (int64_t b = 0; b < batch; ++b) {
    DecodeRows(b * n, (b + 1) * n, block.data());
    float* w = out + b * k * n;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < k; ++j) w[j * n + i] = block.data()[i * k + j];
    }
  }
}

}  // namespace onnxvq
