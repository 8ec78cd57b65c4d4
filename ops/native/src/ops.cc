// The ai.onnxvq kernels and the library's entry point.
//
// Each kernel computes what its op's function body computes (ops/vq_*.py state the math), never
// holding the dense weight between calls: VQGemm and VQMatMul (a 2-D weight on the right) run
// EncodedMatMul (lookup tables, or bounded decoded tiles); VQGather decodes only the rows it
// reads; VQConv, VQConvTranspose and the other VQMatMul forms decode the weight into scratch for
// the call and run onnxruntime's own kernel on it (Ort::Op), so their attributes behave exactly as
// the standard op's, except depthwise VQConvs, which run the library's own direct kernel
// (depthwise.h).
#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>

#include "depthwise.h"
#include "encoded_weight.h"
#include "matmul.h"
#include "pwlu.h"
#include "shapes.h"

namespace onnxvq {
namespace {

std::vector<int64_t> ShapeOf(const Ort::ConstValue& value) { return value.GetTensorTypeAndShapeInfo().GetShape(); }

OrtStatusPtr StatusOf(const std::exception& e) {
  return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
}

// Decodes the whole weight for one call, rows spread over the session's threads.
void DecodeAll(const EncodedWeight& w, bool transposed, float* out, const Ort::KernelContext& context) {
  if (transposed) {
    w.DecodeWeight(true, out);
    return;
  }
  const int64_t per_task = 64;
  ParallelFor(context, static_cast<size_t>((w.rows() + per_task - 1) / per_task), 0, [&](size_t b) {
    const int64_t r0 = static_cast<int64_t>(b) * per_task, r1 = std::min(w.rows(), r0 + per_task);
    w.DecodeRows(r0, r1, out + r0 * w.cols());
  });
}

// ---------------------------------------------------------------------------------------------
// VQGemm: Y = alpha * A' @ B' + beta * C (B's rows are the N outputs in both layouts).
class GemmKernel {
 public:
  static constexpr const char* kName = "VQGemm";
  GemmKernel(const OrtApi&, const OrtKernelInfo* raw) : weight_(Ort::ConstKernelInfo(raw), 1), matmul_(Ort::ConstKernelInfo(raw)) {
    Ort::ConstKernelInfo info(raw);
    alpha_ = FloatAttr(info, "alpha", 1.0f);
    beta_ = FloatAttr(info, "beta", 1.0f);
    trans_a_ = IntAttr(info, "transA", 0) != 0;
    has_c_ = info.GetInputCount() > weight_.next_input();
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext context(raw);
    std::optional<EncodedWeight> bound;
    const EncodedWeight& weight = weight_.ForCall(context, bound);
    Ort::ConstValue a = context.GetInput(0);
    std::vector<int64_t> a_shape = ShapeOf(a);
    if (a_shape.size() != 2) Fail("onnxvq: VQGemm's A must be 2-D");
    const int64_t m = trans_a_ ? a_shape[1] : a_shape[0], k = trans_a_ ? a_shape[0] : a_shape[1];
    const int64_t n = weight.rows();
    if (k != weight.cols()) Fail("onnxvq: VQGemm's A does not match its weight's K");
    const float* a_data = a.GetTensorData<float>();
    std::unique_ptr<Scratch> transposed;
    if (trans_a_) {
      transposed = std::make_unique<Scratch>(static_cast<size_t>(m * k));
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < m; ++j) transposed->data()[j * k + i] = a_data[i * m + j];
      a_data = transposed->data();
    }
    Ort::UnownedValue y = context.GetOutput(0, {m, n});
    float* out = y.GetTensorMutableData<float>();
    matmul_.Run(weight, a_data, m, out, context);
    if (alpha_ != 1.0f) {
      for (int64_t i = 0; i < m * n; ++i) out[i] *= alpha_;
    }
    if (has_c_) {
      Ort::ConstValue c = context.GetInput(weight.next_input());
      if (c != nullptr && beta_ != 0.0f) AddBias(c, m, n, out);
    }
  }

 private:
  // out += beta * C, C broadcast to (m, n) (Gemm's unidirectional broadcast).
  void AddBias(const Ort::ConstValue& c, int64_t m, int64_t n, float* out) const {
    std::vector<int64_t> shape = ShapeOf(c);
    const float* data = c.GetTensorData<float>();
    int64_t cm = 1, cn = 1;
    if (shape.size() == 1) cn = shape[0];
    if (shape.size() == 2) cm = shape[0], cn = shape[1];
    if ((cm != 1 && cm != m) || (cn != 1 && cn != n)) Fail("onnxvq: VQGemm's C does not broadcast to (M, N)");
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) out[i * n + j] += beta_ * data[(i % cm) * cn + (j % cn)];
  }

