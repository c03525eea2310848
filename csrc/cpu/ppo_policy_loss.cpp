// CPU entry points of rlhf_kernels::ppo_policy_loss_{fwd,bwd}. Forward: the rows' partial sums in
// parallel (cpu/kernels/ppo_policy_loss.cpp), then a serial combine over rows in a fixed order.
// Backward: one parallel pass. (Its autograd, for every device, is in csrc/autograd.cpp.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/aggregate.h"
#include "cpu/kernels.h"

namespace {

template <typename T>
rk::cpu::PolicyArgs<T> args_of(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                               const at::Tensor& mask, double clip_low, double clip_high, double dual_clip) {
  rk::cpu::PolicyArgs<T> a{};
  a.logp = logp.const_data_ptr<T>(), a.old = old.const_data_ptr<T>(), a.adv = adv.const_data_ptr<T>();
  a.mask = rk::mask_bytes(mask);
  a.n = logp.size(1);
  a.clip_low = T(clip_low), a.clip_high = T(clip_high), a.dual_clip = T(dual_clip);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd(
    const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask, double clip_low,
    double clip_high, double dual_clip, int64_t agg) {
  rk::check_ppo_policy_loss(logp, old, adv, mask);
  const int64_t R = logp.size(0);
  auto loss = at::empty({}, logp.options());
  auto f32 = logp.options().dtype(at::kFloat);
  auto clipfrac = at::empty({}, f32), approx_kl = at::empty({}, f32);
  auto row_weight = at::empty({R}, logp.options());
  rk::float_or_double(logp, [&](auto tag) {
    using T = decltype(tag);
    std::vector<rk::cpu::RowPartial<T>> part(R);
    auto a = args_of<T>(logp, old, adv, mask, clip_low, clip_high, dual_clip);
    a.part = part.data();
    auto* fn = rk::cpu::ppo_policy_loss_kernels().fwd.of<T>();
    at::parallel_for(0, R, rk::cpu::loss_row_grain(a.n), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
    double kl = 0;
    for (const auto& p : part) kl += double(p.kl);
    const rk::cpu::Combined c = rk::cpu::combine(agg, part, row_weight.mutable_data_ptr<T>());
    *loss.mutable_data_ptr<T>() = static_cast<T>(c.loss);
    *clipfrac.mutable_data_ptr<float>() = static_cast<float>(c.clipfrac);
    *approx_kl.mutable_data_ptr<float>() = static_cast<float>(rk::cpu::masked_mean(kl, c.tokens));
  });
  return {loss, clipfrac, approx_kl, row_weight};
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logp,
                                                       const at::Tensor& old, const at::Tensor& adv,
                                                       const at::Tensor& mask, const at::Tensor& row_weight,
                                                       double clip_low, double clip_high, double dual_clip,
                                                       bool need_adv_grad) {
  rk::check_ppo_policy_loss(logp, old, adv, mask);
  rk::check_ppo_loss_bwd("ppo_policy_loss_bwd", grad_loss, row_weight, logp);
  auto g_lp = at::empty_like(logp);
  auto g_adv = need_adv_grad ? at::empty_like(adv) : at::empty({0}, adv.options());
  rk::float_or_double(logp, [&](auto tag) {
    using T = decltype(tag);
    auto a = args_of<T>(logp, old, adv, mask, clip_low, clip_high, dual_clip);
    a.grad = grad_loss.item<T>();
    a.row_weight = row_weight.const_data_ptr<T>();
    a.g_logp = g_lp.mutable_data_ptr<T>();
    a.g_adv = need_adv_grad ? g_adv.mutable_data_ptr<T>() : nullptr;
    auto* fn = rk::cpu::ppo_policy_loss_kernels().bwd.of<T>();
    at::parallel_for(0, logp.size(0), rk::cpu::loss_row_grain(a.n), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  });
  return {g_lp, g_adv};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
}
