// Host-side checks of rlhf_kernels::group_advantages' arguments, shared by its CPU and CUDA entry points.
// The Python layer validates user input; these guard the raw op against calls that would read out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace rk {

// Returns the number of group slots: B / group_size for consecutive groups; B with labels (group_size 0,
// order int64 [B] and offsets int64 [B + 1] from a stable sort of the labels).
inline int64_t check_groups(const at::Tensor& scores, const std::optional<at::Tensor>& order,
                            const std::optional<at::Tensor>& offsets, int64_t group_size) {
  TORCH_CHECK(scores.dim() == 1, "group_advantages: scores must be 1-D, got ", scores.dim(), " dims");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "group_advantages: scores must be float32 or float64, got ", scores.scalar_type());
  const int64_t B = scores.size(0);
  if (group_size != 0) {
    TORCH_CHECK(group_size > 0 && B % group_size == 0, "group_advantages: group_size must be >= 1 and divide ", B,
                ", got ", group_size);
    return B / group_size;
  }
  TORCH_CHECK(order && offsets, "group_advantages: group_size 0 needs order and offsets");
  TORCH_CHECK(order->scalar_type() == at::kLong && order->dim() == 1 && order->size(0) == B,
              "group_advantages: order must be int64 [", B, "]");
  TORCH_CHECK(offsets->scalar_type() == at::kLong && offsets->dim() == 1 && offsets->size(0) == B + 1,
              "group_advantages: offsets must be int64 [", B + 1, "]");
  TORCH_CHECK(order->device() == scores.device() && offsets->device() == scores.device(),
              "group_advantages: order and offsets must be on the scores' device");
  return B;
}

}  // namespace rk
