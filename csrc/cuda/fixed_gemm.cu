// CUDA entry point of rlhf_kernels::fixed_gemm: c = a·bᵀ (trans_b) or a·b with the fixed-order SIMT GEMM of
// cuda/fixed_gemm.cuh, so each element's order of operations depends on K alone. The batch-invariant sampler
// replay's products (rlhf_kernels/ops/_replay_head.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/fixed_gemm.cuh"
#include "cuda/launch.cuh"

namespace {

at::Tensor fixed_gemm(const at::Tensor& a, const at::Tensor& b, bool trans_b) {
  rk::check_fixed_gemm(a, b, trans_b);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), K = a.size(1), N = trans_b ? b.size(0) : b.size(1);
  TORCH_CHECK((M + rk::kFixedTile - 1) / rk::kFixedTile <= 65535, "fixed_gemm: at most ", 65535 * rk::kFixedTile,
              " rows of a, got ", M);
  at::Tensor c = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    // b(k, j) = b[j, k] (trans_b) or b[k, j]
    rk::fixed_gemm<T, T, T>(a.const_data_ptr<T>(), K, 1, b.const_data_ptr<T>(), trans_b ? 1 : N, trans_b ? K : 1,
                            c.mutable_data_ptr<T>(), N, M, N, K, false, stream);
  });
  return c;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("fixed_gemm", &fixed_gemm); }
