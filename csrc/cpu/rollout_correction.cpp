// CPU entry point of rlhf_kernels::rollout_correction: rows in parallel (cpu/kernels/rollout_correction.cpp),
// then the rows' stats partials combined in row order in double, so the stats do not depend on the thread
// count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rollout_correction(const at::Tensor& old_logp,
                                                                  const at::Tensor& rollout_logp,
                                                                  const at::Tensor& mask, int64_t level, int64_t mode,
                                                                  double low, double high) {
  rk::check_rollout_correction(old_logp, rollout_logp, mask);
  auto o = old_logp.contiguous(), q = rollout_logp.contiguous(), m = mask.contiguous();
  auto w = at::empty_like(o);
  auto mo = at::empty(m.sizes(), m.options().dtype(at::kBool));
  auto stats = at::zeros({4}, o.options().dtype(at::kFloat));
  if (o.numel() == 0) return {w, mo, stats};
  const int64_t R = o.size(0), n = o.size(1);
  rk::float_or_double(o, [&](auto tag) {
    using T = decltype(tag);
    std::vector<rk::cpu::RcRowStats<T>> part(R);
    const rk::cpu::RcArgs<T> a{o.const_data_ptr<T>(), q.const_data_ptr<T>(), rk::mask_bytes(m),
                               w.mutable_data_ptr<T>(), static_cast<uint8_t*>(mo.data_ptr()), part.data(), n, level,
                               mode, static_cast<T>(low), static_cast<T>(high)};
    auto* fn = rk::cpu::rollout_correction_kernels().rows.of<T>();
    at::parallel_for(0, R, rk::cpu::row_grain(n), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
    double k1 = 0, k3 = 0, ws = 0;
    int64_t valid = 0, kept = 0;
    for (const auto& p : part) {
      k1 += double(p.k1);
      k3 += double(p.k3);
      ws += double(p.w);
      valid += p.n;
      kept += p.kept;
    }
    rk::rc_stats(k1, k3, ws, valid, kept, stats.mutable_data_ptr<float>());
  });
  return {w, mo, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("rollout_correction", &rollout_correction); }
