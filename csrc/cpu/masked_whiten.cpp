// CPU entry point of rlhf_kernels::masked_whiten. Pass 1: count, mean and squared deviations of each fixed
// chunk of valid elements, merged in chunk order, so the result does not depend on the thread count.
// Pass 2: the elementwise (x − μ)·rsqrt(var + eps). The loops are in cpu/kernels/masked_whiten.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"

namespace {

constexpr int64_t kChunk = 4096;  // elements per partial: fixed, so the reduction order is fixed

at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased, double eps) {
  rk::check_masked_whiten(x, mask);
  auto xc = x.contiguous(), mc = mask.contiguous();
  const int64_t n = xc.numel();
  if (n == 0) return at::empty_like(xc);
  at::Tensor out;
  rk::float_or_double(xc, [&](auto tag) {
    using T = decltype(tag);
    const auto& k = rk::cpu::masked_whiten_kernels();
    const T* px = xc.const_data_ptr<T>();
    const uint8_t* pm = rk::mask_bytes(mc);
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<rk::Moments<T>> part(chunks);
    auto* moments = k.moments.of<T>();
    at::parallel_for(0, chunks, (1 << 15) / kChunk, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t o = c * kChunk;
        part[c] = moments(px + o, pm + o, std::min(kChunk, n - o));
      }
    });
    rk::Moments<T> all{0, T(0), T(0)};
    for (const auto& p : part) all = rk::moments_merge(all, p);
    if (all.n == 0) {  // nothing valid: every position is masked and gives 0
      out = at::zeros_like(xc);
      return;
    }
    out = at::empty_like(xc);
    const rk::cpu::WhitenArgs<T> a{px, pm, out.mutable_data_ptr<T>(), all.mean,
                                   rk::moments_inv_std(all, unbiased, static_cast<T>(eps)), shift_mean};
    auto* normalize = k.normalize.of<T>();
    at::parallel_for(0, n, 1 << 15, [&](int64_t lo, int64_t hi) { normalize(a, lo, hi); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("masked_whiten", &masked_whiten); }
