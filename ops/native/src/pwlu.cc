// PWLU: Y = f_c(X) elementwise, f_c the piecewise-linear function of X's channel c (ops/pwlu.py
// states the math; the kernel computes what the function body computes, in float32, to within a
// few roundings: tests/test_native_pwlu.py).
//
// X is seen as (outer, C, inner), C the size of P's first axis at X's axis a = rank(X) - rank(P)
// and inner = prod(X.shape[a+1:]) (C = 1: one run over the whole tensor). The work is cut into
// blocks of contiguous elements spread over the session's threads; a block walks its runs of one
// channel (inner elements each) with that channel's constants held in registers, or, when inner
// is 1 (a MatMul output's (C,)), its rows with the channel changing at every element.
#include "pwlu.h"

#include <algorithm>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "matmul.h"  // ParallelFor

namespace onnxvq {
namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::ostringstream text;
  text << "(";
  for (size_t i = 0; i < shape.size(); ++i) text << (i ? ", " : "") << shape[i];
  text << (shape.size() == 1 ? ",)" : ")");
  return text.str();
}

// The C functions of one call, channel-major, with N / interval width precomputed. Each
// channel's knot values and rises sit in a table of `stride` floats (at least kTable, padded), so
// that the vector paths hold a whole table in registers.
constexpr int64_t kTable = 32;

struct Functions {
  int64_t channels = 1, intervals = 1, stride = kTable;
  std::vector<float> lo, hi, scale, k_left, k_right;  // per channel; scale = N / (hi - lo)
  std::vector<float> knots;  // (C, stride): knots[c * stride + j] = Y_j of channel c, j <= N
  std::vector<float> rise;   // (C, stride): rise[c * stride + i] = Y_(i+1) - Y_i, i < N
};

// Checks the parameter shapes against X (the rules of ops.pwlu.check_parameters, plus how P
// meets X) and returns C; Fail()s with what is wrong.
int64_t CheckShapes(const std::vector<int64_t>& x, const std::vector<int64_t>& bounds,
                    const std::vector<int64_t>& knots, const std::vector<int64_t>& slopes) {
  auto fail = [&](const std::string& why) {
    Fail("onnxvq: PWLU " + why + " (X " + ShapeText(x) + ", bounds " + ShapeText(bounds) + ", knots " +
         ShapeText(knots) + ", slopes " + ShapeText(slopes) + ")");
  };
  if (bounds.size() < 2 || bounds[0] != 2 || slopes != bounds || knots.size() != bounds.size() ||
      !std::equal(bounds.begin() + 1, bounds.end(), knots.begin() + 1)) {
    fail("parameters must be bounds (2, *P), knots (N+1, *P), slopes (2, *P) with one P of rank >= 1");
  }
  if (knots[0] < 2) fail("needs at least one interval (two knots)");
  const std::vector<int64_t> p(bounds.begin() + 1, bounds.end());
  if (p[0] < 1 || std::any_of(p.begin() + 1, p.end(), [](int64_t n) { return n != 1; })) {
    fail("parameter shape P must be (1,) or (C, 1, ..., 1), got " + ShapeText(p));
  }
  if (p.size() > x.size()) fail("parameter shape P has a higher rank than X");
  const int64_t channels = p[0];
  if (channels > 1 && x[x.size() - p.size()] != channels) {
    fail("has " + std::to_string(channels) + " channels but X's axis " + std::to_string(x.size() - p.size()) +
         " has size " + std::to_string(x[x.size() - p.size()]));
  }
  return channels;
}

