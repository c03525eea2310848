// Sampler replay (top-k / top-p) arithmetic shared by the CPU and CUDA kernels of logprobs_from_logits.
//
// The kept set of a row is {z >= theta} for one threshold theta per row (ties with a kept token are kept),
// so the kernels find theta first and then run the plain head on the logits with z < theta set to −inf.
// theta is found by bisection over an order-preserving integer key of z (the float's bits, negatives
// reflected), which makes it an exact value of the row, never a rounded midpoint:
//   top-k: the largest key t with #{key >= t} >= k is the k-th largest z (<= 33 passes for float, 65 for double);
//   top-p: over the top-k survivors with mass Z = Σ e^{z−max}, the smallest key t with
//          Σ_{key <= t} e^{z−max} > (1 − p)·Z, i.e. the lowest value whose cumulative probability (summed
//          ascending, its whole group of equal values included) passes 1 − p; the max always qualifies.
// A pass reads the row once; the row accessor decides whether that is memory (CUDA) or a cached buffer (CPU).
#pragma once
#include "common.h"

namespace rk {

// the bits of a float as an integer and back (intrinsics on the device, memcpy on the host)
RK_HD int32_t float_bits(float z) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(z);
#else
  int32_t b;
  std::memcpy(&b, &z, sizeof b);
  return b;
#endif
}
RK_HD int64_t float_bits(double z) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(__double_as_longlong(z));
#else
  int64_t b;
  std::memcpy(&b, &z, sizeof b);
  return b;
#endif
}
RK_HD float bits_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float z;
  std::memcpy(&z, &b, sizeof z);
  return z;
#endif
}
RK_HD double bits_double(int64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double z;
  std::memcpy(&z, &b, sizeof z);
  return z;
#endif
}

// An integer key with the order of z (its bits, negatives reflected); −0 and +0 get the same key.
RK_HD int64_t order_key(float z) {
  const int32_t b = float_bits(z + 0.0f);
  return b >= 0 ? int64_t(b) : int64_t(b ^ 0x7fffffff);
}
RK_HD int64_t order_key(double z) {
  const int64_t b = float_bits(z + 0.0);
  return b >= 0 ? b : (b ^ int64_t(0x7fffffffffffffffLL));
}
RK_HD float key_value(int64_t k, float) { return bits_float(k >= 0 ? int32_t(k) : (int32_t(k) ^ 0x7fffffff)); }
RK_HD double key_value(int64_t k, double) { return bits_double(k >= 0 ? k : (k ^ int64_t(0x7fffffffffffffffLL))); }
// floor((a + b) / 2) without overflow
RK_HD int64_t key_mid(int64_t a, int64_t b) { return (a >> 1) + (b >> 1) + (a & b & 1); }

// The threshold of one row: z(j) gives the scaled logit j, e(j, m) gives e^{z(j) − m} (a buffer or a recompute).
// k <= 0 or k >= V: no top-k; p >= 1: no top-p. Returns −inf when nothing is cut.
template <typename T, typename ZF, typename EF> RK_HD T replay_threshold(const ZF& z, const EF& e, int64_t V, int64_t k, T p) {
  const T ninf = -r_inf<T>();
  T m = ninf;
  for (int64_t j = 0; j < V; ++j) m = r_max(m, z(j));
  if (m == ninf || m != m) return ninf;
  const int64_t all = order_key(ninf);
  int64_t lo = all;
  if (k > 0 && k < V) {
    int64_t hi = order_key(m) + 1;  // invariant: #{key >= lo} >= k > #{key >= hi}
    while (lo + 1 < hi) {
      const int64_t mid = key_mid(lo, hi);
      int64_t c = 0;
      for (int64_t j = 0; j < V; ++j) c += order_key(z(j)) >= mid;
      if (c >= k) lo = mid;
      else hi = mid;
    }
  }
  if (p < T(1)) {
    T Z = T(0);
    for (int64_t j = 0; j < V; ++j)
      if (order_key(z(j)) >= lo) Z += e(j, m);
    const T target = (T(1) - p) * Z;
    int64_t a = lo - 1, b = order_key(m);  // invariant: mass(<= a) <= target < mass(<= b)
    while (a + 1 < b) {
      const int64_t mid = key_mid(a, b);
      T s = T(0);
      for (int64_t j = 0; j < V; ++j) {
        const int64_t kj = order_key(z(j));
        if (kj >= lo && kj <= mid) s += e(j, m);
      }
      if (s > target) b = mid;
      else a = mid;
    }
    lo = b;
  }
  return lo == all ? ninf : key_value(lo, T(0));
}

}  // namespace rk
