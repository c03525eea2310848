// Batch-invariant linear_logprobs on CPU (batch_invariant=True): each row's log-prob, entropy and row of
// d(hidden) are bitwise the same whatever the rest of the batch. Why it holds, by construction:
//  - the logits: Z = h·Wᵀ is computed by the fixed-order dot tiles of cpu/kernels/fixed_gemm.cpp, where an
//    element's order of operations depends on H alone (not on the tile's rows, the row's place in the tile,
//    the thread count or any address). No BLAS call: a BLAS GEMM may choose its blocking, split-K and
//    kernels from the shapes and the thread count.
//  - the vocabulary: chunks of kVc entries from 0, a function of V alone. A row's log-sum-exp state folds
//    the chunks in ascending order (rk::lse_merge); each chunk's row pass (the same fused pass as the
//    default mode) runs on a row that starts 64-byte aligned in a buffer of fixed stride kVc, so even the
//    compiler's vector loop prologue is the same for every row.
//  - forward: threads work on whole rows (tiles of rows, any size: no row's arithmetic depends on it), so
//    there is no merge of per-thread partials.
//  - the backward runs blocks of rows in turn, the vocabulary split into kGroups fixed groups of chunks in
//    parallel: d(hidden)[i, :] is the sum, in group order, of each group's Σ_j dz[i, j]·W[j, :] over its j
//    in ascending order (an order set by V alone); each group's partial is its own buffer.
// The weight and bias gradients sum over rows: each chunk belongs to one group, which adds dzᵀ·h of each row
// block in order: deterministic run to run (for a given batch), no atomics.
// Cost next to the default mode: the fixed-order tiles run slower than a tuned BLAS GEMM (BENCHMARKS.md has
// the measured ratio). Extra memory: per thread a logits tile (at most kBlockRows × kVc) and, for bf16/fp16
// inputs, the fp32 copies of a row block and a weight chunk; the group partials kGroups·kBlockRows·H; the
// [N, H] d(hidden) accumulator as in the default mode; and, for bf16/fp16 weights, an fp32 d(W) [V, H].
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "common.h"
#include "cpu/kernels.h"
#include "cpu/linear_logprobs_invariant.h"

