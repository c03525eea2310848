// CPU kernel of rlhf_kernels::group_advantages: groups in parallel; each group is read three times in
// member order (sum, squared deviations, advantages) while it sits in cache, so the result does not
// depend on the thread count. Groups are consecutive blocks of group_size, or (group_size == 0) the runs
// order[offsets[k]:offsets[k + 1]] of a stable sort of the labels (rlhf_kernels/ops/group_advantages.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "checks.h"

namespace {

template <typename T, typename Index>
void group_range(const T* s, T* out, int64_t n, Index at, int64_t baseline, int64_t scale, T eps) {
  T sum = 0;
  for (int64_t p = 0; p < n; ++p) sum += s[at(p)];
  const T mean = sum / T(n);
  T m2 = 0;
  if (scale == rk::SCALE_STD) {
    for (int64_t p = 0; p < n; ++p) {
      const T d = s[at(p)] - mean;
      m2 += d * d;
    }
  }
  const rk::GroupAffine<T> f = rk::group_affine(n, mean, m2, baseline, scale, eps);
  for (int64_t p = 0; p < n; ++p) out[at(p)] = (s[at(p)] - f.shift) * f.mult;
}

at::Tensor group_advantages(const at::Tensor& scores, const std::optional<at::Tensor>& order,
                            const std::optional<at::Tensor>& offsets, int64_t group_size, int64_t baseline,
                            int64_t scale, double eps) {
  const int64_t slots = rk::check_groups(scores, order, offsets, group_size);
  const int64_t B = scores.size(0);
  const bool labelled = group_size == 0;
  auto s = scores.contiguous();
  auto out = at::empty_like(s);
  if (B == 0) return out;
  const at::Tensor ord = labelled ? order->contiguous() : at::Tensor();
  const at::Tensor off = labelled ? offsets->contiguous() : at::Tensor();
  const int64_t grain = labelled ? 256 : std::max<int64_t>(1, (1 << 14) / group_size);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "group_advantages", [&] {
    const scalar_t* ps = s.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    if (!labelled) {
      at::parallel_for(0, slots, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k)
          group_range(ps + k * group_size, po + k * group_size, group_size, [](int64_t p) { return p; }, baseline,
                      scale, e);
      });
      return;
    }
    const int64_t* pi = ord.const_data_ptr<int64_t>();
    const int64_t* pf = off.const_data_ptr<int64_t>();
    at::parallel_for(0, slots, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t start = pf[k], end = pf[k + 1];
        TORCH_CHECK(0 <= start && start <= end && end <= B, "group_advantages: offsets must be non-decreasing in [0, ",
                    B, "]");
        if (start == end) continue;
        const int64_t* members = pi + start;
        for (int64_t p = 0; p < end - start; ++p)
          TORCH_CHECK(0 <= members[p] && members[p] < B, "group_advantages: order holds an index outside [0, ", B, ")");
        group_range(ps, po, end - start, [members](int64_t p) { return members[p]; }, baseline, scale, e);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("group_advantages", &group_advantages); }
