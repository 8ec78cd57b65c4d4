#include "common.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <new>

namespace onnxvq {

void Fail(const std::string& message) { ORT_CXX_API_THROW(message, ORT_INVALID_ARGUMENT); }

int64_t IntAttr(const Ort::ConstKernelInfo& info, const char* name, int64_t fallback) {
  int64_t value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  return value;
}

float FloatAttr(const Ort::ConstKernelInfo& info, const char* name, float fallback) {
  float value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  return value;
}

std::string StringAttr(const Ort::ConstKernelInfo& info, const char* name, const std::string& fallback) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return fallback;
  }
  std::string value(size, '\0');
  Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, name, value.data(), &size));
  value.resize(size > 0 ? size - 1 : 0);  // the size counts the terminating NUL
  return value;
}

std::vector<int64_t> IntsAttr(const Ort::ConstKernelInfo& info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return {};
  }
  std::vector<int64_t> values(size);
  if (size) Ort::ThrowOnError(api.KernelInfoGetAttributeArray_int64(info, name, values.data(), &size));
  return values;
}

std::vector<float> FloatsAttr(const Ort::ConstKernelInfo& info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttributeArray_float(info, name, nullptr, &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return {};
  }
  std::vector<float> values(size);
  if (size) Ort::ThrowOnError(api.KernelInfoGetAttributeArray_float(info, name, values.data(), &size));
  return values;
}

std::vector<std::string> StringsAttr(const Ort::ConstKernelInfo& info, const char* name) {
  // The C API has no string-list getter before 1.2x; onnxvq's recurrent ops carry
  // `activations` as a list, read through the C++ wrapper, which throws when it is absent.
  try {
    return info.GetAttributes<std::string>(name);
  } catch (const Ort::Exception&) {
    return {};
  }
}

void OpAttributes::CopyInt(const Ort::ConstKernelInfo& info, const char* name) {
  int64_t value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return;
  }
  SetInt(name, value);
}

void OpAttributes::SetInt(const char* name, int64_t value) {
  attrs_.emplace_back(name, &value, 1, ORT_OP_ATTR_INT);
}

void OpAttributes::SetFloat(const char* name, float value) {
  attrs_.emplace_back(name, &value, 1, ORT_OP_ATTR_FLOAT);
}

void OpAttributes::SetString(const char* name, const std::string& value) {
  attrs_.emplace_back(name, value.data(), static_cast<int>(value.size()), ORT_OP_ATTR_STRING);
}

void OpAttributes::CopyInts(const Ort::ConstKernelInfo& info, const char* name) {
  size_t size = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return;
  }
  std::vector<int64_t> values = IntsAttr(info, name);
  attrs_.emplace_back(name, values.data(), static_cast<int>(values.size()), ORT_OP_ATTR_INTS);
}

void OpAttributes::CopyFloat(const Ort::ConstKernelInfo& info, const char* name) {
  float value = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_float(info, name, &value);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return;
  }
  attrs_.emplace_back(name, &value, 1, ORT_OP_ATTR_FLOAT);
}

void OpAttributes::CopyFloats(const Ort::ConstKernelInfo& info, const char* name) {
  size_t size = 0;
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttributeArray_float(info, name, nullptr, &size);
  if (status != nullptr) {
    Ort::GetApi().ReleaseStatus(status);
    return;
  }
  std::vector<float> values = FloatsAttr(info, name);
  attrs_.emplace_back(name, values.data(), static_cast<int>(values.size()), ORT_OP_ATTR_FLOATS);
}

void OpAttributes::CopyString(const Ort::ConstKernelInfo& info, const char* name) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* status = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return;
  }
  std::string value = StringAttr(info, name, "");
  attrs_.emplace_back(name, value.data(), static_cast<int>(value.size()), ORT_OP_ATTR_STRING);
}

void OpAttributes::CopyStrings(const Ort::ConstKernelInfo& info, const char* name) {
  SetStrings(name, StringsAttr(info, name));
}

void OpAttributes::SetStrings(const char* name, const std::vector<std::string>& values) {
  if (values.empty()) return;
  std::vector<const char*> pointers;
  for (const std::string& v : values) pointers.push_back(v.c_str());
  attrs_.emplace_back(name, pointers.data(), static_cast<int>(pointers.size()), ORT_OP_ATTR_STRINGS);
}

Scratch::Scratch(size_t floats) : size_(floats), bytes_(floats * sizeof(float)) {
  if (bytes_ == 0) return;
  // Buffers of 1 MiB and more bypass malloc: glibc raises its mmap threshold after such frees,
  // and the next decoded weight would then stay resident in the heap.
  if (bytes_ >= (1u << 20)) {
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = static_cast<float*>(p);
    mapped_ = true;
  } else {
    data_ = static_cast<float*>(std::malloc(bytes_));
    if (data_ == nullptr) throw std::bad_alloc();
  }
}

Scratch::~Scratch() {
  if (data_ == nullptr) return;
  if (mapped_) {
    munmap(data_, bytes_);
  } else {
    std::free(data_);
  }
}

Ort::Value WrapFloats(float* data, const std::vector<int64_t>& shape) {
  // Never released: a static's destructor could run after onnxruntime has gone at exit.
  static const Ort::MemoryInfo* cpu = new Ort::MemoryInfo(Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault));
  return Ort::Value::CreateTensor<float>(*cpu, data, static_cast<size_t>(Numel(shape)), shape.data(), shape.size());
}

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

}  // namespace onnxvq
