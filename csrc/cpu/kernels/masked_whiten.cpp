// Loops of masked_whiten, compiled once per ISA (cpu/kernels.h): the count, mean and squared deviations
// of one chunk of valid elements (two passes while it sits in L1), and the elementwise
// (x − μ)·rsqrt(var + eps).
#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

constexpr int kLanes = 16;  // independent accumulators the compiler keeps in vector registers

template <typename T> T sum_lanes(T* a) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  return a[0];
}

// Lane j accumulates the elements i ≡ j (mod kLanes): a fixed order whatever the alignment or ISA.
template <typename T> rk::Moments<T> moments(const T* __restrict x, const uint8_t* __restrict m, int64_t n) {
  T acc[kLanes] = {};
  int32_t cnt[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      acc[j] += rk::select_bits(m[i + j], x[i + j]);
      cnt[j] += m[i + j] != 0;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    acc[j] += rk::select_bits(m[i], x[i]);
    cnt[j] += m[i] != 0;
  }
  const int64_t count = sum_lanes(cnt);
  if (count == 0) return {0, T(0), T(0)};
  const T mean = sum_lanes(acc) / T(count);
  T sq[kLanes] = {};
  for (i = 0; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const T d = rk::select_bits(m[i + j], x[i + j] - mean);
      sq[j] += d * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const T d = rk::select_bits(m[i], x[i] - mean);
    sq[j] += d * d;
  }
  return {count, mean, sum_lanes(sq)};
}

template <typename T, bool SHIFT>
void normalize_range(const T* __restrict x, const uint8_t* __restrict m, T* __restrict out, int64_t lo, int64_t hi,
                     T mean, T inv) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    T y = (x[i] - mean) * inv;
    if constexpr (!SHIFT) y = y + mean;
    out[i] = rk::select_bits(m[i], y);
  }
}

template <typename T> void normalize(const WhitenArgs<T>& a, int64_t lo, int64_t hi) {
  if (a.shift_mean) normalize_range<T, true>(a.x, a.mask, a.out, lo, hi, a.mean, a.inv_std);
  else normalize_range<T, false>(a.x, a.mask, a.out, lo, hi, a.mean, a.inv_std);
}

}  // namespace

extern const WhitenKernels masked_whiten = {{&moments<float>, &moments<double>},
                                            {&normalize<float>, &normalize<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
