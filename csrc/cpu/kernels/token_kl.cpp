// Loops of token_kl, compiled once per ISA (cpu/kernels.h): one elementwise pass each way.
#include <type_traits>

#include "cpu/kernels.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

// __restrict pointers and a compile-time estimator, so that GCC vectorises the loops.
template <typename T, int64_t EST>
void kl_fwd(const T* __restrict a, const T* __restrict b, T* __restrict o, int64_t lo, int64_t hi, T c) {
  for (int64_t i = lo; i < hi; ++i) o[i] = rk::clamp_sym(rk::kl_value(a[i], b[i], EST), c);
}

template <typename T, int64_t EST>
void kl_bwd(const T* __restrict g, const T* __restrict a, const T* __restrict b, T* __restrict ga,
            T* __restrict gb, int64_t lo, int64_t hi, T c) {
  for (int64_t i = lo; i < hi; ++i) {
    T d = rk::clamp_passes(rk::kl_value(a[i], b[i], EST), c) ? g[i] * rk::kl_dlogp(a[i], b[i], EST) : T(0);
    ga[i] = d;
    gb[i] = -d;
  }
}

template <typename F> void with_estimator(int64_t est, F&& f) {
  switch (est) {
    case rk::KL_K1: f(std::integral_constant<int64_t, rk::KL_K1>{}); break;
    case rk::KL_K2: f(std::integral_constant<int64_t, rk::KL_K2>{}); break;
    default: f(std::integral_constant<int64_t, rk::KL_K3>{});
  }
}

template <typename T> void fwd(const KlArgs<T>& a, int64_t lo, int64_t hi) {
  with_estimator(a.estimator, [&](auto e) { kl_fwd<T, decltype(e)::value>(a.logp, a.ref, a.out, lo, hi, a.clamp); });
}

template <typename T> void bwd(const KlArgs<T>& a, int64_t lo, int64_t hi) {
  with_estimator(a.estimator, [&](auto e) {
    kl_bwd<T, decltype(e)::value>(a.grad, a.logp, a.ref, a.g_logp, a.g_ref, lo, hi, a.clamp);
  });
}

}  // namespace

extern const TokenKlKernels token_kl = {{&fwd<float>, &fwd<double>}, {&bwd<float>, &bwd<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
