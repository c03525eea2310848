// CPU kernels of rlhf_kernels::token_kl_{fwd,bwd}: one elementwise pass each.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common.h"

namespace {

constexpr int64_t kGrain = 1 << 14;

at::Tensor token_kl_fwd(const at::Tensor& logp, const at::Tensor& ref, int64_t est, double clamp) {
  auto out = at::empty_like(logp);
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "token_kl_fwd", [&] {
    const scalar_t* a = logp.const_data_ptr<scalar_t>();
    const scalar_t* b = ref.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t c = static_cast<scalar_t>(clamp);
    at::parallel_for(0, logp.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) o[i] = rk::clamp_sym(rk::kl_value(a[i], b[i], est), c);
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
    at::parallel_for(0, logp.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        scalar_t d = rk::clamp_passes(rk::kl_value(a[i], b[i], est), c) ? g[i] * rk::kl_dlogp(a[i], b[i], est) : 0;
        ga[i] = d;
        gb[i] = -d;
      }
    });
  });
  return {g_logp, g_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_kl_fwd", &token_kl_fwd);
  m.impl("token_kl_bwd", &token_kl_bwd);
}
