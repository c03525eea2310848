// CPU entry point of rlhf_kernels::fixed_gemm: c = a·bᵀ (trans_b) or a·b in the fixed-order tiles of
// cpu/kernels/fixed_gemm.cpp, so each element's order of operations depends on K (and trans_b) alone:
//  - trans_b: the dot tiles, a K-lane-strided accumulation then a fixed pairwise sum of the lanes;
//  - else: the axpy tiles, c[i, :] += a[i, s]·b[s, :] with s ascending (called over consecutive chunks of s,
//    which gives the same sums as one call), one lane per column.
// Tasks take tiles of c (any tile gives the same elements). The sampler replay's batch-invariant linear head
// (rlhf_kernels/ops/_replay_head.py) runs its three products here.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/kernels.h"

namespace {

constexpr int64_t kGemmTileRows = 64;   // rows of c per task
constexpr int64_t kGemmTileCols = 512;  // trans_b: columns of c per task
constexpr int64_t kGemmChunkK = 512;    // axpy: terms per call (the panel of b it streams stays in cache)

at::Tensor fixed_gemm(const at::Tensor& a, const at::Tensor& b, bool trans_b) {
  rk::check_fixed_gemm(a, b, trans_b);
  const int64_t M = a.size(0), K = a.size(1), N = trans_b ? b.size(0) : b.size(1);
  at::Tensor c = trans_b ? at::empty({M, N}, a.options()) : at::zeros({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  rk::float_or_double(a, [&](auto tag) {
    using T = decltype(tag);
    const T* A = a.const_data_ptr<T>();
    const T* B = b.const_data_ptr<T>();
    T* C = c.mutable_data_ptr<T>();
    const int64_t rt = (M + kGemmTileRows - 1) / kGemmTileRows;
    if (trans_b) {
      auto* dot = rk::cpu::fixed_gemm_kernels().dot.of<T>();
      const int64_t ct = (N + kGemmTileCols - 1) / kGemmTileCols;
      at::parallel_for(0, rt * ct, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i0 = t / ct * kGemmTileRows, j0 = t % ct * kGemmTileCols;
          dot(A + i0 * K, B + j0 * K, C + i0 * N + j0, std::min(kGemmTileRows, M - i0),
              std::min(kGemmTileCols, N - j0), K, N);
        }
      });
    } else {
      auto* axpy = rk::cpu::fixed_gemm_kernels().axpy.of<T>();
      at::parallel_for(0, rt, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i0 = t * kGemmTileRows, nr = std::min(kGemmTileRows, M - i0);
          for (int64_t s0 = 0; s0 < K; s0 += kGemmChunkK)
            axpy(A + i0 * K + s0, K, 1, B + s0 * N, C + i0 * N, nr, std::min(kGemmChunkK, K - s0), N);
        }
      });
    }
  });
  return c;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("fixed_gemm", &fixed_gemm); }