namespace rk_linear_cpu {
namespace {

// Vocabulary entries per chunk: fixed, so a row's fold over the chunks depends on V alone. Also the
// stride of the logits tile's rows (a multiple of 16 elements: every row starts 64-byte aligned).
constexpr int64_t kVc = 1024;
// Rows per task at most: any value gives the same results; 64 rows × kVc fp32 logits = 256 KiB (L2).
constexpr int64_t kMaxTileRows = 64;
// Backward: vocabulary groups run in parallel (fixed: a row's d(hidden) adds their partials in this order),
// over blocks of rows (any size gives the same rows; it bounds the partials, kGroups·kBlockRows·H).
constexpr int64_t kGroups = 8;
constexpr int64_t kBlockRows = 256;

int64_t tile_rows(int64_t N) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(kMaxTileRows, (N + threads - 1) / threads));
}

}  // namespace

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_invariant(const at::Tensor& hidden, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& tokens, double temperature,
                                                             int64_t ignore_index,
                                                             const c10::optional<at::Tensor>& temps, double softcap) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = rk::accumulation_type(hidden);
  const bool cast = weight.scalar_type() != acc;
  auto opts = hidden.options().dtype(acc);
  auto logp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
  if (N == 0) return {logp, ent, lse};
  at::Tensor state_buf = at::empty({N * int64_t(sizeof(rk::LseState<T>))}, opts.dtype(at::kByte));
  rk::LseState<T>* st = reinterpret_cast<rk::LseState<T>*>(state_buf.mutable_data_ptr<uint8_t>());
  std::fill(st, st + N, rk::lse_init<T>());
  at::Tensor tgt_buf = at::zeros({N}, opts);
  T* tgt = tgt_buf.mutable_data_ptr<T>();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const at::Tensor inv_buf = inverse_temperatures(temps, temperature, N, opts);
  const T* inv_t = inv_buf.const_data_ptr<T>();
  auto* fwd_row = rk::cpu::linear_logprobs_kernels().fwd_tile.of<T>();
  auto* dot = rk::cpu::fixed_gemm_kernels().dot.of<T>();
  const int64_t nt = tile_rows(N), tiles = (N + nt - 1) / nt;

  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor zbuf = at::empty({nt * kVc}, opts);
    at::Tensor wbuf = cast ? at::empty({kVc, H}, opts) : at::Tensor();
    at::Tensor hbuf = cast ? at::empty({nt, H}, opts) : at::Tensor();
    T* z = zbuf.mutable_data_ptr<T>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * nt, nr = std::min(nt, N - r0);
      const T* h = operand(hidden, r0, nr, hbuf).const_data_ptr<T>();
      for (int64_t v0 = 0; v0 < V; v0 += kVc) {
        const int64_t vc = std::min(kVc, V - v0);
        dot(h, operand(weight, v0, vc, wbuf).const_data_ptr<T>(), z, nr, vc, H, kVc);
        for (int64_t i = 0; i < nr; ++i) {  // one row at a time: each row's pass sees the same layout
          const int64_t r = r0 + i;
          const rk::cpu::TileArgs ta{1, vc, v0, V, ignore_index, tok + r, softcap};
          fwd_row(z + i * kVc, b ? b + v0 : nullptr, inv_t + r, ta, st + r, tgt + r);
        }
      }
    }
  });

  T* lp = logp.mutable_data_ptr<T>();
  T* en = ent.mutable_data_ptr<T>();
  T* ls = lse.mutable_data_ptr<T>();
  for (int64_t i = 0; i < N; ++i) {
    const T l = rk::lse_value(st[i]);
    const int64_t t = tok[i];
    const bool valid = t != ignore_index;
    ls[i] = valid ? l : T(0);
    lp[i] = !valid ? T(0) : (t >= 0 && t < V ? tgt[i] - l : rk::r_nan<T>());
    en[i] = valid ? rk::lse_entropy(st[i]) : T(0);
  }
  return {logp, ent, lse};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_invariant(const at::Tensor& grad_logp,
                                                             const c10::optional<at::Tensor>& grad_entropy,
                                                             const at::Tensor& hidden, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& tokens, const at::Tensor& lse,
                                                             const at::Tensor& entropy, double temperature,
                                                             int64_t ignore_index, bool need_h, bool need_w,
                                                             bool need_b, const c10::optional<at::Tensor>& temps,
                                                             double softcap) {
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = rk::accumulation_type(hidden);
  auto opts = hidden.options().dtype(acc);
  const bool cast = weight.scalar_type() != acc;
  at::Tensor grad_w = need_w ? at::zeros({V, H}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor grad_b = need_b ? at::zeros({V}, opts) : at::empty({0}, opts);
  if (!need_h && !need_w && !need_b) return {at::empty({0}, hidden.options()), grad_w, grad_b};
  if (N == 0) return {at::empty({0, H}, hidden.options()), grad_w, grad_b};
  const at::Tensor glp = grad_logp.to(acc).contiguous();
  const at::Tensor gh = grad_entropy ? grad_entropy->to(acc).contiguous() : at::Tensor();
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const T* b = bias ? bias->const_data_ptr<T>() : nullptr;
  const T* lsep = lse.const_data_ptr<T>();
  const T* entp = entropy.const_data_ptr<T>();
  const T* g1 = glp.const_data_ptr<T>();
  const T* g2 = gh.defined() ? gh.const_data_ptr<T>() : nullptr;
  const at::Tensor inv_buf = inverse_temperatures(temps, temperature, N, opts);
  const T* inv_t = inv_buf.const_data_ptr<T>();
  auto* bwd_row = rk::cpu::linear_logprobs_kernels().bwd_tile.of<T>();
  auto* dot = rk::cpu::fixed_gemm_kernels().dot.of<T>();
  auto* axpy = rk::cpu::fixed_gemm_kernels().axpy.of<T>();
  const int64_t chunks = (V + kVc - 1) / kVc;

  // Z of rows [r0, r0 + nr) × chunk [v0, v0 + vc) turned into d(logits), row by row; db (if given) += its
  // column sums in row order. Both passes call it, so both see the same d(logits).
  auto dlogits = [&](T* z, const T* h, const T* w, int64_t r0, int64_t nr, int64_t v0, int64_t vc, T* db) {
    dot(h, w, z, nr, vc, H, kVc);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = r0 + i;
      const rk::cpu::TileArgs ta{1, vc, v0, V, ignore_index, tok + r, softcap};
      bwd_row(z + i * kVc, b ? b + v0 : nullptr, inv_t + r, ta, lsep + r, entp + r, g1 + r, g2 ? g2 + r : nullptr,
              db);
    }
  };

  // Blocks of rows one after the other; in each, the kGroups vocabulary groups run in parallel. A group
  // computes d(logits) of its chunks once and uses it twice: d(hidden) into the group's own [rows, H]
  // partial (summed over its chunks in ascending order), and d(W) of its chunks (each chunk belongs to one
  // group; summed over the row blocks in order). A row's d(hidden) is then the sum of the group partials in
  // group order: the groups, like the chunks, are a function of V alone.
  const int64_t G = std::min(kGroups, chunks);
  auto first = [&](int64_t g) { return g * chunks / G; };
  at::Tensor dh = need_h ? at::empty({N, H}, opts) : at::Tensor();
  at::Tensor part = need_h ? at::empty({G, kBlockRows, H}, opts) : at::Tensor();
  // bf16/fp16 weights: d(W) accumulates in fp32 over all row blocks before its cast
  at::Tensor dwacc = cast && need_w ? at::zeros({V, H}, opts) : at::Tensor();
  T* dwp = !need_w ? nullptr : (cast ? dwacc.mutable_data_ptr<T>() : grad_w.mutable_data_ptr<T>());
  T* dbp = need_b ? grad_b.mutable_data_ptr<T>() : nullptr;
  for (int64_t r0 = 0; r0 < N; r0 += kBlockRows) {
    const int64_t nr = std::min(kBlockRows, N - r0);
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1e) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor zbuf = at::empty({nr * kVc}, opts);
      at::Tensor wbuf = cast ? at::empty({kVc, H}, opts) : at::Tensor();
      at::Tensor hbuf = cast ? at::empty({nr, H}, opts) : at::Tensor();
      T* z = zbuf.mutable_data_ptr<T>();
      const T* h = operand(hidden, r0, nr, hbuf).const_data_ptr<T>();
      for (int64_t g = g0; g < g1e; ++g) {
        T* pg = need_h ? part.select(0, g).narrow(0, 0, nr).zero_().mutable_data_ptr<T>() : nullptr;
        for (int64_t c = first(g); c < first(g + 1); ++c) {
          const int64_t v0 = c * kVc, vc = std::min(kVc, V - v0);
          const T* w = operand(weight, v0, vc, wbuf).const_data_ptr<T>();
          dlogits(z, h, w, r0, nr, v0, vc, dbp ? dbp + v0 : nullptr);
          if (need_h) axpy(z, kVc, 1, w, pg, nr, vc, H);
          if (need_w) axpy(z, 1, kVc, h, dwp + v0 * H, vc, nr, H);
        }
      }
    });
    if (need_h) {  // elementwise adds, in group order
      at::Tensor dhr = dh.narrow(0, r0, nr);
      dhr.copy_(part.select(0, 0).narrow(0, 0, nr));
      for (int64_t g = 1; g < G; ++g) dhr.add_(part.select(0, g).narrow(0, 0, nr));
    }
  }
  if (need_w && cast) grad_w.copy_(dwacc);

  if (!need_h) return {at::empty({0}, hidden.options()), grad_w, grad_b};
  return {dh.to(hidden.scalar_type()), grad_w, grad_b};
}

#define RK_INSTANTIATE(T)                                                                                           \
  template std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_invariant<T>(                                         \
      const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, double, int64_t,   \
      const c10::optional<at::Tensor>&, double);                                                                    \
  template std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_invariant<T>(                                         \
      const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,                    \
      const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,   \
      bool, bool, bool, const c10::optional<at::Tensor>&, double);
RK_INSTANTIATE(float)
RK_INSTANTIATE(double)
#undef RK_INSTANTIATE

}  // namespace rk_linear_cpu
