// CUDA kernels of rlhf_kernels::rollout_correction, deterministic without atomics: (1) one block per row
// (grid-stride over rows): at the sequence and geometric levels a fixed-order block sum of the row's
// masked log-ratios first, then one pass writes weights and mask_out through common.h's rc_weight (shared
// with the CPU kernel) and block-sums the row's stats partials; (2) one block combines the partials in
// double, each thread a fixed strided subset, then a fixed tree.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launch.cuh"
#include "cuda/loss_reduce.cuh"
#include "checks.h"

namespace {

// A row's (or the batch's) stats partials: sums of old − rollout, of k3 and of the weights; valid and kept counts.
struct Partials {
  double k1, k3, w;
  int64_t n, kept;
};

__device__ Partials block_total(const Partials& p) {
  return {rk::block_sum(p.k1), rk::block_sum(p.k3), rk::block_sum(p.w), rk::block_sum(p.n), rk::block_sum(p.kept)};
}

template <typename T>
__global__ void __launch_bounds__(rk::kThreads)
    rows_kernel(const T* __restrict__ o, const T* __restrict__ q, const uint8_t* __restrict__ m, T* __restrict__ w,
                uint8_t* __restrict__ mo, double* __restrict__ sums, int64_t* __restrict__ counts, int64_t R,
                int64_t n, int64_t level, int64_t mode, T low, T high) {
  for (int64_t row = blockIdx.x; row < R; row += gridDim.x) {
    const int64_t base = row * n;
    // masked positions are never read: garbage there cannot reach a sum
    auto log_ratio = [&](int64_t t) { return m[base + t] ? o[base + t] - q[base + t] : T(0); };
    T row_lr = 0;
    if (level != rk::RC_TOKEN) {
      T sum = 0;
      int64_t cnt = 0;
      for (int64_t t = threadIdx.x; t < n; t += rk::kThreads) {
        sum += log_ratio(t);
        cnt += m[base + t] != 0;
      }
      sum = rk::block_sum(sum);
      cnt = rk::block_sum(cnt);
      row_lr = level == rk::RC_GEOMETRIC ? sum / T(cnt > 0 ? cnt : 1) : sum;
    }
    const T row_ratio = rk::r_exp(row_lr);
    T k1 = 0, k3 = 0, ws = 0;
    int64_t cnt = 0, kept = 0;
    for (int64_t t = threadIdx.x; t < n; t += rk::kThreads) {
      const bool valid = m[base + t] != 0;
      const T d = log_ratio(t);
      int32_t keep;
      const T wt = rk::rc_weight(level == rk::RC_TOKEN ? rk::r_exp(d) : row_ratio, valid, mode, low, high, keep);
      w[base + t] = wt;
      mo[base + t] = static_cast<uint8_t>(keep);
      k1 += d;
      k3 += rk::kl_value(d, T(0), rk::KL_K3);  // 0 at masked positions (d = 0)
      ws += wt;
      cnt += valid;
      kept += keep;
    }
    const Partials p = block_total({double(k1), double(k3), double(ws), cnt, kept});
    if (threadIdx.x == 0) {
      sums[row * 3] = p.k1;
      sums[row * 3 + 1] = p.k3;
      sums[row * 3 + 2] = p.w;
      counts[row * 2] = p.n;
      counts[row * 2 + 1] = p.kept;
    }
  }
}

__global__ void __launch_bounds__(rk::kThreads)
    combine_kernel(const double* __restrict__ sums, const int64_t* __restrict__ counts, int64_t R,
                   float* __restrict__ stats) {
  Partials p{0, 0, 0, 0, 0};
  for (int64_t i = threadIdx.x; i < R; i += rk::kThreads) {
    p.k1 += sums[i * 3];
    p.k3 += sums[i * 3 + 1];
    p.w += sums[i * 3 + 2];
    p.n += counts[i * 2];
    p.kept += counts[i * 2 + 1];
  }
  p = block_total(p);
  if (threadIdx.x == 0) rk::rc_stats(p.k1, p.k3, p.w, p.n, p.kept, stats);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rollout_correction(const at::Tensor& old_logp,
                                                                  const at::Tensor& rollout_logp,
                                                                  const at::Tensor& mask, int64_t level, int64_t mode,
                                                                  double low, double high) {
  rk::check_rollout_correction(old_logp, rollout_logp, mask);
  c10::cuda::CUDAGuard guard(old_logp.device());
  auto o = old_logp.contiguous(), q = rollout_logp.contiguous(), m = mask.contiguous();
  auto w = at::empty_like(o);
  auto mo = at::empty(m.sizes(), m.options().dtype(at::kBool));
  auto stats = at::zeros({4}, o.options().dtype(at::kFloat));
  if (o.numel() == 0) return {w, mo, stats};
  const int64_t R = o.size(0), n = o.size(1);
  auto sums = at::empty({R, 3}, o.options().dtype(at::kDouble));
  auto counts = at::empty({R, 2}, o.options().dtype(at::kLong));
  const auto blocks = static_cast<unsigned>(R < 65535 ? R : 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(o.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rows_kernel<T><<<blocks, rk::kThreads, 0, stream>>>(
        o.const_data_ptr<T>(), q.const_data_ptr<T>(), rk::mask_bytes(m), w.mutable_data_ptr<T>(),
        static_cast<uint8_t*>(mo.data_ptr()), sums.mutable_data_ptr<double>(), counts.mutable_data_ptr<int64_t>(), R,
        n, level, mode, static_cast<T>(low), static_cast<T>(high));
  });
  combine_kernel<<<1, rk::kThreads, 0, stream>>>(sums.const_data_ptr<double>(), counts.const_data_ptr<int64_t>(), R,
                                                 stats.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, mo, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("rollout_correction", &rollout_correction); }
