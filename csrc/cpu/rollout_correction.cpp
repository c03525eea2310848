// CPU kernel of rlhf_kernels::rollout_correction: rows in parallel. At the sequence and geometric levels a
// first pass sums the row's masked log-ratios; one pass then writes weights and mask_out and the row's stats
// partials. The partials are combined in row order in double, so the stats do not depend on the thread count.
#pragma GCC optimize("no-trapping-math")
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "common.h"
#include "cpu/parallel.h"
#include "cpu/vec_math.h"

namespace {

template <typename T> struct RowStats {
  T k1 = 0, k3 = 0, w = 0;
  int64_t n = 0, kept = 0;
};

template <typename T>
RowStats<T> correct_row(const T* __restrict o, const T* __restrict q, const uint8_t* __restrict m, T* __restrict w,
                        uint8_t* __restrict mo, int64_t n, int64_t level, int64_t mode, T low, T high) {
  T row_lr = 0;
  if (level != rk::RC_TOKEN) {
    T sum = 0;
    int64_t cnt = 0;
#pragma omp simd reduction(+ : sum, cnt)
    for (int64_t t = 0; t < n; ++t) {
      sum += rk::select_bits(m[t], o[t] - q[t]);  // a masked NaN or inf is dropped
      cnt += m[t] != 0;
    }
    row_lr = level == rk::RC_GEOMETRIC ? sum / T(cnt > 0 ? cnt : 1) : sum;
  }
  const T row_ratio = rk::r_exp(row_lr);
  const bool token = level == rk::RC_TOKEN;
  T k1 = 0, k3 = 0, ws = 0;
  int64_t cnt = 0, kept = 0;
#pragma omp simd reduction(+ : k1, k3, ws, cnt, kept)
  for (int64_t t = 0; t < n; ++t) {
    const T d = rk::select_bits(m[t], o[t] - q[t]);
    const T ratio = token ? rk::r_exp(d) : row_ratio;
    int32_t keep;
    const T wt = rk::rc_weight(ratio, m[t] != 0, mode, low, high, keep);
    w[t] = wt;
    mo[t] = static_cast<uint8_t>(keep);
    k1 += d;
    k3 += rk::kl_value(d, T(0), rk::KL_K3);  // token_kl k3 of (old, rollout): 0 at masked positions (d = 0)
    ws += wt;
    cnt += m[t] != 0;
    kept += keep;
  }
  RowStats<T> st;
  st.k1 = k1;
  st.k3 = k3;
  st.w = ws;
  st.n = cnt;
  st.kept = kept;
  return st;
}

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
  const int64_t R = o.size(0), T_ = o.size(1);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "rollout_correction", [&] {
    using T = scalar_t;
    const T* po = o.const_data_ptr<T>();
    const T* pq = q.const_data_ptr<T>();
    const uint8_t* pm = rk::mask_bytes(m);
    T* pw = w.mutable_data_ptr<T>();
    auto* pmo = static_cast<uint8_t*>(mo.data_ptr());
    std::vector<RowStats<T>> part(R);
    const T lo = static_cast<T>(low), hi = static_cast<T>(high);
    at::parallel_for(0, R, rk::cpu::row_grain(T_), [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const int64_t off = i * T_;
        part[i] = correct_row(po + off, pq + off, pm + off, pw + off, pmo + off, T_, level, mode, lo, hi);
      }
    });
    double k1 = 0, k3 = 0, ws = 0;
    int64_t n = 0, kept = 0;
    for (const auto& p : part) {
      k1 += double(p.k1);
      k3 += double(p.k3);
      ws += double(p.w);
      n += p.n;
      kept += p.kept;
    }
    rk::rc_stats(k1, k3, ws, n, kept, stats.mutable_data_ptr<float>());
  });
  return {w, mo, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("rollout_correction", &rollout_correction); }
