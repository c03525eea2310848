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
// bf16/fp16 inputs: hidden is cast to fp32 once, each weight chunk is cast to fp32 into a reused
// buffer, and every GEMM runs in fp32 (CPU low-precision GEMMs are emulated and slower). fp64 inputs
// run in fp64 throughout.
// `chunk_bytes` caps the temporaries (tiles, cast weight chunks, per-group d(hidden) partials): it
// limits the number of parallel groups and the tile size; one group always runs.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "common.h"
#include "cpu/kernels.h"

namespace rk_linear_cpu {

using rk::cpu::TileArgs;

// ---- tiling plan ----

constexpr int64_t kDefaultBudget = int64_t(256) << 20;

struct Plan {
  int64_t nc, vc;   // tile rows, tile vocabulary entries
  int64_t chunks;   // vocabulary chunks
  int64_t groups;   // groups of consecutive chunks run in parallel
  int64_t first(int64_t g) const { return g * chunks / groups; }
};

// per_group_fixed: bytes each group needs besides its logits tile (cast weight chunk, d(W) chunk and
// d(hidden) partial are given as per-vocab-entry and fixed parts by the caller).
Plan make_plan(int64_t N, int64_t V, int64_t H, int64_t elem, int64_t budget, bool cast_w, bool dw_buf,
               int64_t per_group_fixed) {
  if (budget <= 0) budget = kDefaultBudget;
  Plan p;
  // a tile of about 1 MiB (fewer when the budget is tiny); at least 1 row and 16 entries
  int64_t tile_elems = std::max<int64_t>(16, std::min<int64_t>(int64_t(1) << 18, budget / 4 / elem));
  p.nc = std::max<int64_t>(1, std::min<int64_t>(N, 512));
  p.vc = std::max<int64_t>(16, std::min<int64_t>({V, tile_elems / p.nc, 4096}));
  p.vc = std::min(p.vc, V);
  p.chunks = (V + p.vc - 1) / p.vc;
  const int64_t per_group = elem * (p.nc * p.vc + (cast_w ? p.vc * H : 0) + (dw_buf ? p.vc * H : 0)) + per_group_fixed;
  const int64_t fit = std::max<int64_t>(1, budget / std::max<int64_t>(1, per_group));
  p.groups = std::max<int64_t>(1, std::min<int64_t>({p.chunks, int64_t(at::get_num_threads()), fit}));
  return p;
}

int64_t budget_of(int64_t chunk_bytes) { return chunk_bytes > 0 ? chunk_bytes : kDefaultBudget; }

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_impl(const at::Tensor& hidden, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                                                        double temperature, int64_t ignore_index, int64_t budget) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = rk::accumulation_type(hidden);
  const bool cast_w = weight.scalar_type() != acc;
  auto opts = hidden.options().dtype(acc);
  auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logp, ent, lse};
  const at::Tensor h = hidden.to(acc);
  const Plan p = make_plan(N, V, H, sizeof(T), budget, cast_w, false, int64_t(sizeof(rk::LseState<T>)) * N);
  std::vector<rk::LseState<T>> states(size_t(p.groups * N), rk::lse_init<T>());
  std::vector<T> tgt(size_t(N), T(0));
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const T inv_t = T(1) / T(temperature);
  auto* fwd_tile = rk::cpu::linear_logprobs_kernels().fwd_tile.of<T>();

  at::parallel_for(0, p.groups, 1, [&](int64_t g0, int64_t g1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: each worker needs its own
    for (int64_t g = g0; g < g1; ++g) {
      at::Tensor zbuf = at::empty({p.nc * p.vc}, opts);
      at::Tensor wbuf = cast_w ? at::empty({p.vc, H}, opts) : at::Tensor();
      rk::LseState<T>* st = states.data() + g * N;
      for (int64_t c = p.first(g); c < p.first(g + 1); ++c) {
        const int64_t v0 = c * p.vc, vc = std::min(p.vc, V - v0);
        at::Tensor w = weight.narrow(0, v0, vc);
        if (cast_w) w = wbuf.narrow(0, 0, vc).copy_(w);
        for (int64_t r0 = 0; r0 < N; r0 += p.nc) {
          const int64_t nr = std::min(p.nc, N - r0);
          at::Tensor z = zbuf.narrow(0, 0, nr * vc).view({nr, vc});
          at::mm_out(z, h.narrow(0, r0, nr), w.t());
          const TileArgs ta{nr, vc, v0, V, ignore_index, tok + r0};
          fwd_tile(z.mutable_data_ptr<T>(), b ? b + v0 : nullptr, inv_t, ta,
                   st + r0, tgt.data() + r0);
        }
      }
    }
  });

  T* lp = logp.mutable_data_ptr<T>();
  T* en = ent.mutable_data_ptr<T>();
  T* ls = lse.mutable_data_ptr<T>();
  at::parallel_for(0, N, 2048, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      rk::LseState<T> s = states[size_t(i)];
      for (int64_t g = 1; g < p.groups; ++g) s = rk::lse_merge(s, states[size_t(g * N + i)]);
      const T l = rk::lse_value(s);
      const int64_t t = tok[i];
      const bool valid = t != ignore_index;
      ls[i] = l;
      lp[i] = !valid ? T(0) : (t >= 0 && t < V ? tgt[size_t(i)] - l : rk::r_nan<T>());
      en[i] = valid ? rk::lse_entropy(s) : T(0);
    }
  });
  return {logp, ent, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                                   const c10::optional<at::Tensor>& bias,
                                                                   const at::Tensor& tokens, double temperature,
                                                                   int64_t ignore_index, int64_t chunk_bytes) {
  rk::check_linear_logprobs(hidden, weight, bias, tokens);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the inner GEMMs are not part of any graph
  const int64_t budget = budget_of(chunk_bytes);
  if (rk::accumulation_type(hidden) == at::kDouble)
    return fwd_impl<double>(hidden, weight, bias, tokens, temperature, ignore_index, budget);
  return fwd_impl<float>(hidden, weight, bias, tokens, temperature, ignore_index, budget);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_impl(const at::Tensor& grad_logp,
                                                        const c10::optional<at::Tensor>& grad_entropy,
                                                        const at::Tensor& hidden, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, const at::Tensor& tokens,
                                                        const at::Tensor& lse, const at::Tensor& entropy,
                                                        double temperature, int64_t ignore_index, bool need_h,
                                                        bool need_w, bool need_b, int64_t budget) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = rk::accumulation_type(hidden);
  auto opts = hidden.options().dtype(acc);
  const bool cast_w = weight.scalar_type() != acc;
  at::Tensor grad_w = need_w ? at::empty({V, H}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor grad_b = need_b ? at::zeros({V}, opts) : at::empty({0}, opts);
  if (!need_h && !need_w && !need_b) return {at::empty({0}, hidden.options()), grad_w, grad_b};
  if (N == 0) {
    if (need_w) grad_w.zero_();
    return {at::empty({0, H}, hidden.options()), grad_w, grad_b};
  }
  const at::Tensor h = hidden.to(acc);
  const at::Tensor glp = grad_logp.to(acc).contiguous();
  const at::Tensor gh = grad_entropy ? grad_entropy->to(acc).contiguous() : at::Tensor();
  const bool dw_buf = need_w && cast_w;
  const Plan p = make_plan(N, V, H, sizeof(T), budget, cast_w, dw_buf, need_h ? int64_t(sizeof(T)) * N * H : 0);
  // one d(hidden) partial per group, summed in group order at the end
  at::Tensor dh_parts = need_h ? at::zeros({p.groups, N, H}, opts) : at::Tensor();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const T* lsep = lse.const_data_ptr<T>();
  const T* entp = entropy.const_data_ptr<T>();
  const T* g1 = glp.const_data_ptr<T>();
  const T* g2 = gh.defined() ? gh.const_data_ptr<T>() : nullptr;
  T* dbp = need_b ? grad_b.mutable_data_ptr<T>() : nullptr;
  const T inv_t = T(1) / T(temperature);
  auto* bwd_tile = rk::cpu::linear_logprobs_kernels().bwd_tile.of<T>();

  at::parallel_for(0, p.groups, 1, [&](int64_t g0, int64_t g1e) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t g = g0; g < g1e; ++g) {
      at::Tensor zbuf = at::empty({p.nc * p.vc}, opts);
      at::Tensor wbuf = cast_w ? at::empty({p.vc, H}, opts) : at::Tensor();
      at::Tensor dwbuf = dw_buf ? at::empty({p.vc, H}, opts) : at::Tensor();
      at::Tensor dh = need_h ? dh_parts.select(0, g) : at::Tensor();
      for (int64_t c = p.first(g); c < p.first(g + 1); ++c) {
        const int64_t v0 = c * p.vc, vc = std::min(p.vc, V - v0);
        at::Tensor w = weight.narrow(0, v0, vc);
        if (cast_w) w = wbuf.narrow(0, 0, vc).copy_(w);
        at::Tensor dw = !need_w ? at::Tensor() : (dw_buf ? dwbuf.narrow(0, 0, vc) : grad_w.narrow(0, v0, vc));
        for (int64_t r0 = 0; r0 < N; r0 += p.nc) {
          const int64_t nr = std::min(p.nc, N - r0);
          at::Tensor z = zbuf.narrow(0, 0, nr * vc).view({nr, vc});
          at::Tensor hr = h.narrow(0, r0, nr);
          at::mm_out(z, hr, w.t());
          const TileArgs ta{nr, vc, v0, V, ignore_index, tok + r0};
          bwd_tile(z.mutable_data_ptr<T>(), b ? b + v0 : nullptr, inv_t, ta,
                   lsep + r0, entp + r0, g1 + r0, g2 ? g2 + r0 : nullptr, dbp ? dbp + v0 : nullptr);
          if (need_h) dh.narrow(0, r0, nr).addmm_(z, w);
          if (need_w) {
            if (r0 == 0) at::mm_out(dw, z.t(), hr);
            else dw.addmm_(z.t(), hr);
          }
        }
        if (dw_buf) grad_w.narrow(0, v0, vc).copy_(dw);
      }
    }
  });

  at::Tensor grad_h;
  if (need_h) {
    grad_h = dh_parts.select(0, 0);
    for (int64_t g = 1; g < p.groups; ++g) grad_h.add_(dh_parts.select(0, g));
    grad_h = grad_h.to(hidden.scalar_type());
  } else {
    grad_h = at::empty({0}, hidden.options());
  }
  return {grad_h, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& tokens, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, int64_t ignore_index, bool need_h, bool need_w, bool need_b,
    int64_t chunk_bytes) {
  rk::check_linear_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, need_b);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t budget = budget_of(chunk_bytes);
  if (rk::accumulation_type(hidden) == at::kDouble)
    return bwd_impl<double>(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature,
                            ignore_index, need_h, need_w, need_b, budget);
  return bwd_impl<float>(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature,
                         ignore_index, need_h, need_w, need_b, budget);
}

}  // namespace rk_linear_cpu

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("linear_logprobs_fwd", &rk_linear_cpu::linear_logprobs_fwd);
  m.impl("linear_logprobs_bwd", &rk_linear_cpu::linear_logprobs_bwd);
}
