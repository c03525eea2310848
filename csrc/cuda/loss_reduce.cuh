// Deterministic block reductions and the fixed-order row combine shared by the CUDA loss kernels.
// No atomics: each thread sums a fixed strided subset, then a fixed shared-memory tree.
#pragma once
#include <cstdint>

#include "common.h"
#include "cuda/launch.cuh"

namespace rk {

// Sum over the block (blockDim.x == kThreads, a power of two); every thread gets the result.
template <typename T> __device__ T block_sum(T v) {
  __shared__ T sh[kThreads];
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  T r = sh[0];
  __syncthreads();
  return r;
}

// Max over the block (as block_sum); every thread gets the result.
template <typename T> __device__ T block_max(T v) {
  __shared__ T sh[kThreads];
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = r_max(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  T r = sh[0];
  __syncthreads();
  return r;
}

// One block: per-row valid counts and loss sums → loss and per-row weights (double accumulation),
// plus the masked means Σ stat_sum / n and Σ stat_count / n as float32 (either may be null).
template <typename T>
__global__ void combine_rows_kernel(const T* row_sum, const int64_t* row_n, const T* stat_sum,
                                    const int64_t* stat_count, int64_t R, int64_t agg, T* weight, T* loss,
                                    float* stat_sum_mean, float* stat_count_mean) {
  int64_t tokens = 0, rows = 0, count = 0;
  double ssum = 0;
  for (int64_t i = threadIdx.x; i < R; i += kThreads) {
    tokens += row_n[i];
    rows += row_n[i] > 0;
    if (stat_count) count += stat_count[i];
    if (stat_sum) ssum += double(stat_sum[i]);
  }
  tokens = block_sum(tokens);
  rows = block_sum(rows);
  count = block_sum(count);
  ssum = block_sum(ssum);
  double acc = 0;
  for (int64_t i = threadIdx.x; i < R; i += kThreads) {
    T w = aggregation_weight<T>(agg, T(row_n[i]), T(tokens), T(rows));
    weight[i] = w;
    acc += double(w) * double(row_sum[i]);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const double denom = double(tokens > 0 ? tokens : 1);
    *loss = T(acc);
    if (stat_sum_mean) *stat_sum_mean = float(ssum / denom);
    if (stat_count_mean) *stat_count_mean = float(double(count) / denom);
  }
}

}  // namespace rk
