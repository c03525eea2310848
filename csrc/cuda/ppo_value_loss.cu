// CUDA kernels of rlhf_kernels::ppo_value_loss_{fwd,bwd}: one block per row for the row sums and
// counts, the fixed-order single-block combine of loss_reduce.cuh (no atomics), then one grid-stride
// elementwise backward. Only valid positions are read.
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
__global__ void value_rows_kernel(const T* v, const T* vo, const T* ret, const bool* m, int64_t L, T clip,
                                  T* row_sum, int64_t* row_n, int64_t* row_clip) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * L;
  T s = 0;
  int64_t n = 0, c = 0;
  for (int64_t t = threadIdx.x; t < L; t += rk::kThreads) {
    const int64_t i = base + t;
    if (m[i]) {
      const auto tok = rk::ppo_value_token(v[i], vo[i], ret[i], clip);
      s += tok.loss;
      n += 1;
      c += tok.clipped;
    }
  }
  s = rk::block_sum(s);
  n = rk::block_sum(n);
  c = rk::block_sum(c);
  if (threadIdx.x == 0) {
    row_sum[blockIdx.x] = s;
    row_n[blockIdx.x] = n;
    row_clip[blockIdx.x] = c;
  }
}

template <typename T>
__global__ void value_bwd_kernel(const T* g, const T* v, const T* vo, const T* ret, const bool* m, const T* w,
                                 int64_t total, int64_t L, T clip, T* g_v, T* g_old, T* g_ret) {
  const T gv = *g;
  for (int64_t i = rk::global_index(); i < total; i += rk::grid_stride()) {
    T a = 0, b = 0, c = 0;
    if (m[i]) {
      const auto tok = rk::ppo_value_token(v[i], vo[i], ret[i], clip);
      const T scale = gv * w[i / L];
      a = scale * tok.dloss;
      b = scale * (tok.err - tok.dloss);
      c = -scale * tok.err;
    }
    g_v[i] = a;
    if (g_old) {
      g_old[i] = b;
      g_ret[i] = c;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& v, const at::Tensor& vo,
                                                                  const at::Tensor& ret, const at::Tensor& mask,
                                                                  double clip, int64_t agg) {
  rk::check_ppo_value_loss(v, vo, ret, mask);
  c10::cuda::CUDAGuard guard(v.device());
  const int64_t R = v.size(0), L = v.size(1);
  auto loss = at::empty({}, v.options());
  auto clipfrac = at::empty({}, v.options().dtype(at::kFloat));
  auto row_weight = at::empty({R}, v.options()), row_sum = at::empty({R}, v.options());
  auto row_n = at::empty({R}, v.options().dtype(at::kLong)), row_clip = at::empty({R}, v.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(v.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (R > 0) {
      value_rows_kernel<T><<<static_cast<unsigned>(R), rk::kThreads, 0, stream>>>(
          v.const_data_ptr<T>(), vo.const_data_ptr<T>(), ret.const_data_ptr<T>(), mask.const_data_ptr<bool>(), L,
          T(clip), row_sum.mutable_data_ptr<T>(), row_n.mutable_data_ptr<int64_t>(),
          row_clip.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    rk::combine_rows_kernel<T><<<1, rk::kThreads, 0, stream>>>(
        row_sum.const_data_ptr<T>(), row_n.const_data_ptr<int64_t>(), nullptr, row_clip.const_data_ptr<int64_t>(), R,
        agg, row_weight.mutable_data_ptr<T>(), loss.mutable_data_ptr<T>(), nullptr,
        clipfrac.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, clipfrac, row_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& v,
                                                                  const at::Tensor& vo, const at::Tensor& ret,
                                                                  const at::Tensor& mask, const at::Tensor& row_weight,
                                                                  double clip, bool need_data_grads) {
  rk::check_ppo_value_loss(v, vo, ret, mask);
  rk::check_ppo_loss_bwd("ppo_value_loss_bwd", grad_loss, row_weight, v);
  c10::cuda::CUDAGuard guard(v.device());
  auto g_v = at::empty_like(v);
  auto g_old = need_data_grads ? at::empty_like(vo) : at::empty({0}, vo.options());
  auto g_ret = need_data_grads ? at::empty_like(ret) : at::empty({0}, ret.options());
  const int64_t total = v.numel();
  if (total == 0) return {g_v, g_old, g_ret};
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(v.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    value_bwd_kernel<T><<<rk::blocks_for(total), rk::kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<T>(), v.const_data_ptr<T>(), vo.const_data_ptr<T>(), ret.const_data_ptr<T>(),
        mask.const_data_ptr<bool>(), row_weight.const_data_ptr<T>(), total, v.size(1), T(clip),
        g_v.mutable_data_ptr<T>(), need_data_grads ? g_old.mutable_data_ptr<T>() : nullptr,
        need_data_grads ? g_ret.mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_v, g_old, g_ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd);
}
