// CUDA kernel of rlhf_kernels::group_advantages: one warp per group, its lanes striding over the members;
// the sums go through a fixed shuffle tree and lane 0's total is broadcast, so every member of a group sees
// the same mean and σ and the result is deterministic (no atomics). The per-group arithmetic is common.h's
// group_affine, shared with the CPU kernel. Groups are consecutive blocks of group_size, or (group_size 0)
// the runs order[offsets[k]:offsets[k + 1]] of a stable sort of the labels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common.h"
#include "checks.h"
#include "cuda/launch.cuh"

namespace {

constexpr int kWarps = 8;  // groups per block
constexpr unsigned kFull = 0xffffffffu;

template <typename T> __device__ __forceinline__ T warp_total(T x) {
  for (int d = 16; d > 0; d /= 2) x += __shfl_down_sync(kFull, x, d);
  return __shfl_sync(kFull, x, 0);
}

template <typename T, bool kLabelled>
__global__ void __launch_bounds__(kWarps * 32)
    group_advantages_kernel(const T* __restrict__ s, const int64_t* __restrict__ order,
                            const int64_t* __restrict__ offsets, T* __restrict__ out, int64_t slots, int64_t B,
                            int64_t G, int64_t baseline, int64_t scale, T eps) {
  const int lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; k < slots; k += stride) {
    int64_t start = k * G, end = start + G;
    if (kLabelled) {  // clamped: malformed offsets can never address outside [0, B)
      start = rk::r_min(rk::r_max(offsets[k], int64_t(0)), B);
      end = rk::r_min(rk::r_max(offsets[k + 1], start), B);
    }
    if (start == end) continue;  // the whole warp: start and end are the same in every lane
    auto member = [&](int64_t p) -> int64_t {
      if (!kLabelled) return p;
      const int64_t i = order[p];
      return i >= 0 && i < B ? i : -1;  // an out-of-range index is skipped, never read or written
    };
    T sum = 0;
    for (int64_t p = start + lane; p < end; p += 32) {
      const int64_t i = member(p);
      if (i >= 0) sum += s[i];
    }
    const int64_t n = end - start;
    const T mean = warp_total(sum) / T(n);
    T m2 = 0;
    if (scale == rk::SCALE_STD) {
      for (int64_t p = start + lane; p < end; p += 32) {
        const int64_t i = member(p);
        const T d = i >= 0 ? s[i] - mean : T(0);
        m2 += d * d;
      }
      m2 = warp_total(m2);
    }
    const rk::GroupAffine<T> f = rk::group_affine(n, mean, m2, baseline, scale, eps);
    for (int64_t p = start + lane; p < end; p += 32) {
      const int64_t i = member(p);
      if (i >= 0) out[i] = (s[i] - f.shift) * f.mult;
    }
  }
}

at::Tensor group_advantages(const at::Tensor& scores, const std::optional<at::Tensor>& order,
                            const std::optional<at::Tensor>& offsets, int64_t group_size, int64_t baseline,
                            int64_t scale, double eps) {
  const int64_t slots = rk::check_groups(scores, order, offsets, group_size);
  const int64_t B = scores.size(0);
  const bool labelled = group_size == 0;
  c10::cuda::CUDAGuard guard(scores.device());
  auto s = scores.contiguous();
  auto out = at::empty_like(s);
  if (B == 0) return out;
  const at::Tensor ord = labelled ? order->contiguous() : at::Tensor();
  const at::Tensor off = labelled ? offsets->contiguous() : at::Tensor();
  const int64_t want = (slots + kWarps - 1) / kWarps;
  const auto blocks = static_cast<unsigned>(want < 65535 ? want : 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(s.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* ps = s.const_data_ptr<T>();
    T* po = out.mutable_data_ptr<T>();
    if (labelled)
      group_advantages_kernel<T, true><<<blocks, kWarps * 32, 0, stream>>>(
          ps, ord.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>(), po, slots, B, 0, baseline, scale,
          static_cast<T>(eps));
    else
      group_advantages_kernel<T, false><<<blocks, kWarps * 32, 0, stream>>>(ps, nullptr, nullptr, po, slots, B,
                                                                           group_size, baseline, scale,
                                                                           static_cast<T>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("group_advantages", &group_advantages); }
