// Branch-free masked select for the CPU kernels: GCC does not if-convert `m ? x : 0` over a byte
// mask, which keeps such loops scalar; this form vectorises.
#pragma once
#include <cstdint>
#include <cstring>

namespace rk {

// x where m != 0, else +0, through the bit pattern: a masked NaN or inf is dropped (0·x would keep it).
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

}  // namespace rk
