// CPU entry point of rlhf_kernels::token_rewards: rows in parallel (cpu/kernels/token_rewards.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace {

at::Tensor token_rewards(const at::Tensor& score, const at::Tensor& mask, const std::optional<at::Tensor>& logp,
                         const std::optional<at::Tensor>& ref_logp, double kl_coef, int64_t kl_estimator,
                         const std::optional<at::Tensor>& dense, double dense_coef, double dense_clip,
                         bool score_after_eos) {
  const bool use_kl = kl_coef != 0.0;
  rk::check_token_rewards(score, mask, logp, ref_logp, use_kl, kl_estimator, dense);
  auto out = at::empty(mask.sizes(), score.options());
  if (mask.numel() == 0) return out;
  const int64_t n = mask.size(-1), R = mask.numel() / n;
  auto s = score.contiguous(), m = mask.contiguous();
  const at::Tensor lp = use_kl ? logp->contiguous() : at::Tensor(), rf = use_kl ? ref_logp->contiguous() : at::Tensor();
  const at::Tensor dn = dense ? dense->contiguous() : at::Tensor();
  rk::float_or_double(s, [&](auto tag) {
    using T = decltype(tag);
    rk::cpu::RewardArgs<T> a{s.const_data_ptr<T>(),
                             use_kl ? lp.const_data_ptr<T>() : nullptr,
                             use_kl ? rf.const_data_ptr<T>() : nullptr,
                             dn.defined() ? dn.const_data_ptr<T>() : nullptr,
                             rk::mask_bytes(m),
                             out.mutable_data_ptr<T>(),
                             n,
                             kl_estimator,
                             static_cast<T>(kl_coef),
                             static_cast<T>(dense_coef),
                             static_cast<T>(dense_clip),
                             score_after_eos};
    auto* fn = rk::cpu::token_rewards_kernels().rows.of<T>();
    at::parallel_for(0, R, rk::cpu::row_grain(n), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("token_rewards", &token_rewards); }
