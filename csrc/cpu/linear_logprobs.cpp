// CPU entry points of rlhf_kernels::linear_logprobs_{fwd,bwd}: log-probs and entropy of given tokens
// straight from hidden[N, H] and weight[V, H], never holding more than one small logits tile per
// worker. The GEMMs run here; the fused passes over each tile are in cpu/kernels/linear_logprobs.cpp.
//
// Work is cut into tiles of Nc rows × Vc vocabulary entries (about 1 MiB of logits, so a tile stays
// in L2 between its GEMM and the fused pass over it). The vocabulary chunks are split into G
// contiguous groups that run in parallel, one per thread, each doing single-threaded ATen GEMMs on
// its own tiles:
//   forward : Z = h_r · W_cᵀ, then one pass per row of Z keeps an online log-sum-exp + entropy
//             state (rk::LseState) per row and picks the target logit; the G partial states of a
//             row are merged in group order.
//   backward: Z is recomputed and turned in place into d(logits) (the formula of
//             rk::logprob_entropy_grad, divided by temperature, 0 on ignored rows), then
//             d(hidden)_g += dZ · W_c (a per-group [N, H] partial, summed in group order),
//             d(W_c) += dZᵀ · h_r and d(b_c) += column sums of dZ (each vocabulary chunk belongs to
//             one group: no atomics, fixed order, so results are bitwise reproducible for a fixed
//             thread count).
// bf16/fp16 inputs: each hidden tile and weight chunk is cast to fp32 into a reused buffer and every
// GEMM runs in fp32 (CPU low-precision GEMMs are emulated and slower). fp64 inputs run in fp64
// throughout.
// batch_invariant=True takes another path (cpu/linear_logprobs_invariant.cpp): no BLAS, fixed-order tiles.
// `chunk_bytes` bounds every temporary (tiles, cast chunks, d(W) chunks, per-group state and d(hidden)
// partials): rk::linear_plan_cpu (linear_logprobs_plan.h) sizes the tile and the number of parallel
// groups, and gives the exact extra memory.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "common.h"
#include "cpu/kernels.h"
#include "cpu/linear_logprobs_invariant.h"
#include "linear_logprobs_plan.h"

