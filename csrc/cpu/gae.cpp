// CPU entry point of rlhf_kernels::gae: rows in parallel, one reverse scan per row (cpu/kernels/gae.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace {

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                       const std::optional<at::Tensor>& dones, double gamma, double lam) {
  rk::check_gae(rewards, values, mask, dones);
  auto r = rewards.contiguous(), v = values.contiguous(), m = mask.contiguous();
  const at::Tensor d = dones ? dones->contiguous() : at::Tensor();
  auto adv = at::empty_like(r), ret = at::empty_like(r);
  if (r.numel() == 0) return {adv, ret};
  const int64_t n = r.dim() ? r.size(-1) : 1, R = r.numel() / n;
  rk::float_or_double(r, [&](auto tag) {
    using T = decltype(tag);
    rk::cpu::GaeArgs<T> a{r.const_data_ptr<T>(), v.const_data_ptr<T>(), rk::mask_bytes(m),
                          d.defined() ? rk::mask_bytes(d) : nullptr, adv.mutable_data_ptr<T>(),
                          ret.mutable_data_ptr<T>(), n, static_cast<T>(gamma), static_cast<T>(lam)};
    auto* fn = rk::cpu::gae_kernels().rows.of<T>();
    at::parallel_for(0, R, rk::cpu::row_grain(n), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("gae", &gae); }
