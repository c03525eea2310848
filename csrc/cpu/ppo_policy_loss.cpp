// CPU entry points of rlhf_kernels::ppo_policy_loss_{fwd,bwd}. Forward: the rows' partial sums in
// parallel (cpu/kernels/ppo_policy_loss.cpp), then a serial combine over rows in a fixed order.
// Backward: one parallel pass. The GRPO-family arguments take the kernels' second row loop (see there). (Its autograd, for every device, is in csrc/autograd.cpp.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/aggregate.h"
#include "cpu/kernels.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename T>
rk::cpu::PolicyArgs<T> args_of(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                               const at::Tensor& mask, const OptTensor& weights, const OptTensor& ref,
                               double clip_low, double clip_high, double dual_clip, int64_t ratio_level,
                               int64_t loss_type, double kl_coef, int64_t kl_estimator) {
  rk::cpu::PolicyArgs<T> a{};
  a.logp = logp.const_data_ptr<T>(), a.old = old.const_data_ptr<T>(), a.adv = adv.const_data_ptr<T>();
  a.mask = rk::mask_bytes(mask);
  a.n = logp.size(1);
  a.clip_low = T(clip_low), a.clip_high = T(clip_high), a.dual_clip = T(dual_clip);
  a.weights = weights ? weights->const_data_ptr<T>() : nullptr;
  a.ref = ref ? ref->const_data_ptr<T>() : nullptr;
  a.adv_per_row = adv.dim() == 1;
  a.seq_ratio = ratio_level == rk::RATIO_SEQUENCE;
  a.cispo = loss_type == rk::LOSS_CISPO;
  a.kl_estimator = kl_estimator;
  a.kl_coef = T(kl_coef);
  return a;
}

void check_codes(int64_t ratio_level, int64_t loss_type, int64_t kl_estimator) {
  TORCH_CHECK(ratio_level == rk::RATIO_TOKEN || ratio_level == rk::RATIO_SEQUENCE,
              "ppo_policy_loss: unknown ratio_level code ", ratio_level);
  TORCH_CHECK(loss_type == rk::LOSS_PPO || loss_type == rk::LOSS_CISPO, "ppo_policy_loss: unknown loss_type code ",
              loss_type);
  TORCH_CHECK(kl_estimator >= rk::KL_K1 && kl_estimator <= rk::KL_K3, "ppo_policy_loss: unknown kl_estimator code ",
              kl_estimator);
}

// stats[6] (float32): clipfrac, approx_kl, ratio_mean, ratio_max, kl, weight_mean
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd(
    const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask,
    const OptTensor& weights, const OptTensor& ref, double clip_low, double clip_high, double dual_clip, int64_t agg,
    int64_t ratio_level, int64_t loss_type, double kl_coef, int64_t kl_estimator, double denominator) {
  rk::check_ppo_policy_loss(logp, old, adv, mask, weights, ref);
  check_codes(ratio_level, loss_type, kl_estimator);
  const int64_t R = logp.size(0);
  auto loss = at::empty({}, logp.options());
  auto stats = at::empty({6}, logp.options().dtype(at::kFloat));
  auto row_weight = at::empty({R}, logp.options());
  rk::float_or_double(logp, [&](auto tag) {
    using T = decltype(tag);
    std::vector<rk::cpu::RowPartial<T>> part(R);
    auto a = args_of<T>(logp, old, adv, mask, weights, ref, clip_low, clip_high, dual_clip, ratio_level, loss_type,
                        kl_coef, kl_estimator);
    a.part = part.data();
    auto* fn = rk::cpu::ppo_policy_loss_kernels().fwd.of<T>();
    at::parallel_for(0, R, rk::cpu::loss_row_grain(a.n), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
    double kl = 0, ratio_sum = 0, ratio_max = 0, token_kl = 0, weight_sum = 0;
    for (const auto& p : part) {
      kl += double(p.kl), ratio_sum += double(p.ratio_sum), token_kl += double(p.token_kl);
      weight_sum += double(p.weight_sum);
      ratio_max = std::max(ratio_max, double(p.ratio_max));
    }
    const rk::cpu::Combined c = rk::cpu::combine(agg, part, row_weight.mutable_data_ptr<T>(), denominator);
    *loss.mutable_data_ptr<T>() = static_cast<T>(c.loss);
    float* st = stats.mutable_data_ptr<float>();
    st[0] = static_cast<float>(c.clipfrac);
    st[1] = static_cast<float>(rk::cpu::masked_mean(kl, c.tokens));
    st[2] = static_cast<float>(rk::cpu::masked_mean(ratio_sum, c.tokens));
    // a NaN ratio makes the sum NaN (ratios are ≥ 0, so nothing else can); max() comparisons would drop it
    st[3] = static_cast<float>(std::isnan(ratio_sum) ? ratio_sum : ratio_max);
    st[4] = static_cast<float>(rk::cpu::masked_mean(token_kl, c.tokens));
    st[5] = static_cast<float>(rk::cpu::masked_mean(weight_sum, c.tokens));
  });
  return {loss, stats, row_weight};
}

// -> grad_logp, grad_old_logp (empty unless asked for), grad_advantages (empty unless asked for)
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_bwd(
    const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
    const at::Tensor& mask, const OptTensor& weights, const OptTensor& ref, const at::Tensor& row_weight,
    double clip_low, double clip_high, double dual_clip, int64_t ratio_level, int64_t loss_type, double kl_coef,
    int64_t kl_estimator, bool need_old_grad, bool need_adv_grad) {
  rk::check_ppo_policy_loss(logp, old, adv, mask, weights, ref);
  rk::check_ppo_loss_bwd("ppo_policy_loss_bwd", grad_loss, row_weight, logp);
  check_codes(ratio_level, loss_type, kl_estimator);
  auto g_lp = at::empty_like(logp);
  auto g_adv = need_adv_grad ? at::empty_like(adv) : at::empty({0}, adv.options());
  at::Tensor g_old;
  rk::float_or_double(logp, [&](auto tag) {
    using T = decltype(tag);
    auto a = args_of<T>(logp, old, adv, mask, weights, ref, clip_low, clip_high, dual_clip, ratio_level, loss_type,
                        kl_coef, kl_estimator);
    // plain PPO's ∂ℓ/∂old_logp is −∂ℓ/∂logp: formed below, not written by the kernel
    const bool old_by_kernel = need_old_grad && a.extended();
    g_old = old_by_kernel ? at::empty_like(logp) : at::empty({0}, logp.options());
    a.grad = grad_loss.item<T>();
    a.row_weight = row_weight.const_data_ptr<T>();
    a.g_logp = g_lp.mutable_data_ptr<T>();
    a.g_adv = need_adv_grad ? g_adv.mutable_data_ptr<T>() : nullptr;
    a.g_old = old_by_kernel ? g_old.mutable_data_ptr<T>() : nullptr;
    auto* fn = rk::cpu::ppo_policy_loss_kernels().bwd.of<T>();
    at::parallel_for(0, logp.size(0), rk::cpu::loss_row_grain(a.n), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
    if (need_old_grad && !old_by_kernel) g_old = g_lp.neg();
  });
  return {g_lp, g_old, g_adv};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
}
