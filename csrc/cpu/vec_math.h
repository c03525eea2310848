// Math for CPU hot loops that the compiler can vectorise, and the ISA dispatch that lets it use
// AVX2 when the running CPU has it. libm's expf is a scalar call, so a loop calling it is never
// vectorised; `vexp` below is branch-free arithmetic that GCC/Clang turn into SIMD code.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rk {
namespace cpu {

#if defined(__GNUC__)
#define RK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RK_ALWAYS_INLINE inline
#endif

RK_ALWAYS_INLINE int32_t float_to_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
RK_ALWAYS_INLINE float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// e^x for float, within 1 ulp of the correctly rounded value for normal results (checked on every
// 16th float of [−103, 88.7]) (Cody-Waite reduction x = k·ln2 + r,
// |r| ≤ ln2/2, a degree-6 polynomial for e^r, then 2^k applied as two factors so that every k in
// [−150, 128] stays a normal float). exp(x ≤ −104) = 0 (as expf, up to the last subnormal),
// exp(+inf) = inf, exp(NaN) = NaN.
RK_ALWAYS_INLINE float vexp(float x) {
  // clamping keeps k in range; NaN fails both tests and flows through the arithmetic
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  // round-to-nearest by adding 1.5·2^23: k then sits in the low mantissa bits of `big`, so the
  // integer comes from the bits (no float → int conversion, which blocks if-conversion as it may trap)
  const float big = xc * 1.44269504088896341f + 12582912.0f;
  const float k = big - 12582912.0f;
  const int32_t ki = float_to_bits(big) - 0x4B400000;
  float r = xc - k * 0.693359375f;  // ln2 split in a short high part and a correction
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t k1 = ki >> 1, k2 = ki - k1;
  // below the clamp the product rounds to exactly 0 (so exp(−inf) = 0 without a second test on x,
  // which GCC would turn into a branch around the whole body)
  return p * bits_to_float((k1 + 127) << 23) * bits_to_float((k2 + 127) << 23);
}
RK_ALWAYS_INLINE double vexp(double x) { return std::exp(x); }

// ISA dispatch: a hot loop is an always-inline template, instantiated once inside a function
// compiled for AVX2+FMA (RK_TARGET_AVX2) and once for the baseline ISA; has_avx2() picks one at run
// time. (GCC only vectorises these loops with -fno-trapping-math: the kernel files set it by pragma.)
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RK_HAVE_ISA_DISPATCH 1
#define RK_TARGET_AVX2 __attribute__((target("avx2,fma")))
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
#define RK_HAVE_ISA_DISPATCH 0
#define RK_TARGET_AVX2
inline bool has_avx2() { return false; }
#endif

}  // namespace cpu
}  // namespace rk
