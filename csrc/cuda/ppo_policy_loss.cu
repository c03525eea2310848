// CUDA kernels of rlhf_kernels::ppo_policy_loss_{fwd,bwd}. Forward: one block per row sums the row's
// loss, ½(logp − old)², valid and clipped counts over its tokens; one single-block kernel combines
// the rows in a fixed order (deterministic, no atomics). Backward: one grid-stride elementwise pass.
// Only valid positions are read, so garbage at masked positions cannot reach any result.
// (Its autograd, for every device, is in csrc/autograd.cpp.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "common.h"
#include "cuda/launch.cuh"
#include "cuda/loss_reduce.cuh"

namespace {

template <typename T>
__global__ void policy_rows_kernel(const T* lp, const T* old, const T* adv, const bool* m, int64_t L, T cl, T ch,
                                   T dc, T* row_sum, T* row_kl, int64_t* row_n, int64_t* row_clip) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * L;
  T s = 0, k = 0;
  int64_t n = 0, c = 0;
  for (int64_t t = threadIdx.x; t < L; t += rk::kThreads) {
    const int64_t i = base + t;
    if (m[i]) {
      const T d = lp[i] - old[i];
      const auto tok = rk::ppo_policy_token(lp[i], old[i], adv[i], cl, ch, dc);
      s += tok.loss;
      k += T(0.5) * d * d;
      n += 1;
      c += tok.clipped;
    }
  }
  s = rk::block_sum(s);
  k = rk::block_sum(k);
  n = rk::block_sum(n);
  c = rk::block_sum(c);
  if (threadIdx.x == 0) {
    row_sum[blockIdx.x] = s;
    row_kl[blockIdx.x] = k;
    row_n[blockIdx.x] = n;
    row_clip[blockIdx.x] = c;
  }
}

template <typename T>
__global__ void policy_bwd_kernel(const T* g, const T* lp, const T* old, const T* adv, const bool* m, const T* w,
                                  int64_t total, int64_t L, T cl, T ch, T dc, T* g_lp, T* g_adv) {
  const T gv = *g;
  for (int64_t i = rk::global_index(); i < total; i += rk::grid_stride()) {
    T a = 0, b = 0;
    if (m[i]) {
      const auto tok = rk::ppo_policy_token(lp[i], old[i], adv[i], cl, ch, dc);
      const T scale = gv * w[i / L];
      a = scale * tok.dloss;
      b = scale * tok.dadv;
    }
    g_lp[i] = a;
    if (g_adv) g_adv[i] = b;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd(
    const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask, double clip_low,
    double clip_high, double dual_clip, int64_t agg) {
  rk::check_ppo_policy_loss(logp, old, adv, mask);
  c10::cuda::CUDAGuard guard(logp.device());
  const int64_t R = logp.size(0), L = logp.size(1);
  auto loss = at::empty({}, logp.options());
  auto f32 = logp.options().dtype(at::kFloat);
  auto clipfrac = at::empty({}, f32), approx_kl = at::empty({}, f32);
  auto row_weight = at::empty({R}, logp.options());
  auto row_sum = at::empty({R}, logp.options()), row_kl = at::empty({R}, logp.options());
  auto i64 = logp.options().dtype(at::kLong);
  auto row_n = at::empty({R}, i64), row_clip = at::empty({R}, i64);
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(logp.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (R > 0) {
      policy_rows_kernel<T><<<static_cast<unsigned>(R), rk::kThreads, 0, stream>>>(
          logp.const_data_ptr<T>(), old.const_data_ptr<T>(), adv.const_data_ptr<T>(), mask.const_data_ptr<bool>(),
          L, T(clip_low), T(clip_high), T(dual_clip), row_sum.mutable_data_ptr<T>(), row_kl.mutable_data_ptr<T>(),
          row_n.mutable_data_ptr<int64_t>(), row_clip.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    rk::combine_rows_kernel<T><<<1, rk::kThreads, 0, stream>>>(
        row_sum.const_data_ptr<T>(), row_n.const_data_ptr<int64_t>(), row_kl.const_data_ptr<T>(),
        row_clip.const_data_ptr<int64_t>(), R, agg, row_weight.mutable_data_ptr<T>(), loss.mutable_data_ptr<T>(),
        approx_kl.mutable_data_ptr<float>(), clipfrac.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  c10::cuda::CUDAGuard guard(logp.device());
  auto g_lp = at::empty_like(logp);
  auto g_adv = need_adv_grad ? at::empty_like(adv) : at::empty({0}, adv.options());
  const int64_t total = logp.numel();
  if (total == 0) return {g_lp, g_adv};
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(logp.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    policy_bwd_kernel<T><<<rk::blocks_for(total), rk::kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<T>(), logp.const_data_ptr<T>(), old.const_data_ptr<T>(), adv.const_data_ptr<T>(),
        mask.const_data_ptr<bool>(), row_weight.const_data_ptr<T>(), total, logp.size(1), T(clip_low),
        T(clip_high), T(dual_clip), g_lp.mutable_data_ptr<T>(), need_adv_grad ? g_adv.mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_lp, g_adv};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
}
