// CPU kernels of rlhf_kernels::token_kl_{fwd,bwd}: one elementwise pass each.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <type_traits>

#include "common.h"

namespace {

constexpr int64_t kGrain = 1 << 14;

// Range loops take __restrict pointers and a compile-time estimator so that gcc vectorises them
// (pointers captured by reference in a lambda defeat its alias analysis).
template <typename T, int64_t EST>
void kl_fwd_range(const T* __restrict a, const T* __restrict b, T* __restrict o, int64_t lo, int64_t hi, T c) {
  for (int64_t i = lo; i < hi; ++i) o[i] = rk::clamp_sym(rk::kl_value(a[i], b[i], EST), c);
}

template <typename T, int64_t EST>
void kl_bwd_range(const T* __restrict g, const T* __restrict a, const T* __restrict b, T* __restrict ga,
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

at::Tensor token_kl_fwd(const at::Tensor& logp, const at::Tensor& ref, int64_t est, double clamp) {
  auto out = at::empty_like(logp);
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "token_kl_fwd", [&] {
    const scalar_t* a = logp.const_data_ptr<scalar_t>();
    const scalar_t* b = ref.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t c = static_cast<scalar_t>(clamp);
    with_estimator(est, [&](auto e) {
      at::parallel_for(0, logp.numel(), kGrain, [&](int64_t lo, int64_t hi) {
        kl_fwd_range<scalar_t, decltype(e)::value>(a, b, o, lo, hi, c);
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> token_kl_bwd(const at::Tensor& grad, const at::Tensor& logp,
                                                 const at::Tensor& ref, int64_t est, double clamp) {
  auto g_logp = at::empty_like(logp), g_ref = at::empty_like(ref);
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "token_kl_bwd", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* a = logp.const_data_ptr<scalar_t>();
    const scalar_t* b = ref.const_data_ptr<scalar_t>();
    scalar_t* ga = g_logp.mutable_data_ptr<scalar_t>();
    scalar_t* gb = g_ref.mutable_data_ptr<scalar_t>();
    const scalar_t c = static_cast<scalar_t>(clamp);
    with_estimator(est, [&](auto e) {
      at::parallel_for(0, logp.numel(), kGrain, [&](int64_t lo, int64_t hi) {
        kl_bwd_range<scalar_t, decltype(e)::value>(g, a, b, ga, gb, lo, hi, c);
      });
    });
  });
  return {g_logp, g_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_kl_fwd", &token_kl_fwd);
  m.impl("token_kl_bwd", &token_kl_bwd);
}
