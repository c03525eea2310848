// Helpers for CPU hot loops that the compiler can vectorise: a branch-free masked select, and the ISA
// dispatch that lets a loop use AVX2 when the running CPU has it. (The vectorisable exp is
// rk::r_exp in common.h.)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rk {

// x where m != 0, else +0, through the bit pattern: a masked NaN or inf is dropped (0·x would keep
// it). GCC does not if-convert `m ? x : 0` over a byte mask, which keeps such loops scalar.
inline float select_bits(uint8_t m, float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0u - static_cast<uint32_t>(m != 0);
  std::memcpy(&x, &b, sizeof b);
  return x;
}
inline double select_bits(uint8_t m, double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0ull - static_cast<uint64_t>(m != 0);
  std::memcpy(&x, &b, sizeof b);
  return x;
}

namespace cpu {

#if defined(__GNUC__)
#define RK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RK_ALWAYS_INLINE inline
#endif

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