namespace rk_linear_cpu {

using rk::cpu::TileArgs;

// ---- tiling plan ----

constexpr int64_t kDefaultBudget = int64_t(256) << 20;

rk::LinearPlan make_plan(const at::Tensor& hidden, const at::Tensor& weight, int64_t budget, bool backward,
                         bool need_h, bool need_w, bool need_b) {
  const int64_t acc = hidden.scalar_type() == at::kDouble ? 8 : 4;
  const int64_t store = weight.scalar_type() == at::kDouble || weight.scalar_type() == at::kFloat ? acc : 2;
  return rk::linear_plan_cpu({hidden.size(0), weight.size(0), hidden.size(1), acc, store, backward, need_h, need_w,
                              need_b, budget, int64_t(at::get_num_threads())});
}

int64_t budget_of(int64_t chunk_bytes) { return chunk_bytes > 0 ? chunk_bytes : kDefaultBudget; }

// 1/temperature per row, [N] in the accumulation dtype (N values: small next to the per-row state).
at::Tensor inverse_temperatures(const c10::optional<at::Tensor>& temps, double temperature, int64_t N,
                                const at::TensorOptions& opts) {
  if (temps && temps->defined()) return temps->reciprocal();
  return at::full({N}, temperature, opts).reciprocal_();  // 1/t rounded in the accumulation dtype, as before
}

// Rows [r0, r0 + n) of src as a GEMM operand: a view, or (bf16/fp16 inputs) their fp32 copy in buf.
at::Tensor operand(const at::Tensor& src, int64_t r0, int64_t n, at::Tensor& buf) {
  const at::Tensor rows = src.narrow(0, r0, n);
  return buf.defined() ? buf.narrow(0, 0, n).copy_(rows) : rows;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& hidden, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                                                        double temperature, int64_t ignore_index, int64_t budget,
                                                        const c10::optional<at::Tensor>& temps, double softcap) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = rk::accumulation_type(hidden);
  const bool cast = weight.scalar_type() != acc;
  auto opts = hidden.options().dtype(acc);
  auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logp, ent, lse};
  const rk::LinearPlan p = make_plan(hidden, weight, budget, false, false, false, false);
  // per-group row states and the target logits, through the torch allocator (counted by the plan)
  at::Tensor state_buf = at::empty({p.groups * N * int64_t(sizeof(rk::LseState<T>))}, opts.dtype(at::kByte));
  rk::LseState<T>* states = reinterpret_cast<rk::LseState<T>*>(state_buf.mutable_data_ptr<uint8_t>());
  std::fill(states, states + p.groups * N, rk::lse_init<T>());
  at::Tensor tgt_buf = at::zeros({N}, opts);
  T* tgt = tgt_buf.mutable_data_ptr<T>();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const at::Tensor inv_buf = inverse_temperatures(temps, temperature, N, opts);
  const T* inv_t = inv_buf.const_data_ptr<T>();
  auto* fwd_tile = rk::cpu::linear_logprobs_kernels().fwd_tile.of<T>();

  at::parallel_for(0, p.groups, 1, [&](int64_t g0, int64_t g1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: each worker needs its own
    for (int64_t g = g0; g < g1; ++g) {
      at::Tensor zbuf = at::empty({p.nc * p.vc}, opts);
      at::Tensor wbuf = cast ? at::empty({p.vc, H}, opts) : at::Tensor();
      at::Tensor hbuf = cast ? at::empty({p.nc, H}, opts) : at::Tensor();
      rk::LseState<T>* st = states + g * N;
      for (int64_t c = p.first(g); c < p.first(g + 1); ++c) {
        const int64_t v0 = c * p.vc, vc = std::min(p.vc, V - v0);
        const at::Tensor w = operand(weight, v0, vc, wbuf);
        for (int64_t r0 = 0; r0 < N; r0 += p.nc) {
          const int64_t nr = std::min(p.nc, N - r0);
          at::Tensor z = zbuf.narrow(0, 0, nr * vc).view({nr, vc});
          at::mm_out(z, operand(hidden, r0, nr, hbuf), w.t());
          const TileArgs ta{nr, vc, v0, V, ignore_index, tok + r0, softcap};
          fwd_tile(z.mutable_data_ptr<T>(), b ? b + v0 : nullptr, inv_t + r0, ta, st + r0, tgt + r0);
        }
      }
    }
  });

  T* lp = logp.mutable_data_ptr<T>();
  T* en = ent.mutable_data_ptr<T>();
  T* ls = lse.mutable_data_ptr<T>();
  at::parallel_for(0, N, 2048, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      rk::LseState<T> s = states[i];
      for (int64_t g = 1; g < p.groups; ++g) s = rk::lse_merge(s, states[g * N + i]);
      const T l = rk::lse_value(s);
      const int64_t t = tok[i];
      const bool valid = t != ignore_index;
      ls[i] = valid ? l : T(0);
      lp[i] = !valid ? T(0) : (t >= 0 && t < V ? tgt[i] - l : rk::r_nan<T>());
      en[i] = valid ? rk::lse_entropy(s) : T(0);
    }
  });
  return {logp, ent, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const c10::optional<at::Tensor>& bias,
                                                                   const at::Tensor& tokens, double temperature,
                                                                   int64_t ignore_index, int64_t chunk_bytes,
                                                                   const c10::optional<at::Tensor>& temps,
                                                                   double softcap, bool batch_invariant) {
  rk::check_linear_logprobs(hidden, weight, bias, tokens);
  rk::check_head_options("linear_logprobs", temps, softcap, rk::accumulation_type(hidden), hidden.size(0), hidden);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inner GEMMs are not part of any graph
  if (batch_invariant) {
    if (rk::accumulation_type(hidden) == at::kDouble)
      return fwd_invariant<double>(hidden, weight, bias, tokens, temperature, ignore_index, temps, softcap);
    return fwd_invariant<float>(hidden, weight, bias, tokens, temperature, ignore_index, temps, softcap);
  }
  const int64_t budget = budget_of(chunk_bytes);
  if (rk::accumulation_type(hidden) == at::kDouble)
    return fwd_impl<double>(hidden, weight, bias, tokens, temperature, ignore_index, budget, temps, softcap);
  return fwd_impl<float>(hidden, weight, bias, tokens, temperature, ignore_index, budget, temps, softcap);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(const at::Tensor& grad_logp,
                                                        const c10::optional<at::Tensor>& grad_entropy,
                                                        const at::Tensor& hidden, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                                                        const at::Tensor& lse, const at::Tensor& entropy,
                                                        double temperature, int64_t ignore_index, bool need_h,
                                                        bool need_w, bool need_b, int64_t budget,
                                                        const c10::optional<at::Tensor>& temps, double softcap) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = rk::accumulation_type(hidden);
  auto opts = hidden.options().dtype(acc);
  const bool cast = weight.scalar_type() != acc;
  at::Tensor grad_w = need_w ? at::empty({V, H}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor grad_b = need_b ? at::zeros({V}, opts) : at::empty({0}, opts);
  if (!need_h && !need_w && !need_b) return {at::empty({0}, hidden.options()), grad_w, grad_b};
  if (N == 0) {
    if (need_w) grad_w.zero_();
    return {at::empty({0, H}, hidden.options()), grad_w, grad_b};
  }
  const at::Tensor glp = grad_logp.to(acc).contiguous();
  const at::Tensor gh = grad_entropy ? grad_entropy->to(acc).contiguous() : at::Tensor();
  const rk::LinearPlan p = make_plan(hidden, weight, budget, true, need_h, need_w, need_b);
  // d(hidden): the first group accumulates into dh (the output itself for fp32/fp64 inputs), each
  // further group into its own partial; summed in group order at the end
  at::Tensor dh = need_h ? at::zeros({N, H}, opts) : at::Tensor();
  at::Tensor dh_more = need_h && p.groups > 1 ? at::zeros({p.groups - 1, N, H}, opts) : at::Tensor();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const T* lsep = lse.const_data_ptr<T>();
  const T* entp = entropy.const_data_ptr<T>();
  const T* g1 = glp.const_data_ptr<T>();
  const T* g2 = gh.defined() ? gh.const_data_ptr<T>() : nullptr;
  T* dbp = need_b ? grad_b.mutable_data_ptr<T>() : nullptr;
  const at::Tensor inv_buf = inverse_temperatures(temps, temperature, N, opts);
  const T* inv_t = inv_buf.const_data_ptr<T>();
  auto* bwd_tile = rk::cpu::linear_logprobs_kernels().bwd_tile.of<T>();

  at::parallel_for(0, p.groups, 1, [&](int64_t g0, int64_t g1e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t g = g0; g < g1e; ++g) {
      at::Tensor zbuf = at::empty({p.nc * p.vc}, opts);
      at::Tensor wbuf = cast ? at::empty({p.vc, H}, opts) : at::Tensor();
      at::Tensor hbuf = cast ? at::empty({p.nc, H}, opts) : at::Tensor();
      // bf16/fp16: d(W) of a chunk accumulates in fp32 here and is cast into grad_w chunk by chunk
      at::Tensor dwbuf = cast && need_w ? at::empty({p.vc, H}, opts) : at::Tensor();
      at::Tensor dhg = !need_h ? at::Tensor() : (g == 0 ? dh : dh_more.select(0, g - 1));
      for (int64_t c = p.first(g); c < p.first(g + 1); ++c) {
        const int64_t v0 = c * p.vc, vc = std::min(p.vc, V - v0);
        const at::Tensor w = operand(weight, v0, vc, wbuf);
        at::Tensor dw = !need_w ? at::Tensor() : (cast ? dwbuf.narrow(0, 0, vc) : grad_w.narrow(0, v0, vc));
        for (int64_t r0 = 0; r0 < N; r0 += p.nc) {
          const int64_t nr = std::min(p.nc, N - r0);
          at::Tensor z = zbuf.narrow(0, 0, nr * vc).view({nr, vc});
          const at::Tensor hr = operand(hidden, r0, nr, hbuf);
          at::mm_out(z, hr, w.t());
          const TileArgs ta{nr, vc, v0, V, ignore_index, tok + r0, softcap};
          bwd_tile(z.mutable_data_ptr<T>(), b ? b + v0 : nullptr, inv_t + r0, ta,
                   lsep + r0, entp + r0, g1 + r0, g2 ? g2 + r0 : nullptr, dbp ? dbp + v0 : nullptr);
          if (need_h) dhg.narrow(0, r0, nr).addmm_(z, w);
          if (need_w) {
            if (r0 == 0) at::mm_out(dw, z.t(), hr);
            else dw.addmm_(z.t(), hr);
          }
        }
        if (need_w && cast) grad_w.narrow(0, v0, vc).copy_(dw);
      }
    }
  });

  if (!need_h) return {at::empty({0}, hidden.options()), grad_w, grad_b};
  for (int64_t g = 1; g < p.groups; ++g) dh.add_(dh_more.select(0, g - 1));
  return {dh.to(hidden.scalar_type()), grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& tokens, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, bool need_h, bool need_w, bool need_b,
    int64_t chunk_bytes, const c10::optional<at::Tensor>& temps, double softcap, bool batch_invariant) {
  rk::check_linear_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, need_b);
  rk::check_head_options("linear_logprobs_bwd", temps, softcap, rk::accumulation_type(hidden), hidden.size(0), hidden);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (batch_invariant) {
    if (rk::accumulation_type(hidden) == at::kDouble)
      return bwd_invariant<double>(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature,
                                   ignore_index, need_h, need_w, need_b, temps, softcap);
    return bwd_invariant<float>(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature,
                                ignore_index, need_h, need_w, need_b, temps, softcap);
  }
  const int64_t budget = budget_of(chunk_bytes);
  if (rk::accumulation_type(hidden) == at::kDouble)
    return bwd_impl<double>(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature,
                            ignore_index, need_h, need_w, need_b, budget, temps, softcap);
  return bwd_impl<float>(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature,
                         ignore_index, need_h, need_w, need_b, budget, temps, softcap);
}