  EncodedWeight weight_;
  EncodedMatMul matmul_;
  float alpha_, beta_;
  bool trans_a_, has_c_;
};

// ---------------------------------------------------------------------------------------------
// VQMatMul: Y = X @ W (weight_left = 0) or W @ X, numpy matmul semantics.
class MatMulKernel {
 public:
  static constexpr const char* kName = "VQMatMul";
  MatMulKernel(const OrtApi&, const OrtKernelInfo* raw) : weight_(Ort::ConstKernelInfo(raw), 1), matmul_(Ort::ConstKernelInfo(raw)) {
    Ort::ConstKernelInfo info(raw);
    weight_left_ = IntAttr(info, "weight_left", 0) != 0;
    matmul_op_ = CreateStandardOp(info, "MatMul", 13, OpAttributes(), 2, 1);
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext context(raw);
    std::optional<EncodedWeight> bound;
    const EncodedWeight& weight = weight_.ForCall(context, bound);
    Ort::ConstValue x = context.GetInput(0);
    std::vector<int64_t> x_shape = ShapeOf(x);
    const std::vector<int64_t>& w_shape = weight.weight_shape();
    if (!weight_left_ && w_shape.size() == 2 && !x_shape.empty()) {
      // One (K x N) matrix shared by every row of X: the encoded product.
      const int64_t k = w_shape[0], n = w_shape[1];
      if (x_shape.back() != k) Fail("onnxvq: VQMatMul's X does not match its weight's K");
      std::vector<int64_t> y_shape(x_shape.begin(), x_shape.end() - 1);
      if (x_shape.size() > 1) y_shape.push_back(n);
      if (x_shape.size() == 1) y_shape = {n};
      Ort::UnownedValue y = context.GetOutput(0, y_shape);
      matmul_.Run(weight, x.GetTensorData<float>(), Numel(x_shape) / k, y.GetTensorMutableData<float>(), context);
      return;
    }
    // A weight on the left or a batch of weights: decoded for this call, onnxruntime's MatMul.
    Scratch dense(static_cast<size_t>(Numel(w_shape)));
    DecodeAll(weight, !weight_left_, dense.data(), context);
    Ort::Value w = WrapFloats(dense.data(), w_shape);
    std::vector<int64_t> y_shape = weight_left_ ? MatMulShape(w_shape, x_shape) : MatMulShape(x_shape, w_shape);
    Ort::UnownedValue y = context.GetOutput(0, y_shape);
    const OrtValue* inputs[2];
    inputs[0] = weight_left_ ? static_cast<const OrtValue*>(w) : static_cast<const OrtValue*>(x);
    inputs[1] = weight_left_ ? static_cast<const OrtValue*>(x) : static_cast<const OrtValue*>(w);
    OrtValue* outputs[] = {y};
    matmul_op_.Invoke(context.GetOrtKernelContext(), inputs, 2, outputs, 1);
  }

 private:
  EncodedWeight weight_;
  EncodedMatMul matmul_;
  Ort::Op matmul_op_{nullptr};
  bool weight_left_;
};

