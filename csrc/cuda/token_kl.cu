// CUDA kernels of rlhf_kernels::token_kl_{fwd,bwd}: one elementwise pass each (grid-stride, int64).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "checks.h"
#include "common.h"
#include "cuda/launch.cuh"

namespace {

template <typename T>
__global__ void token_kl_fwd_kernel(const T* a, const T* b, T* o, int64_t n, int64_t est, T c) {
  for (int64_t i = rk::global_index(); i < n; i += rk::grid_stride())
    o[i] = rk::clamp_sym(rk::kl_value(a[i], b[i], est), c);
}

template <typename T>
__global__ void token_kl_bwd_kernel(const T* g, const T* a, const T* b, T* ga, T* gb, int64_t n, int64_t est, T c) {
  for (int64_t i = rk::global_index(); i < n; i += rk::grid_stride()) {
    T d = rk::clamp_passes(rk::kl_value(a[i], b[i], est), c) ? g[i] * rk::kl_dlogp(a[i], b[i], est) : T(0);
    ga[i] = d;
    gb[i] = -d;
  }
}

at::Tensor token_kl_fwd(const at::Tensor& logp, const at::Tensor& ref, int64_t est, double clamp) {
  rk::check_token_kl(logp, ref);
  c10::cuda::CUDAGuard guard(logp.device());
  auto out = at::empty_like(logp);
  const int64_t n = logp.numel();
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(logp.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    token_kl_fwd_kernel<T><<<rk::blocks_for(n), rk::kThreads, 0, stream>>>(
        logp.const_data_ptr<T>(), ref.const_data_ptr<T>(), out.mutable_data_ptr<T>(), n, est, static_cast<T>(clamp));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> token_kl_bwd(const at::Tensor& grad, const at::Tensor& logp,
                                                 const at::Tensor& ref, int64_t est, double clamp) {
  rk::check_token_kl(logp, ref, &grad);
  c10::cuda::CUDAGuard guard(logp.device());
  auto g_logp = at::empty_like(logp), g_ref = at::empty_like(ref);
  const int64_t n = logp.numel();
  if (n == 0) return {g_logp, g_ref};
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(logp.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    token_kl_bwd_kernel<T><<<rk::blocks_for(n), rk::kThreads, 0, stream>>>(
        grad.const_data_ptr<T>(), logp.const_data_ptr<T>(), ref.const_data_ptr<T>(), g_logp.mutable_data_ptr<T>(),
        g_ref.mutable_data_ptr<T>(), n, est, static_cast<T>(clamp));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g_logp, g_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("token_kl_fwd", &token_kl_fwd);
  m.impl("token_kl_bwd", &token_kl_bwd);
}
