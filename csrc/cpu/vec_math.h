// Helpers for the CPU kernel loops (csrc/cpu/kernels/) that the compiler must vectorise. (The vectorisable
// exp is rk::r_exp in common.h; GCC vectorises these loops only with -fno-trapping-math, which setup.py sets.)
#pragma once
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__GNUC__)
#define RK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RK_ALWAYS_INLINE inline
#endif

namespace rk {

// x where m != 0, else +0, through the bit pattern: a masked NaN or inf is dropped (0·x would keep
// it). GCC does not if-convert `m ? x : 0` over a byte mask, which keeps such loops scalar.
RK_HD float select_bits(uint8_t m, float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0u - static_cast<uint32_t>(m != 0);
  std::memcpy(&x, &b, sizeof b);
  return x;
}
RK_HD double select_bits(uint8_t m, double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0ull - static_cast<uint64_t>(m != 0);
  std::memcpy(&x, &b, sizeof b);
  return x;
}

}  // namespace rk