// ---------------------------------------------------------------------------------------------
// VQConv and VQConvTranspose: the weight decoded for the call, the standard op run on it (a
// depthwise VQConv runs DepthwiseConv2D instead, which is much faster than the standard Conv's
// per-group im2col).
template <bool Transposed>
class ConvKernel {
 public:
  static constexpr const char* kName = Transposed ? "VQConvTranspose" : "VQConv";
  ConvKernel(const OrtApi&, const OrtKernelInfo* raw) : weight_(Ort::ConstKernelInfo(raw), 1) {
    Ort::ConstKernelInfo info(raw);
    attributes_.Read(info);
    OpAttributes attrs;
    attrs.CopyString(info, "auto_pad");
    for (const char* name : {"dilations", "kernel_shape", "pads", "strides"}) attrs.CopyInts(info, name);
    attrs.CopyInt(info, "group");
    if (Transposed) {
      attrs.CopyInts(info, "output_padding");
      attrs.CopyInts(info, "output_shape");
    }
    has_bias_ = info.GetInputCount() > weight_.next_input();
    op_ = CreateStandardOp(info, Transposed ? "ConvTranspose" : "Conv", 11, attrs, has_bias_ ? 3 : 2, 1);
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext context(raw);
    std::optional<EncodedWeight> bound;
    const EncodedWeight& weight = weight_.ForCall(context, bound);
    Ort::ConstValue x = context.GetInput(0);
    const std::vector<int64_t>& w_shape = weight.weight_shape();
    Scratch dense(static_cast<size_t>(Numel(w_shape)));
    DecodeAll(weight, false, dense.data(), context);
    Ort::Value w = WrapFloats(dense.data(), w_shape);
    std::vector<int64_t> x_shape = ShapeOf(x);
    std::vector<int64_t> y_shape = Transposed ? ConvTransposeShape(x_shape, w_shape, attributes_)
                                              : ConvShape(x_shape, w_shape, attributes_);
    Ort::UnownedValue y = context.GetOutput(0, y_shape);
    const OrtValue* inputs[3] = {x, w, nullptr};
    if (has_bias_) inputs[2] = context.GetInput(weight.next_input());
    if (!Transposed && IsDepthwiseConv2D(x_shape, w_shape, attributes_)) {
      const float* bias = inputs[2] != nullptr ? Ort::ConstValue(inputs[2]).GetTensorData<float>() : nullptr;
      DepthwiseConv2D(x.GetTensorData<float>(), x_shape, dense.data(), w_shape, bias, attributes_,
                      y.GetTensorMutableData<float>(), y_shape, context);
      return;
    }
    OrtValue* outputs[] = {y};
    op_.Invoke(context.GetOrtKernelContext(), inputs, has_bias_ ? 3 : 2, outputs, 1);
  }

 private:
  EncodedWeight weight_;
  ConvAttributes attributes_;
  Ort::Op op_{nullptr};
  bool has_bias_;
};

// ---------------------------------------------------------------------------------------------
// VQGather: Y[i] = T[indices[i]], each requested row decoded on its own.
class GatherKernel {
 public:
  static constexpr const char* kName = "VQGather";
  GatherKernel(const OrtApi&, const OrtKernelInfo* raw) : weight_(Ort::ConstKernelInfo(raw), 1) {
    if (IntAttr(Ort::ConstKernelInfo(raw), "axis", 0) != 0) Fail("onnxvq: VQGather reads axis 0 only");
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext context(raw);
    std::optional<EncodedWeight> bound;
    const EncodedWeight& weight = weight_.ForCall(context, bound);
    Ort::ConstValue indices = context.GetInput(0);
    auto info = indices.GetTensorTypeAndShapeInfo();
    std::vector<int64_t> shape = info.GetShape();
    const int64_t count = static_cast<int64_t>(info.GetElementCount());
    std::vector<int64_t> rows(static_cast<size_t>(count));
    const int64_t table_rows = weight.rows();
    for (int64_t i = 0; i < count; ++i) {
      int64_t r = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 ? indices.GetTensorData<int32_t>()[i]
                                                                                : indices.GetTensorData<int64_t>()[i];
      if (r < -table_rows || r >= table_rows) Fail("onnxvq: VQGather index out of range");
      rows[static_cast<size_t>(i)] = r < 0 ? r + table_rows : r;
    }
    shape.push_back(weight.cols());
    Ort::UnownedValue y = context.GetOutput(0, shape);
    float* out = y.GetTensorMutableData<float>();
    const int64_t per_task = 64, cols = weight.cols();
    ParallelFor(context, static_cast<size_t>((count + per_task - 1) / per_task), 0, [&](size_t b) {
      const int64_t i0 = static_cast<int64_t>(b) * per_task, i1 = std::min(count, i0 + per_task);
      for (int64_t i = i0; i < i1; ++i) weight.DecodeRows(rows[i], rows[i] + 1, out + i * cols);
    });
  }

 private:
  EncodedWeight weight_;
};

