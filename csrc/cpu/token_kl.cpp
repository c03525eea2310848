// CPU entry points of rlhf_kernels::token_kl_{fwd,bwd}: checks, outputs, the elementwise loops of
// cpu/kernels/token_kl.cpp in parallel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace {

constexpr int64_t kKlGrain = 1 << 14;

at::Tensor token_kl_fwd(const at::Tensor& logp, const at::Tensor& ref, int64_t est, double clamp) {
  rk::check_token_kl(logp, ref);
  auto out = at::empty_like(logp);
  rk::float_or_double(logp, [&](auto tag) {
    using T = decltype(tag);
    rk::cpu::KlArgs<T> a{nullptr, logp.const_data_ptr<T>(), ref.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
                         nullptr, nullptr, est, static_cast<T>(clamp)};
    auto* fn = rk::cpu::token_kl_kernels().fwd.of<T>();
    at::parallel_for(0, logp.numel(), kKlGrain, [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> token_kl_bwd(const at::Tensor& grad, const at::Tensor& logp,
                                                 const at::Tensor& ref, int64_t est, double clamp) {
  rk::check_token_kl(logp, ref, &grad);
  auto g_logp = at::empty_like(logp), g_ref = at::empty_like(ref);
  rk::float_or_double(logp, [&](auto tag) {
    using T = decltype(tag);
    rk::cpu::KlArgs<T> a{grad.const_data_ptr<T>(), logp.const_data_ptr<T>(), ref.const_data_ptr<T>(), nullptr,
                         g_logp.mutable_data_ptr<T>(), g_ref.mutable_data_ptr<T>(), est, static_cast<T>(clamp)};
    auto* fn = rk::cpu::token_kl_kernels().bwd.of<T>();
    at::parallel_for(0, logp.numel(), kKlGrain, [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  });
  return {g_logp, g_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_kl_fwd", &token_kl_fwd);
  m.impl("token_kl_bwd", &token_kl_bwd);
}