// Test hook: the plan {nc, vc, chunks, groups, bytes, fixed} the cpu or cuda backend makes for a pass.
std::vector<int64_t> linear_logprobs_plan(int64_t N, int64_t V, int64_t H, int64_t acc_bytes, int64_t store_bytes,
                                          bool backward, bool need_h, bool need_w, bool need_b, int64_t budget,
                                          int64_t threads, bool cuda) {
  const rk::LinearPlanArgs a{N, V, H, acc_bytes, store_bytes, backward, need_h, need_w, need_b, budget_of(budget),
                             threads};
  const rk::LinearPlan p = cuda ? rk::linear_plan_cuda(a) : rk::linear_plan_cpu(a);
  return {p.nc, p.vc, p.chunks, p.groups, p.bytes, p.fixed};
}

}  // namespace rk_linear_cpu

TORCH_LIBRARY_FRAGMENT(rlhf_kernels, m) {
  m.def(
      "_linear_logprobs_plan(int N, int V, int H, int acc_bytes, int store_bytes, bool backward, bool need_hidden, "
      "bool need_weight, bool need_bias, int budget, int threads, bool cuda) -> int[]",
      &rk_linear_cpu::linear_logprobs_plan);
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("linear_logprobs_fwd", &rk_linear_cpu::linear_logprobs_fwd);
  m.impl("linear_logprobs_bwd", &rk_linear_cpu::linear_logprobs_bwd);
}