// ---------------------------------------------------------------------------------------------
// VQLSTM, VQGRU, VQRNN: V (D, G*H, I+H) decoded for the call and split into W (D, G*H, I) and
// R (D, G*H, H), the standard op run on them with every attribute and optional input.
struct LSTMForm {
  static constexpr const char* kName = "VQLSTM";
  static constexpr const char* kOp = "LSTM";
  static constexpr size_t kOutputs = 3;
};
struct GRUForm {
  static constexpr const char* kName = "VQGRU";
  static constexpr const char* kOp = "GRU";
  static constexpr size_t kOutputs = 2;
};
struct RNNForm {
  static constexpr const char* kName = "VQRNN";
  static constexpr const char* kOp = "RNN";
  static constexpr size_t kOutputs = 2;
};

template <typename Form>
class RecurrentKernel {
 public:
  static constexpr const char* kName = Form::kName;
  RecurrentKernel(const OrtApi&, const OrtKernelInfo* raw) : weight_(Ort::ConstKernelInfo(raw), 1) {
    Ort::ConstKernelInfo info(raw);
    hidden_ = IntAttr(info, "hidden_size", 0);
    layout_ = IntAttr(info, "layout", 0);
    OpAttributes attrs;
    attrs.CopyFloats(info, "activation_alpha");
    attrs.CopyFloats(info, "activation_beta");
    std::vector<std::string> activations = StringsAttr(info, "activations");
    if (activations.empty() && std::strcmp(Form::kOp, "RNN") == 0) {
      // onnxruntime's RNN kernel wants them listed; the ONNX default is Tanh per direction
      activations.assign(StringAttr(info, "direction", "forward") == "bidirectional" ? 2 : 1, "Tanh");
    }
    attrs.SetStrings("activations", activations);
    attrs.CopyFloat(info, "clip");
    attrs.SetString("direction", StringAttr(info, "direction", "forward"));  // invoked ops get no defaults
    attrs.SetInt("hidden_size", hidden_);
    attrs.SetInt("layout", layout_);
    if (std::strcmp(Form::kOp, "LSTM") == 0) attrs.SetInt("input_forget", IntAttr(info, "input_forget", 0));
    if (std::strcmp(Form::kOp, "GRU") == 0) {
      attrs.SetInt("linear_before_reset", IntAttr(info, "linear_before_reset", 0));
    }
    optional_ = info.GetInputCount() - weight_.next_input();
    for (size_t i = 0; i < Form::kOutputs; ++i) {
      used_[i] = i < info.GetOutputCount() && !info.GetOutputName(i).empty();
    }
    const char* type_names[] = {"T", "T1"};
    ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32};
    op_ = Ort::Op::Create(info, Form::kOp, "", 14, type_names, types, 2, attrs.values().data(), attrs.values().size(),
                          3 + optional_, Form::kOutputs);
  }

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext context(raw);
    std::optional<EncodedWeight> bound;
    const EncodedWeight& weight = weight_.ForCall(context, bound);
    const std::vector<int64_t>& v_shape = weight.weight_shape();
    const int64_t dirs = v_shape[0], units = v_shape[1], width = v_shape[2];
    const int64_t input_size = width - hidden_;
    Scratch dense(static_cast<size_t>(Numel(v_shape)));
    DecodeAll(weight, false, dense.data(), context);
    Scratch w(static_cast<size_t>(dirs * units * input_size)), r(static_cast<size_t>(dirs * units * hidden_));
    for (int64_t row = 0; row < dirs * units; ++row) {
      const float* v = dense.data() + row * width;
      std::memcpy(w.data() + row * input_size, v, static_cast<size_t>(input_size) * sizeof(float));
      std::memcpy(r.data() + row * hidden_, v + input_size, static_cast<size_t>(hidden_) * sizeof(float));
    }
    Ort::Value w_value = WrapFloats(w.data(), {dirs, units, input_size});
    Ort::Value r_value = WrapFloats(r.data(), {dirs, units, hidden_});
    Ort::ConstValue x = context.GetInput(0);
    std::vector<int64_t> x_shape = ShapeOf(x);
    const int64_t seq = layout_ ? x_shape[1] : x_shape[0], batch = layout_ ? x_shape[0] : x_shape[1];
    std::vector<const OrtValue*> inputs = {x, w_value, r_value};
    for (size_t i = 0; i < optional_; ++i) inputs.push_back(context.GetInput(weight.next_input() + i));
    std::vector<int64_t> y_shape = layout_ ? std::vector<int64_t>{batch, seq, dirs, hidden_}
                                           : std::vector<int64_t>{seq, dirs, batch, hidden_};
    std::vector<int64_t> state_shape = layout_ ? std::vector<int64_t>{batch, dirs, hidden_}
                                               : std::vector<int64_t>{dirs, batch, hidden_};
    // The invoked op writes every output: those the node leaves unnamed go to scratch.
    std::vector<OrtValue*> outputs(Form::kOutputs, nullptr);
    std::vector<std::unique_ptr<Scratch>> unused;
    std::vector<Ort::Value> unused_values;
    for (size_t i = 0; i < Form::kOutputs; ++i) {
      const std::vector<int64_t>& shape = i == 0 ? y_shape : state_shape;
      if (used_[i]) {
        outputs[i] = context.GetOutput(i, shape);
      } else {
        unused.push_back(std::make_unique<Scratch>(static_cast<size_t>(Numel(shape))));
        unused_values.push_back(WrapFloats(unused.back()->data(), shape));
        outputs[i] = unused_values.back();
      }
    }
    op_.Invoke(context.GetOrtKernelContext(), inputs.data(), inputs.size(), outputs.data(), outputs.size());
  }

 private:
  EncodedWeight weight_;
  Ort::Op op_{nullptr};
  int64_t hidden_, layout_;
  size_t optional_;
  bool used_[Form::kOutputs];
};

