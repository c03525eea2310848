// CPU kernel of rlhf_kernels::gae: rows in parallel, one reverse scan per row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/vec_math.h"
#include "row_checks.h"

namespace {

// Branch-free: the step is computed at every position and kept only where the mask is set, so rows with
// random holes cost no mispredictions (and garbage at masked positions never reaches a result).
// kDones is a template flag so that rows without dones keep the loop they had before dones existed.
template <bool kDones, typename T>
void gae_row(const T* r, const T* v, const uint8_t* m, const uint8_t* d, T* adv, T* ret, int64_t n, T gamma,
             T lam) {
  T next_v = 0, next_a = 0;
  for (int64_t t = n - 1; t >= 0; --t) {
    T nv = next_v, na = next_a;
    const T a = rk::gae_step(r[t], v[t], kDones && d[t] != 0, gamma, lam, nv, na);
    const bool valid = m[t] != 0;
    next_v = valid ? nv : next_v;
    next_a = valid ? na : next_a;
    adv[t] = rk::select_bits(m[t], a);
    ret[t] = rk::select_bits(m[t], a + v[t]);
  }
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                       const std::optional<at::Tensor>& dones, double gamma, double lam) {
  rk::check_rows("gae", rewards, {values}, mask);
  if (dones) rk::check_flags("gae", "dones", *dones, rewards);
  auto r = rewards.contiguous(), v = values.contiguous(), m = mask.contiguous();
  const at::Tensor d = dones ? dones->contiguous() : at::Tensor();
  auto adv = at::empty_like(r), ret = at::empty_like(r);
  const int64_t T_ = r.dim() ? r.size(-1) : 1, R = T_ ? r.numel() / T_ : 0;
  if (r.numel() == 0) return {adv, ret};
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "gae", [&] {
    const scalar_t* pr = r.const_data_ptr<scalar_t>();
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    const uint8_t* pm = rk::mask_bytes(m);
    const uint8_t* pd = d.defined() ? rk::mask_bytes(d) : nullptr;
    scalar_t* pa = adv.mutable_data_ptr<scalar_t>();
    scalar_t* pt = ret.mutable_data_ptr<scalar_t>();
    const auto g = static_cast<scalar_t>(gamma), l = static_cast<scalar_t>(lam);
    at::parallel_for(0, R, rk::row_grain(T_), [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t o = i * T_;
        if (pd) gae_row<true>(pr + o, pv + o, pm + o, pd + o, pa + o, pt + o, T_, g, l);
        else gae_row<false>(pr + o, pv + o, pm + o, pm, pa + o, pt + o, T_, g, l);
      }
    });
  });
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("gae", &gae); }
