// The fixed-order SIMT GEMM of the batch-invariant modes (csrc/cuda/linear_logprobs.cu, csrc/cuda/fixed_gemm.cu).
// cuBLAS picks its algorithm (tiles, split-K) from the shapes, so a row's result may change with the row count;
// here each output element is one thread's fma chain, k ascending, whatever the grid or the other rows hold.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rk {

constexpr int kFixedTile = 16;  // output tile edge (threads per block: kFixedTile²)

// C[i, j] = (accumulate ? C[i, j] : 0) + Σ_k A(i, k)·B(k, j), k ascending, one fma per term, for i < M, j < Nn;
// A(i, k) = A[i·a_i + k·a_k], B(k, j) = B[k·b_k + j·b_j], converted to T as loaded. Each thread owns one
// element and adds its terms in the same order whatever the grid, the tile or the other rows hold.
template <typename T, typename TA, typename TB>
__global__ void fixed_gemm_kernel(const TA* __restrict__ A, int64_t a_i, int64_t a_k, const TB* __restrict__ B,
                                  int64_t b_k, int64_t b_j, T* C, int64_t ldc, int64_t M, int64_t Nn, int64_t K,
                                  bool accumulate) {
  __shared__ T As[kFixedTile][kFixedTile + 1], Bs[kFixedTile][kFixedTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i = int64_t(blockIdx.y) * kFixedTile + ty, j = int64_t(blockIdx.x) * kFixedTile + tx;
  T acc = accumulate && i < M && j < Nn ? C[i * ldc + j] : T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kFixedTile) {
    const int64_t ak = k0 + tx, bk = k0 + ty;
    As[ty][tx] = i < M && ak < K ? static_cast<T>(A[i * a_i + ak * a_k]) : T(0);
    const int64_t bj = int64_t(blockIdx.x) * kFixedTile + tx;
    Bs[ty][tx] = bk < K && bj < Nn ? static_cast<T>(B[bk * b_k + bj * b_j]) : T(0);
    __syncthreads();
    const int kn = static_cast<int>(K - k0 < kFixedTile ? K - k0 : kFixedTile);
    for (int kk = 0; kk < kn; ++kk) acc = fma(As[ty][kk], Bs[kk][tx], acc);
    __syncthreads();
  }
  if (i < M && j < Nn) C[i * ldc + j] = acc;
}

template <typename T, typename TA, typename TB>
void fixed_gemm(const TA* A, int64_t a_i, int64_t a_k, const TB* B, int64_t b_k, int64_t b_j, T* C, int64_t ldc,
                int64_t M, int64_t Nn, int64_t K, bool accumulate, cudaStream_t stream) {
  const dim3 block(kFixedTile, kFixedTile);
  const dim3 grid(static_cast<unsigned>((Nn + kFixedTile - 1) / kFixedTile),
                  static_cast<unsigned>((M + kFixedTile - 1) / kFixedTile));
  fixed_gemm_kernel<T, TA, TB><<<grid, block, 0, stream>>>(A, a_i, a_k, B, b_k, b_j, C, ldc, M, Nn, K, accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace rk
