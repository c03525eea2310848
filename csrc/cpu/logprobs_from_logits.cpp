// CPU entry points of rlhf_kernels::logprobs_from_logits_{fwd,bwd}: checks, outputs, and the row loops
// of cpu/kernels/logprobs_from_logits.cpp in parallel. Inputs are read in their own dtype (fp32, bf16,
// fp16 accumulate in float; fp64 in double). Leading dims may have any strides (e.g. logits[:, :-1]);
// only the vocabulary dim must be contiguous (the Python layer ensures it). Only lse[N] (and
// entropy[N]) is kept for backward.
// Batch-invariant in every mode (the batch_invariant flag changes nothing here): a row is reduced by one
// task on its own, in chunks and SIMD lanes counted from the row's first element with unaligned loads, so
// its order of operations depends on V alone, not on N, its position, the thread count or its address.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cpu/kernels.h"

namespace {

using rk::cpu::Dtype;

Dtype dtype_of(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kBFloat16: return Dtype::bf16;
    case at::kHalf: return Dtype::f16;
    default: TORCH_CHECK(false, "logprobs_from_logits: unsupported logits dtype ", logits.scalar_type());
  }
}

// Rows per task: enough elements per task that scheduling is noise.
int64_t grain_for(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 15) / V); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_from_logits_fwd(const at::Tensor& logits_in,
                                                                        const at::Tensor& tokens, double temperature,
                                                                        int64_t ignore_index, bool return_entropy,
                                                                        const std::optional<at::Tensor>& temps,
                                                                        double softcap, bool /*batch_invariant*/) {
  rk::check_logprobs_from_logits(logits_in, tokens);
  rk::check_head_options("logprobs_from_logits", temps, softcap, rk::accumulation_type(logits_in), tokens.numel(),
                         logits_in);
  rk::cpu::LogitsFwdArgs a{};
  const at::Tensor logits = rk::readable_rows(logits_in, a.rows);
  a.dtype = dtype_of(logits);
  auto opts = logits.options().dtype(rk::accumulation_type(logits));
  auto shape = tokens.sizes();
  at::Tensor logp = at::empty(shape, opts), lse = at::empty(shape, opts);
  at::Tensor ent = return_entropy ? at::empty(shape, opts) : at::empty({0}, opts);
  const int64_t N = tokens.numel();
  if (N == 0) return {logp, ent, lse};
  a.logits = logits.const_data_ptr();
  a.V = logits.size(-1);
  a.tokens = tokens.const_data_ptr<int64_t>();
  a.logp = logp.mutable_data_ptr(), a.lse = lse.mutable_data_ptr();
  a.ent = return_entropy ? ent.mutable_data_ptr() : nullptr;
  a.inv_t = 1.0 / temperature;
  a.temps = temps && temps->defined() ? temps->const_data_ptr() : nullptr;
  a.softcap = softcap;
  a.ignore_index = ignore_index;
  auto* fn = rk::cpu::logprobs_from_logits_kernels().fwd;
  at::parallel_for(0, N, grain_for(a.V), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  return {logp, ent, lse};
}

at::Tensor logprobs_from_logits_bwd(const std::optional<at::Tensor>& grad_logp,
                                    const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                                    const at::Tensor& tokens, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature, int64_t ignore_index, const std::optional<at::Tensor>& temps,
                                    double softcap, bool /*batch_invariant*/) {
  rk::check_logprobs_from_logits_bwd(grad_logp, grad_entropy, logits_in, tokens, lse, entropy);
  rk::check_head_options("logprobs_from_logits_bwd", temps, softcap, rk::accumulation_type(logits_in),
                         tokens.numel(), logits_in);
  rk::cpu::LogitsBwdArgs a{};
  const at::Tensor logits = rk::readable_rows(logits_in, a.rows);
  a.dtype = dtype_of(logits);
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t N = tokens.numel();
  if (N == 0) return grad;
  const bool has_glp = grad_logp.has_value() && grad_logp->defined();
  const bool has_gH = grad_entropy.has_value() && grad_entropy->defined();
  a.logits = logits.const_data_ptr();
  a.V = logits.size(-1);
  a.tokens = tokens.const_data_ptr<int64_t>();
  a.g_logp = has_glp ? grad_logp->const_data_ptr() : nullptr;
  a.g_ent = has_gH ? grad_entropy->const_data_ptr() : nullptr;
  a.lse = lse.const_data_ptr();
  a.ent = has_gH ? entropy.const_data_ptr() : nullptr;
  a.grad = grad.mutable_data_ptr();
  a.inv_t = 1.0 / temperature;
  a.temps = temps && temps->defined() ? temps->const_data_ptr() : nullptr;
  a.softcap = softcap;
  a.ignore_index = ignore_index;
  auto* fn = rk::cpu::logprobs_from_logits_kernels().bwd;
  at::parallel_for(0, N, grain_for(a.V), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("logprobs_from_logits_fwd", &logprobs_from_logits_fwd);
  m.impl("logprobs_from_logits_bwd", &logprobs_from_logits_bwd);
}
