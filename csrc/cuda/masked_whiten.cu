// CUDA kernels of rlhf_kernels::masked_whiten, deterministic without atomics: (1) one block per fixed
// chunk computes count, mean and squared deviations of its valid elements (two passes over registers);
// (2) one block merges the partials in a fixed order (each thread a fixed strided subset, then a fixed
// tree); (3) a grid-stride pass writes (x − μ)·rsqrt(var + eps).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launch.cuh"
#include "checks.h"

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;
constexpr int64_t kChunk = kThreads * kPerThread;  // elements per partial: fixed, so the order is fixed
constexpr unsigned kFull = 0xffffffffu;

// Block-wide sum in a fixed order (warp shuffles, then warp totals in index order); every thread gets it.
template <typename T> __device__ T block_sum(T x, T* shared) {
  for (int d = 16; d > 0; d /= 2) x += __shfl_down_sync(kFull, x, d);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moments_kernel(const T* __restrict__ x, const uint8_t* __restrict__ m,
                                                           int64_t n, int64_t* __restrict__ cnt,
                                                           T* __restrict__ mean, T* __restrict__ m2) {
  __shared__ T s_f[kThreads / 32];
  __shared__ int s_i[kThreads / 32];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kChunk;
  T xs[kPerThread];
  bool vs[kPerThread];
  T sum = 0;
  int c = 0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t i = start + k * kThreads + threadIdx.x;  // coalesced
    vs[k] = i < n && m[i] != 0;
    xs[k] = vs[k] ? x[i] : T(0);
    sum += xs[k];
    c += vs[k];
  }
  const int count = block_sum(c, s_i);
  const T mu = block_sum(sum, s_f) / T(count > 0 ? count : 1);
  T sq = 0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const T d = vs[k] ? xs[k] - mu : T(0);
    sq += d * d;
  }
  sq = block_sum(sq, s_f);
  if (threadIdx.x == 0) {
    cnt[blockIdx.x] = count;
    mean[blockIdx.x] = mu;
    m2[blockIdx.x] = sq;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(const int64_t* __restrict__ cnt, const T* __restrict__ mean,
                                                         const T* __restrict__ m2, int64_t parts, bool unbiased, T eps,
                                                         T* __restrict__ stats) {
  __shared__ rk::Moments<T> s[kThreads];
  rk::Moments<T> acc{0, T(0), T(0)};
  for (int64_t i = threadIdx.x; i < parts; i += kThreads) acc = rk::moments_merge(acc, rk::Moments<T>{cnt[i], mean[i], m2[i]});
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) s[threadIdx.x] = rk::moments_merge(s[threadIdx.x], s[threadIdx.x + w]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    stats[0] = s[0].mean;
    // with no valid element the stats are unused: every output position is masked
    stats[1] = s[0].n > 0 ? rk::moments_inv_std(s[0], unbiased, eps) : T(0);
  }
}

template <typename T, bool SHIFT>
__global__ void normalize_kernel(const T* __restrict__ x, const uint8_t* __restrict__ m, const T* __restrict__ stats,
                                 T* __restrict__ out, int64_t n) {
  const T mu = stats[0], inv = stats[1];
  for (int64_t i = rk::global_index(); i < n; i += rk::grid_stride()) {
    T y = (x[i] - mu) * inv;
    if (!SHIFT) y = y + mu;
    out[i] = m[i] ? y : T(0);
  }
}

at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased, double eps) {
  rk::check_masked_whiten(x, mask);
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(), mc = mask.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const int64_t parts = (n + kChunk - 1) / kChunk;
  TORCH_CHECK(parts <= 0x7fffffff, "masked_whiten: input too large for one grid");
  auto cnt = at::empty({parts}, xc.options().dtype(at::kLong));
  auto part = at::empty({2 * parts + 2}, xc.options());  // means, squared deviations, then (μ, 1/σ)
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* p = part.mutable_data_ptr<T>();
    const T* px = xc.const_data_ptr<T>();
    const uint8_t* pm = rk::mask_bytes(mc);
    moments_kernel<T><<<static_cast<unsigned>(parts), kThreads, 0, stream>>>(px, pm, n, cnt.mutable_data_ptr<int64_t>(),
                                                                             p, p + parts);
    merge_kernel<T><<<1, kThreads, 0, stream>>>(cnt.const_data_ptr<int64_t>(), p, p + parts, parts, unbiased,
                                                static_cast<T>(eps), p + 2 * parts);
    if (shift_mean)
      normalize_kernel<T, true><<<rk::blocks_for(n), rk::kThreads, 0, stream>>>(px, pm, p + 2 * parts,
                                                                                out.mutable_data_ptr<T>(), n);
    else
      normalize_kernel<T, false><<<rk::blocks_for(n), rk::kThreads, 0, stream>>>(px, pm, p + 2 * parts,
                                                                                 out.mutable_data_ptr<T>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("masked_whiten", &masked_whiten); }
