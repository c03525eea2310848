// CPU entry points of rlhf_kernels::ppo_value_loss_{fwd,bwd}. Forward: the rows' partial sums in
// parallel (cpu/kernels/ppo_value_loss.cpp), then a serial combine over rows in a fixed order.
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
rk::cpu::ValueArgs<T> args_of(const at::Tensor& val, const at::Tensor& old, const at::Tensor& ret,
                              const at::Tensor& mask, double clip) {
  rk::cpu::ValueArgs<T> a{};
  a.values = val.const_data_ptr<T>(), a.old = old.const_data_ptr<T>(), a.ret = ret.const_data_ptr<T>();
  a.mask = rk::mask_bytes(mask);
  a.n = val.size(1);
  a.clip = T(clip);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& val, const at::Tensor& old,
                                                                  const at::Tensor& ret, const at::Tensor& mask,
                                                                  double clip, int64_t agg) {
  rk::check_ppo_value_loss(val, old, ret, mask);
  const int64_t R = val.size(0);
  auto loss = at::empty({}, val.options());
  auto clipfrac = at::empty({}, val.options().dtype(at::kFloat));
  auto row_weight = at::empty({R}, val.options());
  rk::float_or_double(val, [&](auto tag) {
    using T = decltype(tag);
    std::vector<rk::cpu::RowPartial<T>> part(R);
    auto a = args_of<T>(val, old, ret, mask, clip);
    a.part = part.data();
    auto* fn = rk::cpu::ppo_value_loss_kernels().fwd.of<T>();
    at::parallel_for(0, R, rk::cpu::loss_row_grain(a.n), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
    const rk::cpu::Combined c = rk::cpu::combine(agg, part, row_weight.mutable_data_ptr<T>());
    *loss.mutable_data_ptr<T>() = static_cast<T>(c.loss);
    *clipfrac.mutable_data_ptr<float>() = static_cast<float>(c.clipfrac);
  });
  return {loss, clipfrac, row_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& val,
                                                                  const at::Tensor& old, const at::Tensor& ret,
                                                                  const at::Tensor& mask, const at::Tensor& row_weight,
                                                                  double clip, bool need_data_grads) {
  rk::check_ppo_value_loss(val, old, ret, mask);
  rk::check_ppo_loss_bwd("ppo_value_loss_bwd", grad_loss, row_weight, val);
  auto g_v = at::empty_like(val);
  auto g_old = need_data_grads ? at::empty_like(old) : at::empty({0}, old.options());
  auto g_ret = need_data_grads ? at::empty_like(ret) : at::empty({0}, ret.options());
  rk::float_or_double(val, [&](auto tag) {
    using T = decltype(tag);
    auto a = args_of<T>(val, old, ret, mask, clip);
    a.grad = grad_loss.item<T>();
    a.row_weight = row_weight.const_data_ptr<T>();
    a.g_values = g_v.mutable_data_ptr<T>();
    a.g_old = need_data_grads ? g_old.mutable_data_ptr<T>() : nullptr;
    a.g_ret = need_data_grads ? g_ret.mutable_data_ptr<T>() : nullptr;
    auto* fn = rk::cpu::ppo_value_loss_kernels().bwd.of<T>();
    at::parallel_for(0, val.size(0), rk::cpu::loss_row_grain(a.n), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  });
  return {g_v, g_old, g_ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd);
}