Functions ReadFunctions(int64_t channels, int64_t intervals, const float* bounds, const float* knots,
                        const float* slopes) {
  Functions f;
  const size_t c_count = static_cast<size_t>(channels), n = static_cast<size_t>(intervals);
  f.channels = channels;
  f.intervals = intervals;
  f.stride = std::max<int64_t>(kTable, intervals + 1);
  const size_t stride = static_cast<size_t>(f.stride);
  f.lo.assign(bounds, bounds + c_count);
  f.hi.assign(bounds + c_count, bounds + 2 * c_count);
  f.k_left.assign(slopes, slopes + c_count);
  f.k_right.assign(slopes + c_count, slopes + 2 * c_count);
  f.scale.resize(c_count);
  f.knots.assign(c_count * stride, 0.0f);
  f.rise.assign(c_count * stride, 0.0f);
  for (size_t c = 0; c < c_count; ++c) {
    if (!(f.hi[c] > f.lo[c])) {
      Fail("onnxvq: PWLU bounds must have B_R > B_L; channel " + std::to_string(c) + " has B_L = " +
           std::to_string(f.lo[c]) + ", B_R = " + std::to_string(f.hi[c]));
    }
    // as the body: t = (x - lo) / (hi - lo) * N, here one multiplication by N / (hi - lo)
    f.scale[c] = static_cast<float>(intervals) / (f.hi[c] - f.lo[c]);
    float* y = f.knots.data() + c * stride;
    for (size_t j = 0; j <= n; ++j) y[j] = knots[j * c_count + c];
    for (size_t i = 0; i < n; ++i) f.rise[c * stride + i] = y[i + 1] - y[i];
  }
  return f;
}

// One element: with t = (x - lo) * scale clamped to [0, N] and i = min(floor(t), N - 1),
//   f(x) = Y_i + (t - i) (Y_(i+1) - Y_i) + min(x - lo, 0) K_L + max(x - hi, 0) K_R,
// which is the op's three cases without a branch (below B_L, t = 0 leaves Y_0 and the left
// tail; above B_R, t = N leaves Y_(N-1) + (Y_N - Y_(N-1)), Y_N to a rounding, and the right
// tail). A NaN stays NaN through t (the clamps keep it) while the index reads N - 1. The vector
// paths compute the same, lane by lane.
inline float Apply(float v, float lo, float hi, float scale, float k_left, float k_right, float n, float last,
                   const float* y, const float* rise) {
  const float below = v - lo, above = v - hi;
  float t = below * scale;
  t = t < 0.0f ? 0.0f : t;
  t = t > n ? n : t;
  const float at = t < last ? t : last;  // NaN -> N - 1
  const int32_t i = static_cast<int32_t>(at);  // at >= 0: truncation is floor
  const float inside = y[i] + (t - static_cast<float>(i)) * rise[i];
  const float left = below < 0.0f ? below : 0.0f, right = above > 0.0f ? above : 0.0f;
  return inside + left * k_left + right * k_right;
}

// n elements of channel c; `restrict` and not inlined, so that the compiler vectorises the loop
// (with gathers).
__attribute__((noinline)) void ApplyRunScalar(const Functions& f, int64_t c, const float* __restrict x,
                                               float* __restrict out, int64_t n) {
  const float lo = f.lo[c], hi = f.hi[c], scale = f.scale[c], k_left = f.k_left[c], k_right = f.k_right[c];
  const float intervals = static_cast<float>(f.intervals), last = static_cast<float>(f.intervals - 1);
  const float* __restrict y = f.knots.data() + c * f.stride;
  const float* __restrict rise = f.rise.data() + c * f.stride;
  for (int64_t k = 0; k < n; ++k) out[k] = Apply(x[k], lo, hi, scale, k_left, k_right, intervals, last, y, rise);
}

