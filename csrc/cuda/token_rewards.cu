// CUDA kernel of rlhf_kernels::token_rewards: one warp per row. The warp finds the row's last valid
// position by ballots over 32-position windows walked back from the row end (stopping at the first
// window holding one), then writes the rewards in coalesced 32-wide strides.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launch.cuh"
#include "checks.h"

namespace {

constexpr int kWarps = 8;  // rows per block
constexpr unsigned kFull = 0xffffffffu;

template <typename T> struct RewardArgs {
  const T *logp, *ref, *dense;
  T kl_coef, dense_coef, dense_clip;
  int64_t est;  // −1: no KL term
};

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) token_rewards_kernel(const T* __restrict__ score,
                                                                    const uint8_t* __restrict__ m, RewardArgs<T> a,
                                                                    T* __restrict__ out, int64_t rows, int64_t n,
                                                                    bool after_eos) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;  // whole warp
  const int64_t base = row * n;
  int64_t last = -1;
  for (int64_t hi = n; hi > 0 && last < 0; hi -= 32) {  // `last` is warp-uniform: so is the loop
    const int64_t t = hi - 32 + lane;
    const unsigned b = __ballot_sync(kFull, t >= 0 && m[base + t] != 0);
    if (b) last = hi - 32 + (31 - __clz(b));
  }
  int64_t pos = last;
  if (after_eos && last >= 0 && last + 1 < n) pos = last + 1;
  const T s = score[row];
  for (int64_t t = lane; t < n; t += 32) {
    T val = 0;
    if (a.est >= 0) val = -(a.kl_coef * rk::kl_value(a.logp[base + t], a.ref[base + t], a.est));
    if (a.dense != nullptr) val = val + rk::clamp_sym(a.dense_coef * a.dense[base + t], a.dense_clip);
    T o = m[base + t] ? val : T(0);
    if (t == pos) o = o + s;
    out[base + t] = o;
  }
}

at::Tensor token_rewards(const at::Tensor& score, const at::Tensor& mask, const std::optional<at::Tensor>& logp,
                         const std::optional<at::Tensor>& ref_logp, double kl_coef, int64_t kl_estimator,
                         const std::optional<at::Tensor>& dense, double dense_coef, double dense_clip,
                         bool score_after_eos) {
  const bool use_kl = kl_coef != 0.0;
  rk::check_token_rewards(score, mask, logp, ref_logp, use_kl, kl_estimator, dense);
  c10::cuda::CUDAGuard guard(mask.device());
  auto out = at::empty(mask.sizes(), score.options());
  if (mask.numel() == 0) return out;
  const int64_t n = mask.size(-1), rows = mask.numel() / n;
  auto s = score.contiguous(), m = mask.contiguous();
  at::Tensor lp, rf, dn;
  if (use_kl) {
    lp = logp->contiguous();
    rf = ref_logp->contiguous();
  }
  if (dense.has_value()) dn = dense->contiguous();
  const auto blocks = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  auto stream = c10::cuda::getCurrentCUDAStream();
  RK_DISPATCH_FLOAT_DOUBLE(s.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    RewardArgs<T> a{use_kl ? lp.const_data_ptr<T>() : nullptr, use_kl ? rf.const_data_ptr<T>() : nullptr,
                    dn.defined() ? dn.const_data_ptr<T>() : nullptr, static_cast<T>(kl_coef),
                    static_cast<T>(dense_coef), static_cast<T>(dense_clip), use_kl ? kl_estimator : -1};
    token_rewards_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(s.const_data_ptr<T>(), rk::mask_bytes(m), a,
                                                                out.mutable_data_ptr<T>(), rows, n, score_after_eos);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("token_rewards", &token_rewards); }
