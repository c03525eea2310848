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
#include "cpu/logprobs_replay.h"

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

// Call F<T, in_t>::run(args...) for the logits dtype (T: the accumulation type).
template <template <typename, typename> class F, typename... A> void by_dtype(Dtype d, A&&... args) {
  switch (d) {
    case Dtype::f64: return F<double, double>::run(args...);
    case Dtype::bf16: return F<float, c10::BFloat16>::run(args...);
    case Dtype::f16: return F<float, c10::Half>::run(args...);
    default: return F<float, float>::run(args...);
  }
}
template <typename T, typename in_t> struct ThresholdRows {
  static void run(const rk::cpu::LogitsFwdArgs& a, const int64_t* k, const at::Tensor* top_p, at::Tensor& thr) {
    const T* p = top_p ? top_p->const_data_ptr<T>() : nullptr;
    T* out = thr.mutable_data_ptr<T>();
    at::parallel_for(0, thr.numel(), 1, [&](int64_t lo, int64_t hi) {
      rk::cpu::replay::threshold_rows<T, in_t>(a, k, p, out, lo, hi);
    });
  }
};
template <typename T, typename in_t> struct ReplayFwd {
  static void run(const rk::cpu::LogitsFwdArgs& a, const at::Tensor& thr) {
    const T* t = thr.const_data_ptr<T>();
    at::parallel_for(0, thr.numel(), 1, [&](int64_t lo, int64_t hi) { rk::cpu::replay::fwd_rows<T, in_t>(a, t, lo, hi); });
  }
};
template <typename T, typename in_t> struct ReplayBwd {
  static void run(const rk::cpu::LogitsBwdArgs& a, const at::Tensor& thr) {
    const T* t = thr.const_data_ptr<T>();
    at::parallel_for(0, thr.numel(), 1, [&](int64_t lo, int64_t hi) { rk::cpu::replay::bwd_rows<T, in_t>(a, t, lo, hi); });
  }
};

bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The replay's threshold per row (−inf: nothing cut; csrc/replay.h): top_k int64 [N] and top_p [N] in the
// accumulation dtype, either may be absent.
at::Tensor logprobs_from_logits_threshold(const at::Tensor& logits_in, const at::Tensor& tokens, double temperature,
                                          int64_t ignore_index, const std::optional<at::Tensor>& temps,
                                          double softcap, const std::optional<at::Tensor>& top_k,
                                          const std::optional<at::Tensor>& top_p) {
  rk::check_replay_threshold(logits_in, tokens, temps, softcap, top_k, top_p);
  const auto acc = rk::accumulation_type(logits_in);
  rk::cpu::LogitsFwdArgs a{};
  const at::Tensor logits = rk::readable_rows(logits_in, a.rows);
  a.dtype = dtype_of(logits);
  at::Tensor thr = at::empty(tokens.sizes(), logits.options().dtype(acc));
  const int64_t N = tokens.numel();
  if (N == 0) return thr;
  a.logits = logits.const_data_ptr();
  a.V = logits.size(-1);
  a.tokens = tokens.const_data_ptr<int64_t>();
  a.inv_t = 1.0 / temperature;
  a.temps = has(temps) ? temps->const_data_ptr() : nullptr;
  a.softcap = softcap;
  a.ignore_index = ignore_index;
  const int64_t* k = has(top_k) ? top_k->const_data_ptr<int64_t>() : nullptr;
  by_dtype<ThresholdRows>(a.dtype, a, k, has(top_p) ? &*top_p : nullptr, thr);
  return thr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_from_logits_fwd(const at::Tensor& logits_in,
                                                                        const at::Tensor& tokens, double temperature,
                                                                        int64_t ignore_index, bool return_entropy,
                                                                        const std::optional<at::Tensor>& temps,
                                                                        double softcap, bool /*batch_invariant*/,
                                                                        const std::optional<at::Tensor>& thresholds) {
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
  if (has(thresholds)) {  // the sampler replay: rows cut at their threshold
    rk::check_per_row("logprobs_from_logits_fwd", "thresholds", *thresholds, rk::accumulation_type(logits), N, logits);
    by_dtype<ReplayFwd>(a.dtype, a, *thresholds);
    return {logp, ent, lse};
  }
  auto* fn = rk::cpu::logprobs_from_logits_kernels().fwd;
  at::parallel_for(0, N, grain_for(a.V), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  return {logp, ent, lse};
}

at::Tensor logprobs_from_logits_bwd(const std::optional<at::Tensor>& grad_logp,
                                    const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                                    const at::Tensor& tokens, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature, int64_t ignore_index, const std::optional<at::Tensor>& temps,
                                    double softcap, bool /*batch_invariant*/,
                                    const std::optional<at::Tensor>& thresholds) {
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
  if (has(thresholds)) {
    rk::check_per_row("logprobs_from_logits_bwd", "thresholds", *thresholds, lse.scalar_type(), N, logits);
    by_dtype<ReplayBwd>(a.dtype, a, *thresholds);
    return grad;
  }
  auto* fn = rk::cpu::logprobs_from_logits_kernels().bwd;
  at::parallel_for(0, N, grain_for(a.V), [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("logprobs_from_logits_fwd", &logprobs_from_logits_fwd);
  m.impl("logprobs_from_logits_bwd", &logprobs_from_logits_bwd);
  m.impl("logprobs_from_logits_threshold", &logprobs_from_logits_threshold);
}