#if defined(__AVX512F__)
// N <= 31: the channel's knots and rises in two registers each, looked up by a permutation.
void ApplyRunVector(const Functions& f, int64_t c, const float* x, float* out, int64_t n) {
  const float* y = f.knots.data() + c * f.stride;
  const float* r = f.rise.data() + c * f.stride;
  const __m512 y_low = _mm512_loadu_ps(y), y_high = _mm512_loadu_ps(y + 16);
  const __m512 r_low = _mm512_loadu_ps(r), r_high = _mm512_loadu_ps(r + 16);
  const __m512 lo = _mm512_set1_ps(f.lo[c]), hi = _mm512_set1_ps(f.hi[c]), scale = _mm512_set1_ps(f.scale[c]);
  const __m512 k_left = _mm512_set1_ps(f.k_left[c]), k_right = _mm512_set1_ps(f.k_right[c]);
  const __m512 intervals = _mm512_set1_ps(static_cast<float>(f.intervals));
  const __m512 last = _mm512_set1_ps(static_cast<float>(f.intervals - 1)), zero = _mm512_setzero_ps();
  auto lanes = [&](__m512 v) {
    const __m512 below = _mm512_sub_ps(v, lo), above = _mm512_sub_ps(v, hi);
    // max/min return their second operand when either is NaN: t keeps a NaN, `at` drops it
    const __m512 t = _mm512_min_ps(intervals, _mm512_max_ps(zero, _mm512_mul_ps(below, scale)));
    const __m512i i = _mm512_cvttps_epi32(_mm512_min_ps(t, last));
    const __m512 inside = _mm512_fmadd_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(i)),
                                          _mm512_permutex2var_ps(r_low, i, r_high),
                                          _mm512_permutex2var_ps(y_low, i, y_high));
    const __m512 with_left = _mm512_fmadd_ps(_mm512_min_ps(below, zero), k_left, inside);
    return _mm512_fmadd_ps(_mm512_max_ps(above, zero), k_right, with_left);
  };
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(out + k, lanes(_mm512_loadu_ps(x + k)));
  if (k < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - k)) - 1);
    _mm512_mask_storeu_ps(out + k, mask, lanes(_mm512_maskz_loadu_ps(mask, x + k)));
  }
}
constexpr int64_t kVectorIntervals = 31;
#elif defined(__AVX2__) && defined(__FMA__)
// N <= 15: the channel's knots and rises in two registers each, looked up by a permutation of
// each half and a blend.
void ApplyRunVector(const Functions& f, int64_t c, const float* x, float* out, int64_t n) {
  const float* y = f.knots.data() + c * f.stride;
  const float* r = f.rise.data() + c * f.stride;
  const __m256 y_low = _mm256_loadu_ps(y), y_high = _mm256_loadu_ps(y + 8);
  const __m256 r_low = _mm256_loadu_ps(r), r_high = _mm256_loadu_ps(r + 8);
  const __m256 lo = _mm256_set1_ps(f.lo[c]), hi = _mm256_set1_ps(f.hi[c]), scale = _mm256_set1_ps(f.scale[c]);
  const __m256 k_left = _mm256_set1_ps(f.k_left[c]), k_right = _mm256_set1_ps(f.k_right[c]);
  const __m256 intervals = _mm256_set1_ps(static_cast<float>(f.intervals));
  const __m256 last = _mm256_set1_ps(static_cast<float>(f.intervals - 1)), zero = _mm256_setzero_ps();
  const __m256i seven = _mm256_set1_epi32(7);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    const __m256 below = _mm256_sub_ps(v, lo), above = _mm256_sub_ps(v, hi);
    const __m256 t = _mm256_min_ps(intervals, _mm256_max_ps(zero, _mm256_mul_ps(below, scale)));
    const __m256i i = _mm256_cvttps_epi32(_mm256_min_ps(t, last));
    const __m256 high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, seven));
    const __m256 knot = _mm256_blendv_ps(_mm256_permutevar8x32_ps(y_low, i), _mm256_permutevar8x32_ps(y_high, i), high);
    const __m256 rise = _mm256_blendv_ps(_mm256_permutevar8x32_ps(r_low, i), _mm256_permutevar8x32_ps(r_high, i), high);
    const __m256 inside = _mm256_fmadd_ps(_mm256_sub_ps(t, _mm256_cvtepi32_ps(i)), rise, knot);
    const __m256 with_left = _mm256_fmadd_ps(_mm256_min_ps(below, zero), k_left, inside);
    _mm256_storeu_ps(out + k, _mm256_fmadd_ps(_mm256_max_ps(above, zero), k_right, with_left));
  }
  if (k < n) ApplyRunScalar(f, c, x + k, out + k, n - k);
}
constexpr int64_t kVectorIntervals = 15;
#else
void ApplyRunVector(const Functions& f, int64_t c, const float* x, float* out, int64_t n) {
  ApplyRunScalar(f, c, x, out, n);
}
constexpr int64_t kVectorIntervals = 0;
#endif

// n elements of channel c.
void ApplyRun(const Functions& f, int64_t c, const float* x, float* out, int64_t n) {
  if (f.intervals <= kVectorIntervals) {
    ApplyRunVector(f, c, x, out, n);
  } else {
    ApplyRunScalar(f, c, x, out, n);
  }
}