// ---------------------------------------------------------------------------------------------
// The custom op of a kernel: the activation (or indices) first, then a heterogeneous variadic
// list of the encoded tensors and the consumer's optional inputs (their number and meaning are
// the node's `extra_inputs`), one float output.
//
// Recurrent ops (Outputs > 1) may omit an optional input in the middle (sequence_lens but not
// initial_h), which a variadic list cannot hold: they declare optional slots instead, as many as
// the extras and the op's optional inputs can fill.
template <typename Kernel, ONNXTensorElementDataType FirstType, size_t Outputs = 1>
struct VQOp : Ort::CustomOpBase<VQOp<Kernel, FirstType, Outputs>, Kernel, true> {
  static constexpr size_t kSlots = 3 + 3 + 5;  // X, codes, codebook; 3 extras; LSTM's 5 optional inputs
  VQOp() { OrtCustomOp::version = kOrtApiVersion; }  // no field newer than that API is set

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(api, info);
      return nullptr;
    } catch (const std::exception& e) {
      return StatusOf(e);
    }
  }
  const char* GetName() const { return Kernel::kName; }
  size_t GetInputTypeCount() const { return Outputs == 1 ? 2 : kSlots; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? FirstType : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    if (Outputs > 1) return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_VARIADIC;
  }
  int GetVariadicInputMinArity() const { return 2; }
  bool GetVariadicInputHomogeneity() const { return false; }
  size_t GetOutputTypeCount() const { return Outputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  // A recurrent node may leave any of its outputs unnamed (unused).
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t) const {
    return Outputs == 1 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

// Kernels report errors as statuses (an exception must not cross the C API).
template <typename Kernel>
struct Checked : Kernel {
  using Kernel::Kernel;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Kernel::Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return StatusOf(e);
    }
  }
};

}  // namespace
}  // namespace onnxvq

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace onnxvq;
  const OrtApi* api = api_base->GetApi(kOrtApiVersion);
  if (api == nullptr) {  // too old an onnxruntime: say so through the first API, which all have
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "onnxvq's kernels need onnxruntime 1.20 or newer");
  }
  Ort::InitApi(api);
  try {
    static Ort::CustomOpDomain domain{"ai.onnxvq"};
    static VQOp<Checked<GemmKernel>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> gemm;
    static VQOp<Checked<MatMulKernel>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> matmul;
    static VQOp<Checked<ConvKernel<false>>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> conv;
    static VQOp<Checked<ConvKernel<true>>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> conv_transpose;
    static VQOp<Checked<GatherKernel>, ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED> gather;
    static VQOp<Checked<RecurrentKernel<LSTMForm>>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 3> lstm;
    static VQOp<Checked<RecurrentKernel<GRUForm>>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 2> gru;
    static VQOp<Checked<RecurrentKernel<RNNForm>>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 2> rnn;
    static bool added = false;
    if (!added) {
      for (OrtCustomOp* op : std::initializer_list<OrtCustomOp*>{&gemm, &matmul, &conv, &conv_transpose, &gather,
                                                                  &lstm, &gru, &rnn, PWLUCustomOp()}) {
        domain.Add(op);
      }
      added = true;
    }
    Ort::UnownedSessionOptions(options).Add(domain);
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}
