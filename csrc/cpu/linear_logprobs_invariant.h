// The batch-invariant path of the CPU linear_logprobs (cpu/linear_logprobs_invariant.cpp), called by the
// entry points of cpu/linear_logprobs.cpp when batch_invariant is set, with the same arguments after the checks.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace rk_linear_cpu {

// shared with cpu/linear_logprobs.cpp
at::Tensor inverse_temperatures(const c10::optional<at::Tensor>& temps, double temperature, int64_t N,
                                const at::TensorOptions& opts);
at::Tensor operand(const at::Tensor& src, int64_t r0, int64_t n, at::Tensor& buf);

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_invariant(const at::Tensor& hidden, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& tokens, double temperature,
                                                             int64_t ignore_index,
                                                             const c10::optional<at::Tensor>& temps, double softcap);

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_invariant(const at::Tensor& grad_logp,
                                                             const c10::optional<at::Tensor>& grad_entropy,
                                                             const at::Tensor& hidden, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& tokens, const at::Tensor& lse,
                                                             const at::Tensor& entropy, double temperature,
                                                             int64_t ignore_index, bool need_h, bool need_w,
                                                             bool need_b, const c10::optional<at::Tensor>& temps,
                                                             double softcap);

}  // namespace rk_linear_cpu
