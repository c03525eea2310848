// CPU entry point of rlhf_kernels::group_advantages: groups in parallel (cpu/kernels/group_advantages.cpp).
// Groups are consecutive blocks of group_size, or (group_size == 0) the runs order[offsets[k]:offsets[k + 1]]
// of a stable sort of the labels (rlhf_kernels/ops/group_advantages.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/kernels.h"

namespace {

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
  rk::float_or_double(s, [&](auto tag) {
    using T = decltype(tag);
    const rk::cpu::GroupArgs<T> a{s.const_data_ptr<T>(), labelled ? ord.const_data_ptr<int64_t>() : nullptr,
                                  labelled ? off.const_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<T>(), B,
                                  group_size, baseline, scale, static_cast<T>(eps)};
    auto* fn = rk::cpu::group_advantages_kernels().groups.of<T>();
    at::parallel_for(0, slots, grain, [&](int64_t lo, int64_t hi) {
      const rk::cpu::GroupStatus st = fn(a, lo, hi);
      TORCH_CHECK(st != rk::cpu::GroupStatus::bad_offsets, "group_advantages: offsets must be non-decreasing in [0, ",
                  B, "]");
      TORCH_CHECK(st != rk::cpu::GroupStatus::bad_order, "group_advantages: order holds an index outside [0, ", B,
                  ")");
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("group_advantages", &group_advantages); }
