// Shared plumbing of the onnxvq kernel library: the ORT C++ API (every call goes through the
// OrtApi table, initialised by RegisterCustomOps, so the library links against no
// libonnxruntime), attribute readers that tolerate absent attributes, and a scratch buffer for
// transient dense data.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace onnxvq {

// The OrtApi version the library asks for: onnxruntime 1.20, the oldest the project supports.
// Nothing newer than its table is called.
constexpr uint32_t kOrtApiVersion = 20;

[[noreturn]] void Fail(const std::string& message);

// Node attributes, or `fallback` when the node does not set them.
int64_t IntAttr(const Ort::ConstKernelInfo& info, const char* name, int64_t fallback);
float FloatAttr(const Ort::ConstKernelInfo& info, const char* name, float fallback);
std::string StringAttr(const Ort::ConstKernelInfo& info, const char* name, const std::string& fallback);
std::vector<int64_t> IntsAttr(const Ort::ConstKernelInfo& info, const char* name);
std::vector<float> FloatsAttr(const Ort::ConstKernelInfo& info, const char* name);
std::vector<std::string> StringsAttr(const Ort::ConstKernelInfo& info, const char* name);

// Attributes of a standard op created with Ort::Op::Create: copies of the node's own values
// (only those the node sets, so the op's defaults apply to the rest).
class OpAttributes {
 public:
  void CopyInt(const Ort::ConstKernelInfo& info, const char* name);
  void CopyInts(const Ort::ConstKernelInfo& info, const char* name);
  void CopyFloat(const Ort::ConstKernelInfo& info, const char* name);
  void CopyFloats(const Ort::ConstKernelInfo& info, const char* name);
  void CopyString(const Ort::ConstKernelInfo& info, const char* name);
  void CopyStrings(const Ort::ConstKernelInfo& info, const char* name);
  void SetInt(const char* name, int64_t value);
  void SetFloat(const char* name, float value);
  void SetString(const char* name, const std::string& value);
  void SetStrings(const char* name, const std::vector<std::string>& values);  // none: not set
  const std::vector<Ort::OpAttr>& values() const { return attrs_; }

 private:
  std::vector<Ort::OpAttr> attrs_;
};

// A standard ONNX op of onnxruntime's own, float32 (type constraint T), for a kernel to invoke.
Ort::Op CreateStandardOp(const Ort::ConstKernelInfo& info, const char* name, int version, const OpAttributes& attrs,
                         size_t inputs, size_t outputs);

// Float scratch memory for one kernel call (uninitialised). Buffers up to 4 MiB are reused from
// a small per-thread pool (at most 12 MiB kept); larger ones are mapped and unmapped directly, so
// that a decoded weight does not stay in the process's heap (and its RSS) after the call.
class Scratch {
 public:
  explicit Scratch(size_t floats);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() { return data_; }
  size_t size() const { return size_; }

 private:
  float* data_ = nullptr;
  size_t size_ = 0;
  size_t bytes_ = 0;
  size_t capacity_ = 0;
  bool mapped_ = false;
};

// A float tensor over memory the caller owns (inputs and outputs of invoked standard ops).
Ort::Value WrapFloats(float* data, const std::vector<int64_t>& shape);

// Element count of a shape.
int64_t Numel(const std::vector<int64_t>& shape);

}  // namespace onnxvq