// n elements of channels c0, c0 + 1, ... (inner = 1: the channel is the last axis); not
// inlined, as ApplyRunScalar.
__attribute__((noinline)) void ApplyRow(const Functions& f, int64_t c0, const float* __restrict x,
                                        float* __restrict out, int64_t n) {
  const float intervals = static_cast<float>(f.intervals), last = static_cast<float>(f.intervals - 1);
  const float* __restrict lo = f.lo.data() + c0;
  const float* __restrict hi = f.hi.data() + c0;
  const float* __restrict scale = f.scale.data() + c0;
  const float* __restrict k_left = f.k_left.data() + c0;
  const float* __restrict k_right = f.k_right.data() + c0;
  const float* __restrict y = f.knots.data() + c0 * f.stride;
  const float* __restrict rise = f.rise.data() + c0 * f.stride;
  for (int64_t k = 0; k < n; ++k) {
    out[k] = Apply(x[k], lo[k], hi[k], scale[k], k_left[k], k_right[k], intervals, last, y + k * f.stride,
                   rise + k * f.stride);
  }
}

// Elements [begin, end) of X seen as (outer, C, inner).
void ApplyRange(const Functions& f, int64_t inner, const float* x, float* out, int64_t begin, int64_t end) {
  const int64_t channels = f.channels;
  int64_t at = begin;
  while (at < end) {
    if (inner == 1 && channels > 1) {
      const int64_t c = at % channels, n = std::min(end - at, channels - c);
      ApplyRow(f, c, x + at, out + at, n);
      at += n;
    } else {
      const int64_t run = at / inner, n = std::min(end, (run + 1) * inner) - at;
      ApplyRun(f, run % channels, x + at, out + at, n);
      at += n;
    }
  }
}

class PWLUKernel {
 public:
  PWLUKernel(const OrtApi&, const OrtKernelInfo*) {}

  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext context(raw);
    Ort::ConstValue x = context.GetInput(0), bounds = context.GetInput(1), knots = context.GetInput(2),
                    slopes = context.GetInput(3);
    const std::vector<int64_t> x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> knots_shape = knots.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> bounds_shape = bounds.GetTensorTypeAndShapeInfo().GetShape();
    const int64_t channels =
        CheckShapes(x_shape, bounds_shape, knots_shape, slopes.GetTensorTypeAndShapeInfo().GetShape());
    const Functions f = ReadFunctions(channels, knots_shape[0] - 1, bounds.GetTensorData<float>(),
                                      knots.GetTensorData<float>(), slopes.GetTensorData<float>());
    const int64_t total = Numel(x_shape);
    const size_t axis = x_shape.size() - (bounds_shape.size() - 1);
    int64_t inner = 1;
    for (size_t d = axis + 1; d < x_shape.size(); ++d) inner *= x_shape[d];
    if (channels == 1) inner = std::max<int64_t>(total, 1);
    Ort::UnownedValue y = context.GetOutput(0, x_shape);
    if (total == 0) return;
    const float* in = x.GetTensorData<float>();
    float* out = y.GetTensorMutableData<float>();
    const int64_t per_task = 16384;  // a multiple of every vector width
    ParallelFor(context, static_cast<size_t>((total + per_task - 1) / per_task), 0, [&](size_t b) {
      const int64_t begin = static_cast<int64_t>(b) * per_task;
      ApplyRange(f, inner, in, out, begin, std::min(total, begin + per_task));
    });
  }
};

// Kernels report errors as statuses (an exception must not cross the C API).
struct CheckedPWLUKernel : PWLUKernel {
  using PWLUKernel::PWLUKernel;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
};

struct PWLUOp : Ort::CustomOpBase<PWLUOp, CheckedPWLUKernel, true> {
  PWLUOp() { OrtCustomOp::version = kOrtApiVersion; }  // no field newer than that API is set

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new CheckedPWLUKernel(api, info);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
  const char* GetName() const { return "PWLU"; }
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

OrtCustomOp* PWLUCustomOp() {
  static PWLUOp op;
  return &op;
}

}  // namespace onnxvq
