// CUDA kernels of rlhf_kernels::dpo_loss_{fwd,bwd}: elementwise over the pairs (grid-stride, int64).
// (Its autograd, for every device, is in csrc/autograd.cpp.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "common.h"
#include "cuda/launch.cuh"

namespace {

template <typename T>
__global__ void dpo_fwd_kernel(const T* c, const T* r, const T* cr, const T* rr, T* loss, T* c_rew, T* r_rew,
                               int64_t n, T beta, int64_t type, T eps) {
  for (int64_t i = rk::global_index(); i < n; i += rk::grid_stride()) {
    const T dc = c[i] - cr[i], dr = r[i] - rr[i];
    loss[i] = rk::dpo_loss_value(dc - dr, beta, type, eps);
    c_rew[i] = beta * dc;
    r_rew[i] = beta * dr;
  }
}

template <typename T>
__global__ void dpo_bwd_kernel(const T* g, const T* c, const T* r, const T* cr, const T* rr, T* gc, T* gr, T* gcr,
                               T* grr, int64_t n, T beta, int64_t type, T eps) {
  for (int64_t i = rk::global_index(); i < n; i += rk::grid_stride()) {
    const T d = g[i] * rk::dpo_loss_dh((c[i] - cr[i]) - (r[i] - rr[i]), beta, type, eps);
    gc[i] = d;
    gr[i] = -d;
    gcr[i] = -d;
    grr[i] = d;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_fwd(const at::Tensor& c, const at::Tensor& r,
                                                            const at::Tensor& cr, const at::Tensor& rr, double beta,
                                                            int64_t type, double eps) {
  rk::check_dpo_loss(c, r, cr, rr);
  c10::cuda::CUDAGuard guard(c.device());
  auto loss = at::empty_like(c), c_rew = at::empty_like(c), r_rew = at::empty_like(c);
  const int64_t n = c.numel();
  if (n == 0) return {loss, c_rew, r_rew};
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(c.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dpo_fwd_kernel<T><<<rk::blocks_for(n), rk::kThreads, 0, stream>>>(
        c.const_data_ptr<T>(), r.const_data_ptr<T>(), cr.const_data_ptr<T>(), rr.const_data_ptr<T>(),
        loss.mutable_data_ptr<T>(), c_rew.mutable_data_ptr<T>(), r_rew.mutable_data_ptr<T>(), n, T(beta), type,
        T(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, c_rew, r_rew};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_bwd(const at::Tensor& grad, const at::Tensor& c,
                                                                        const at::Tensor& r, const at::Tensor& cr,
                                                                        const at::Tensor& rr, double beta,
                                                                        int64_t type, double eps) {
  rk::check_dpo_loss(c, r, cr, rr, &grad);
  c10::cuda::CUDAGuard guard(c.device());
  auto gc = at::empty_like(c), gr = at::empty_like(c), gcr = at::empty_like(c), grr = at::empty_like(c);
  const int64_t n = c.numel();
  if (n == 0) return {gc, gr, gcr, grr};
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(c.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dpo_bwd_kernel<T><<<rk::blocks_for(n), rk::kThreads, 0, stream>>>(
        grad.const_data_ptr<T>(), c.const_data_ptr<T>(), r.const_data_ptr<T>(), cr.const_data_ptr<T>(),
        rr.const_data_ptr<T>(), gc.mutable_data_ptr<T>(), gr.mutable_data_ptr<T>(), gcr.mutable_data_ptr<T>(),
        grr.mutable_data_ptr<T>(), n, T(beta), type, T(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gc, gr, gcr, grr};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("dpo_loss_fwd", &dpo_loss_fwd);
  m.impl("dpo_loss_bwd", &dpo_loss_bwd);
}
