// CPU kernel of rlhf_kernels::masked_whiten. Pass 1: count, mean and squared deviations of each fixed
// chunk of valid elements (two passes over the chunk while it sits in L1), merged in chunk order, so
// the result does not depend on the thread count. Pass 2: the elementwise (x − μ)·rsqrt(var + eps).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cpu/vec_math.h"
#include "row_checks.h"

namespace {

constexpr int64_t kChunk = 4096;  // elements per partial: fixed, so the reduction order is fixed
constexpr int kLanes = 16;        // independent accumulators the compiler keeps in vector registers

template <typename T> T sum_lanes(T* a) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  return a[0];
}

// Lane j accumulates the elements i ≡ j (mod kLanes): a fixed order whatever the alignment.
template <typename T> rk::Moments<T> chunk_moments(const T* __restrict x, const uint8_t* __restrict m, int64_t n) {
  T acc[kLanes] = {};
  int32_t cnt[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      acc[j] += rk::select_bits(m[i + j], x[i + j]);
      cnt[j] += m[i + j] != 0;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    acc[j] += rk::select_bits(m[i], x[i]);
    cnt[j] += m[i] != 0;
  }
  const int64_t count = sum_lanes(cnt);
  if (count == 0) return {0, T(0), T(0)};
  const T mean = sum_lanes(acc) / T(count);
  T sq[kLanes] = {};
  for (i = 0; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const T d = rk::select_bits(m[i + j], x[i + j] - mean);
      sq[j] += d * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const T d = rk::select_bits(m[i], x[i] - mean);
    sq[j] += d * d;
  }
  return {count, mean, sum_lanes(sq)};
}

template <typename T, bool SHIFT>
void normalize(const T* __restrict x, const uint8_t* __restrict m, T* __restrict out, int64_t n, T mean, T inv) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      T y = (x[i] - mean) * inv;
      if constexpr (!SHIFT) y = y + mean;
      out[i] = rk::select_bits(m[i], y);
    }
  });
}

at::Tensor masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased, double eps) {
  rk::check_rows("masked_whiten", x, {}, mask);
  auto xc = x.contiguous(), mc = mask.contiguous();
  const int64_t n = xc.numel();
  if (n == 0) return at::empty_like(xc);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "masked_whiten", [&] {
    const scalar_t* px = xc.const_data_ptr<scalar_t>();
    const uint8_t* pm = rk::mask_bytes(mc);
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<rk::Moments<scalar_t>> part(chunks);
    at::parallel_for(0, chunks, (1 << 15) / kChunk, [&](int64_t lo, int64_t hi) {
      for (int64_t c = lo; c < hi; ++c) {
        const int64_t o = c * kChunk;
        part[c] = chunk_moments(px + o, pm + o, std::min(kChunk, n - o));
      }
    });
    rk::Moments<scalar_t> all{0, scalar_t(0), scalar_t(0)};
    for (const auto& p : part) all = rk::moments_merge(all, p);
    if (all.n == 0) {  // nothing valid: every position is masked and gives 0
      out = at::zeros_like(xc);
      return;
    }
    out = at::empty_like(xc);
    const scalar_t inv = rk::moments_inv_std(all, unbiased, static_cast<scalar_t>(eps));
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (shift_mean)
      normalize<scalar_t, true>(px, pm, po, n, all.mean, inv);
    else
      normalize<scalar_t, false>(px, pm, po, n, all.mean, inv);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("masked_whiten", &masked_whiten); }
