// CUDA kernels of rlhf_kernels::ppo_policy_loss_{fwd,bwd}. Forward: one block per row sums the row's
// loss, ½(logp − old)², ratio, KL and weight sums, the ratio max, valid and clipped counts over its tokens
// (GSPO's row ratio first, by a block reduction); one single-block kernel combines the rows in a fixed
// order (deterministic, no atomics). Backward: one grid-stride elementwise pass for plain PPO, one block per
// row for the GRPO-family arguments (GSPO and per-row advantages need a row reduction).
// Only valid positions are read, so garbage at masked positions cannot reach any result.
// (Its autograd, for every device, is in csrc/autograd.cpp.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "common.h"
#include "cuda/launch.cuh"
#include "cuda/loss_reduce.cuh"

namespace {

using OptTensor = std::optional<at::Tensor>;

// The kernels' arguments; absent optional inputs are null.
template <typename T> struct PolicyDev {
  const T *lp, *old, *adv, *w, *ref;
  const bool* m;
  int64_t L, kl_estimator;
  T cl, ch, dc, kl_coef;
  bool adv_per_row, seq, cispo;
  bool extended() const { return w || ref || adv_per_row || seq || cispo; }
};

// Per-row sums (one block per row). GSPO's row ratio comes first: a block reduction of the row's masked
// log-ratios, whose result every thread holds before the token loop.
template <typename T> __device__ T row_ratio(const PolicyDev<T>& a, int64_t base, int64_t& n_out) {
  T s = 0;
  int64_t n = 0;
  for (int64_t t = threadIdx.x; t < a.L; t += rk::kThreads) {
    const int64_t i = base + t;
    if (a.m[i]) s += a.lp[i] - a.old[i], n += 1;
  }
  s = rk::block_sum(s);
  n = rk::block_sum(n);
  n_out = n;
  return rk::r_exp(n > 0 ? s / T(n) : T(0));
}

template <typename T>
__device__ rk::PolicyToken<T> token_at(const PolicyDev<T>& a, int64_t i, int64_t r, T seq_ratio, T& ratio, T& w) {
  ratio = a.seq ? seq_ratio : rk::r_exp(a.lp[i] - a.old[i]);
  w = a.w ? a.w[i] : T(1);
  const T adv = a.adv_per_row ? a.adv[r] : a.adv[i];
  return rk::policy_token(ratio, a.lp[i], adv, a.cl, a.ch, a.dc, a.cispo);
}

// row_stats[r * 6 + k]: loss sum, ½(logp − old)² sum, ratio sum, ratio max, KL sum, weight sum
template <typename T>
__global__ void policy_rows_kernel(PolicyDev<T> a, T* row_stats, int64_t* row_n, int64_t* row_clip) {
  const int64_t r = blockIdx.x, base = r * a.L;
  int64_t n_row = 0;
  const T seq_ratio = a.seq ? row_ratio(a, base, n_row) : T(1);
  T s = 0, k = 0, rs = 0, rm = 0, tk = 0, ws = 0;
  int64_t n = 0, c = 0;
  for (int64_t t = threadIdx.x; t < a.L; t += rk::kThreads) {
    const int64_t i = base + t;
    if (a.m[i]) {
      T ratio, w;
      const auto tok = token_at(a, i, r, seq_ratio, ratio, w);
      const T d = a.lp[i] - a.old[i];
      T loss = w * tok.loss;
      if (a.ref) {
        const T kl = rk::kl_value(a.lp[i], a.ref[i], a.kl_estimator);
        loss += a.kl_coef * kl;
        tk += kl;
      }
      s += loss;
      k += T(0.5) * d * d;
      rs += ratio;
      rm = rk::r_max(rm, ratio);
      ws += w;
      n += 1;
      c += tok.clipped;
    }
  }
  s = rk::block_sum(s), k = rk::block_sum(k), rs = rk::block_sum(rs), tk = rk::block_sum(tk), ws = rk::block_sum(ws);
  rm = rk::block_max(rm);
  n = rk::block_sum(n), c = rk::block_sum(c);
  if (threadIdx.x == 0) {
    T* o = row_stats + r * 6;
    o[0] = s, o[1] = k, o[2] = rs, o[3] = rm, o[4] = tk, o[5] = ws;
    row_n[r] = n;
    row_clip[r] = c;
  }
}

// One block, fixed order: the loss, each row's token weight (denominator > 0 replaces the divisor) and stats[6].
template <typename T>
__global__ void policy_combine_kernel(const T* row_stats, const int64_t* row_n, const int64_t* row_clip, int64_t R,
                                      int64_t agg, double denominator, T* weight, T* loss, float* stats) {
  int64_t tokens = 0, rows = 0, clipped = 0;
  double sums[5] = {0, 0, 0, 0, 0};  // ½d², ratio, -, KL, weight (index 2 of row_stats is skipped below)
  double rmax = 0;
  for (int64_t i = threadIdx.x; i < R; i += rk::kThreads) {
    tokens += row_n[i], rows += row_n[i] > 0, clipped += row_clip[i];
    const T* o = row_stats + i * 6;
    sums[0] += double(o[1]), sums[1] += double(o[2]), sums[3] += double(o[4]), sums[4] += double(o[5]);
    rmax = rk::r_max(rmax, double(o[3]));
  }
  tokens = rk::block_sum(tokens), rows = rk::block_sum(rows), clipped = rk::block_sum(clipped);
  for (double& v : sums) v = rk::block_sum(v);
  rmax = rk::block_max(rmax);
  const T tot = denominator > 0 ? T(denominator) : T(tokens), nrows = denominator > 0 ? T(denominator) : T(rows);
  double acc = 0;
  for (int64_t i = threadIdx.x; i < R; i += rk::kThreads) {
    const T w = rk::aggregation_weight<T>(agg, T(row_n[i]), tot, nrows);
    weight[i] = w;
    acc += double(w) * double(row_stats[i * 6]);
  }
  acc = rk::block_sum(acc);
  if (threadIdx.x == 0) {
    const double n = double(tokens > 0 ? tokens : 1);
    *loss = T(acc);
    stats[0] = float(double(clipped) / n);
    stats[1] = float(sums[0] / n);
    stats[2] = float(sums[1] / n);
    stats[3] = float(isnan(sums[1]) ? sums[1] : rmax);  // a NaN ratio: max comparisons would drop it
    stats[4] = float(sums[3] / n);
    stats[5] = float(sums[4] / n);
  }
}

// Plain PPO backward: one grid-stride elementwise pass.
template <typename T>
__global__ void policy_bwd_kernel(const T* g, PolicyDev<T> a, const T* rw, int64_t total, T* g_lp, T* g_adv) {
  const T gv = *g;
  for (int64_t i = rk::global_index(); i < total; i += rk::grid_stride()) {
    T x = 0, y = 0;
    if (a.m[i]) {
      const auto tok = rk::ppo_policy_token(a.lp[i], a.old[i], a.adv[i], a.cl, a.ch, a.dc);
      const T scale = gv * rw[i / a.L];
      x = scale * tok.dloss;
      y = scale * tok.dadv;
    }
    g_lp[i] = x;
    if (g_adv) g_adv[i] = y;
  }
}

// GRPO-family backward: one block per row. GSPO: ∂log s/∂logp_t = m_t / n, so every valid token of the row
// gets Σ_u w_u·∂ℓ_u/∂log s / n, a block reduction before the write pass; per-row advantages reduce their
// gradient over the row likewise.
template <typename T>
__global__ void policy_bwd_rows_kernel(const T* g, PolicyDev<T> a, const T* rw, T* g_lp, T* g_old, T* g_adv) {
  const int64_t r = blockIdx.x, base = r * a.L;
  const T scale = *g * rw[r];
  const bool row_grad = a.seq && !a.cispo;
  int64_t n_row = 0;
  const T seq_ratio = a.seq ? row_ratio(a, base, n_row) : T(1);
  T row_g = 0;
  if (row_grad) {
    for (int64_t t = threadIdx.x; t < a.L; t += rk::kThreads) {
      const int64_t i = base + t;
      if (a.m[i]) {
        T ratio, w;
        const auto tok = token_at(a, i, r, seq_ratio, ratio, w);
        row_g += w * tok.dloss;
      }
    }
    row_g = rk::block_sum(row_g);
    row_g = n_row > 0 ? row_g / T(n_row) : T(0);
  }
  T adv_sum = 0;
  for (int64_t t = threadIdx.x; t < a.L; t += rk::kThreads) {
    const int64_t i = base + t;
    T x = 0, y = 0, z = 0;
    if (a.m[i]) {
      T ratio, w;
      const auto tok = token_at(a, i, r, seq_ratio, ratio, w);
      const T pol = row_grad ? row_g : w * tok.dloss;
      const T kl = a.ref ? a.kl_coef * rk::kl_dlogp(a.lp[i], a.ref[i], a.kl_estimator) : T(0);
      x = scale * (pol + kl);
      y = a.cispo ? T(0) : -scale * pol;
      z = scale * w * tok.dadv;
    }
    g_lp[i] = x;
    if (g_old) g_old[i] = y;
    if (g_adv && !a.adv_per_row) g_adv[i] = z;
    adv_sum += z;
  }
  if (g_adv && a.adv_per_row) {
    adv_sum = rk::block_sum(adv_sum);
    if (threadIdx.x == 0) g_adv[r] = adv_sum;
  }
}

template <typename T>
PolicyDev<T> dev_args(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask,
                      const OptTensor& weights, const OptTensor& ref, double clip_low, double clip_high,
                      double dual_clip, int64_t ratio_level, int64_t loss_type, double kl_coef, int64_t kl_estimator) {
  PolicyDev<T> a{};
  a.lp = logp.const_data_ptr<T>(), a.old = old.const_data_ptr<T>(), a.adv = adv.const_data_ptr<T>();
  a.w = weights ? weights->const_data_ptr<T>() : nullptr;
  a.ref = ref ? ref->const_data_ptr<T>() : nullptr;
  a.m = mask.const_data_ptr<bool>();
  a.L = logp.size(1), a.kl_estimator = kl_estimator;
  a.cl = T(clip_low), a.ch = T(clip_high), a.dc = T(dual_clip), a.kl_coef = T(kl_coef);
  a.adv_per_row = adv.dim() == 1, a.seq = ratio_level == rk::RATIO_SEQUENCE, a.cispo = loss_type == rk::LOSS_CISPO;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd(
    const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask,
    const OptTensor& weights, const OptTensor& ref, double clip_low, double clip_high, double dual_clip, int64_t agg,
    int64_t ratio_level, int64_t loss_type, double kl_coef, int64_t kl_estimator, double denominator) {
  rk::check_ppo_policy_loss(logp, old, adv, mask, weights, ref);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "ppo_policy_loss: mask must be bool");
  c10::cuda::CUDAGuard guard(logp.device());
  const int64_t R = logp.size(0);
  auto loss = at::empty({}, logp.options());
  auto stats = at::empty({6}, logp.options().dtype(at::kFloat));
  auto row_weight = at::empty({R}, logp.options());
  auto row_stats = at::empty({R, 6}, logp.options());
  auto i64 = logp.options().dtype(at::kLong);
  auto row_n = at::empty({R}, i64), row_clip = at::empty({R}, i64);
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(logp.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto a = dev_args<T>(logp, old, adv, mask, weights, ref, clip_low, clip_high, dual_clip, ratio_level,
                               loss_type, kl_coef, kl_estimator);
    if (R > 0) {
      policy_rows_kernel<T><<<static_cast<unsigned>(R), rk::kThreads, 0, stream>>>(
          a, row_stats.mutable_data_ptr<T>(), row_n.mutable_data_ptr<int64_t>(), row_clip.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    policy_combine_kernel<T><<<1, rk::kThreads, 0, stream>>>(
        row_stats.const_data_ptr<T>(), row_n.const_data_ptr<int64_t>(), row_clip.const_data_ptr<int64_t>(), R, agg,
        denominator, row_weight.mutable_data_ptr<T>(), loss.mutable_data_ptr<T>(), stats.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats, row_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_bwd(
    const at::Tensor& grad_loss, const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
    const at::Tensor& mask, const OptTensor& weights, const OptTensor& ref, const at::Tensor& row_weight,
    double clip_low, double clip_high, double dual_clip, int64_t ratio_level, int64_t loss_type, double kl_coef,
    int64_t kl_estimator, bool need_old_grad, bool need_adv_grad) {
  rk::check_ppo_policy_loss(logp, old, adv, mask, weights, ref);
  rk::check_ppo_loss_bwd("ppo_policy_loss_bwd", grad_loss, row_weight, logp);
  c10::cuda::CUDAGuard guard(logp.device());
  auto g_lp = at::empty_like(logp);
  auto g_adv = need_adv_grad ? at::empty_like(adv) : at::empty({0}, adv.options());
  at::Tensor g_old = at::empty({0}, logp.options());
  const int64_t total = logp.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(logp.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto a = dev_args<T>(logp, old, adv, mask, weights, ref, clip_low, clip_high, dual_clip, ratio_level,
                               loss_type, kl_coef, kl_estimator);
    T* ga = need_adv_grad ? g_adv.mutable_data_ptr<T>() : nullptr;
    if (a.extended()) {
      if (need_old_grad) g_old = at::empty_like(logp);
      if (logp.size(0) == 0) return;
      policy_bwd_rows_kernel<T><<<static_cast<unsigned>(logp.size(0)), rk::kThreads, 0, stream>>>(
          grad_loss.const_data_ptr<T>(), a, row_weight.const_data_ptr<T>(), g_lp.mutable_data_ptr<T>(),
          need_old_grad ? g_old.mutable_data_ptr<T>() : nullptr, ga);
    } else {
      if (total == 0) return;
      policy_bwd_kernel<T><<<rk::blocks_for(total), rk::kThreads, 0, stream>>>(
          grad_loss.const_data_ptr<T>(), a, row_weight.const_data_ptr<T>(), total, g_lp.mutable_data_ptr<T>(), ga);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (need_old_grad && g_old.numel() == 0 && logp.numel() > 0) g_old = g_lp.neg();  // plain PPO: −∂ℓ/∂logp
  if (need_old_grad && logp.numel() == 0) g_old = at::empty_like(logp);
  return {g_lp, g_old, g_adv};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
}
