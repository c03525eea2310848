// CUDA kernel of rlhf_kernels::gae: one warp per row, the row walked in tiles from its end. In a tile
// each lane owns kPerLane consecutive positions: it composes their maps (common.h GaeMap), a warp-level
// reverse scan of those composites gives every lane the state entering its positions, and each lane then
// runs the same serial step as the CPU kernel (a done cuts both the composites and the step). Loads and
// stores go through shared memory so that global accesses stay coalesced. One launch for the whole batch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launch.cuh"
#include "checks.h"

namespace {

constexpr int kWarps = 4;                // rows per block
constexpr int kPerLane = 8;              // consecutive positions per lane in a tile
constexpr int kTile = 32 * kPerLane;     // positions per tile
constexpr int kStride = kPerLane + 1;    // padded lane stride: conflict-free shared-memory banks
constexpr unsigned kFull = 0xffffffffu;

template <typename T> __device__ __forceinline__ rk::GaeMap<T> shfl_down(const rk::GaeMap<T>& f, int d) {
  return {__shfl_down_sync(kFull, f.alpha, d), __shfl_down_sync(kFull, f.beta, d), __shfl_down_sync(kFull, f.p, d),
          __shfl_down_sync(kFull, f.kappa, d), __shfl_down_sync(kFull, f.q, d)};
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) gae_kernel(const T* __restrict__ r, const T* __restrict__ v,
                                                          const uint8_t* __restrict__ m,
                                                          const uint8_t* __restrict__ dn, T* __restrict__ adv,
                                                          T* __restrict__ ret, int64_t rows, int64_t n, T gamma,
                                                          T lam) {
  __shared__ T s_r[kWarps][32 * kStride];
  __shared__ T s_v[kWarps][32 * kStride];
  // bit 0: valid (mask), bit 1: done (dn == nullptr: no dones)
  __shared__ uint8_t s_m[kWarps][32 * kStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // the whole warp leaves together; only warp-level sync is used below
  const int64_t base = row * n;
  T* sr = s_r[warp];
  T* sv = s_v[warp];
  uint8_t* sm = s_m[warp];
  const rk::GaeMap<T> identity = rk::gae_map<T>(T(0), T(0), false, false, gamma, lam);
  T carry_a = 0, carry_v = 0;  // A and V of the first valid position after the current tile
  for (int64_t start = ((n - 1) / kTile) * kTile; start >= 0; start -= kTile) {
    for (int i = 0; i < kPerLane; ++i) {
      const int e = i * 32 + lane;
      const int64_t t = start + e;
      const int slot = (e / kPerLane) * kStride + e % kPerLane;
      const bool ok = t < n;
      sr[slot] = ok ? r[base + t] : T(0);
      sv[slot] = ok ? v[base + t] : T(0);
      sm[slot] = ok ? uint8_t((m[base + t] != 0) | (dn != nullptr && dn[base + t] != 0 ? 2 : 0)) : uint8_t(0);
    }
    __syncwarp();
    const int o = lane * kStride;
    rk::GaeMap<T> f = identity;
    for (int i = kPerLane - 1; i >= 0; --i) {
      const uint8_t fl = sm[o + i];
      f = rk::gae_compose(rk::gae_map(sr[o + i], sv[o + i], (fl & 1) != 0, (fl & 2) != 0, gamma, lam), f);
    }
    // inclusive reverse scan over lanes: f becomes the composite of lanes [lane, 32)
    for (int d = 1; d < 32; d *= 2) {
      const rk::GaeMap<T> g = shfl_down(f, d);
      if (lane + d < 32) f = rk::gae_compose(f, g);
    }
    rk::GaeMap<T> after = shfl_down(f, 1);
    if (lane == 31) after = identity;
    T next_a = carry_a, next_v = carry_v;
    rk::gae_apply(after, next_a, next_v);
    for (int i = kPerLane - 1; i >= 0; --i) {
      const T vi = sv[o + i];
      if (sm[o + i] & 1) {
        const T a = rk::gae_step(sr[o + i], vi, (sm[o + i] & 2) != 0, gamma, lam, next_v, next_a);
        sr[o + i] = a;
        sv[o + i] = a + vi;
      } else {
        sr[o + i] = T(0);
        sv[o + i] = T(0);
      }
    }
    // lane 0 ends at the tile's earliest position: its state is what the tile before this one sees
    carry_a = __shfl_sync(kFull, next_a, 0);
    carry_v = __shfl_sync(kFull, next_v, 0);
    __syncwarp();
    for (int i = 0; i < kPerLane; ++i) {
      const int e = i * 32 + lane;
      const int64_t t = start + e;
      const int slot = (e / kPerLane) * kStride + e % kPerLane;
      if (t < n) {
        adv[base + t] = sr[slot];
        ret[base + t] = sv[slot];
      }
    }
    __syncwarp();
  }
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                                       const std::optional<at::Tensor>& dones, double gamma, double lam) {
  rk::check_gae(rewards, values, mask, dones);
  c10::cuda::CUDAGuard guard(rewards.device());
  auto r = rewards.contiguous(), v = values.contiguous(), m = mask.contiguous();
  const at::Tensor d = dones ? dones->contiguous() : at::Tensor();
  auto adv = at::empty_like(r), ret = at::empty_like(r);
  if (r.numel() == 0) return {adv, ret};
  const int64_t n = r.size(-1), rows = r.numel() / n;
  const auto blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(r.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gae_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(r.const_data_ptr<T>(), v.const_data_ptr<T>(), rk::mask_bytes(m),
                                                      d.defined() ? rk::mask_bytes(d) : nullptr,
                                                      adv.mutable_data_ptr<T>(), ret.mutable_data_ptr<T>(), rows, n,
                                                      static_cast<T>(gamma), static_cast<T>(lam));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("gae", &gae); }
