// CPU entry points of rlhf_kernels::dpo_loss_{fwd,bwd}: checks, outputs, the elementwise loops of
// cpu/kernels/dpo_loss.cpp in parallel. (Its autograd, for every device, is in csrc/autograd.cpp.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"

namespace {

constexpr int64_t kDpoGrain = 1 << 12;

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_fwd(const at::Tensor& c, const at::Tensor& r,
                                                            const at::Tensor& cr, const at::Tensor& rr, double beta,
                                                            int64_t type, double eps) {
  rk::check_dpo_loss(c, r, cr, rr);
  auto losses = at::empty_like(c), c_rew = at::empty_like(c), r_rew = at::empty_like(c);
  rk::float_or_double(c, [&](auto tag) {
    using T = decltype(tag);
    rk::cpu::DpoArgs<T> a{};
    a.c = c.const_data_ptr<T>(), a.r = r.const_data_ptr<T>();
    a.cr = cr.const_data_ptr<T>(), a.rr = rr.const_data_ptr<T>();
    a.losses = losses.mutable_data_ptr<T>(), a.c_rew = c_rew.mutable_data_ptr<T>(), a.r_rew = r_rew.mutable_data_ptr<T>();
    a.beta = static_cast<T>(beta), a.eps = static_cast<T>(eps), a.type = type;
    auto* fn = rk::cpu::dpo_loss_kernels().fwd.of<T>();
    at::parallel_for(0, c.numel(), kDpoGrain, [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  });
  return {losses, c_rew, r_rew};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_bwd(const at::Tensor& grad, const at::Tensor& c,
                                                                        const at::Tensor& r, const at::Tensor& cr,
                                                                        const at::Tensor& rr, double beta,
                                                                        int64_t type, double eps) {
  rk::check_dpo_loss(c, r, cr, rr, &grad);
  auto gc = at::empty_like(c), gr = at::empty_like(c), gcr = at::empty_like(c), grr = at::empty_like(c);
  rk::float_or_double(c, [&](auto tag) {
    using T = decltype(tag);
    rk::cpu::DpoArgs<T> a{};
    a.grad = grad.const_data_ptr<T>(), a.c = c.const_data_ptr<T>(), a.r = r.const_data_ptr<T>();
    a.cr = cr.const_data_ptr<T>(), a.rr = rr.const_data_ptr<T>();
    a.gc = gc.mutable_data_ptr<T>(), a.gr = gr.mutable_data_ptr<T>();
    a.gcr = gcr.mutable_data_ptr<T>(), a.grr = grr.mutable_data_ptr<T>();
    a.beta = static_cast<T>(beta), a.eps = static_cast<T>(eps), a.type = type;
    auto* fn = rk::cpu::dpo_loss_kernels().bwd.of<T>();
    at::parallel_for(0, c.numel(), kDpoGrain, [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  });
  return {gc, gr, gcr, grr};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("dpo_loss_fwd", &dpo_loss_fwd);
  m.impl("dpo_loss_bwd", &dpo_loss_bwd);
}
