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

namespace {

// A list attribute through its C API getter (first the size, then the values), empty when absent.
template <typename T, typename Getter>
std::vector<T> ArrayAttr(const Ort::ConstKernelInfo& info, const char* name, Getter getter) {
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  OrtStatus* status = (api.*getter)(info, name, nullptr, &size);
  if (status != nullptr) {
    api.ReleaseStatus(status);
    return {};
  }
  std::vector<T> values(size);
  if (size) Ort::ThrowOnError((api.*getter)(info, name, values.data(), &size));
  return values;
}

}  // namespace

std::vector<int64_t> IntsAttr(const Ort::ConstKernelInfo& info, const char* name) {
  return ArrayAttr<int64_t>(info, name, &OrtApi::KernelInfoGetAttributeArray_int64);
}

std::vector<float> FloatsAttr(const Ort::ConstKernelInfo& info, const char* name) {
  return ArrayAttr<float>(info, name, &OrtApi::KernelInfoGetAttributeArray_float);
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
  std::vector<int64_t> values = IntsAttr(info, name);
  if (!values.empty()) attrs_.emplace_back(name, values.data(), static_cast<int>(values.size()), ORT_OP_ATTR_INTS);
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
  std::vector<float> values = FloatsAttr(info, name);
  if (!values.empty()) attrs_.emplace_back(name, values.data(), static_cast<int>(values.size()), ORT_OP_ATTR_FLOATS);
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

Ort::Op CreateStandardOp(const Ort::ConstKernelInfo& info, const char* name, int version, const OpAttributes& attrs,
                         size_t inputs, size_t outputs) {
  const char* type_names[] = {"T"};
  ONNXTensorElementDataType types[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  return Ort::Op::Create(info, name, "", version, type_names, types, 1, attrs.values().data(), attrs.values().size(),
                         inputs, outputs);
}

namespace {

// Buffers up to this size are kept per thread after use and handed to the next Scratch, so a
// kernel called again does not map fresh pages (and fault them in) every call; at most
// kPoolBytes stay kept per thread, whatever the model.
constexpr size_t kPooledBytes = size_t{4} << 20;
constexpr size_t kPoolBytes = size_t{12} << 20;

struct Pool {
  std::vector<std::pair<void*, size_t>> free;  // (buffer, capacity in bytes)
  size_t kept = 0;
  ~Pool() {
    for (auto& entry : free) std::free(entry.first);
  }
};

Pool& ThreadPool() {
  thread_local Pool pool;
  return pool;
}

}  // namespace

Scratch::Scratch(size_t floats) : size_(floats), bytes_(floats * sizeof(float)) {
  if (bytes_ == 0) return;
  if (bytes_ <= kPooledBytes) {
    Pool& pool = ThreadPool();
    // the smallest kept buffer that is large enough
    size_t best = pool.free.size();
    for (size_t i = 0; i < pool.free.size(); ++i) {
      if (pool.free[i].second >= bytes_ && (best == pool.free.size() || pool.free[i].second < pool.free[best].second)) {
        best = i;
      }
    }
    if (best < pool.free.size()) {
      data_ = static_cast<float*>(pool.free[best].first);
      capacity_ = pool.free[best].second;
      pool.kept -= capacity_;
      pool.free.erase(pool.free.begin() + static_cast<std::ptrdiff_t>(best));
    } else {
      data_ = static_cast<float*>(std::malloc(bytes_));
      if (data_ == nullptr) throw std::bad_alloc();
      capacity_ = bytes_;
    }
    return;
  }
  // Larger buffers bypass malloc: glibc raises its mmap threshold after such frees, and the next
  // decoded weight would then stay resident in the heap.
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<float*>(p);
  mapped_ = true;
}

Scratch::~Scratch() {
  if (data_ == nullptr) return;
  if (mapped_) {
    munmap(data_, bytes_);
    return;
  }
  Pool& pool = ThreadPool();
  if (pool.kept + capacity_ <= kPoolBytes) {
    pool.free.emplace_back(data_, capacity_);
    pool.kept += capacity_;
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
