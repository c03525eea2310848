// Loops of linear_logprobs: the fused passes over one logits tile, compiled once per ISA (cpu/kernels.h).
// The entry point (cpu/linear_logprobs.cpp) runs the GEMMs that fill each tile.
#include <cmath>
#include <cstring>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

// e^x in the fused passes is rk::r_exp (common.h): branch-free, so the loops that call it vectorise;
// it gives exactly 0 below e^-87.3, which is what the callers want for -inf logits.

// ---- the fused per-tile passes (z = cap(x + b)·invT, cap(y) = c·tanh(y/c) with a softcap c, else y) ----

// the softcap of a tile (in place, before the rest of the pass), and the factor its gradient picks up,
// d cap(y)/dy = 1 − (cap(y)/c)²
template <typename T, bool kBias>
void cap_row(T* z, const T* b, int64_t vc, T c) {
  const T ic = T(1) / c;
#pragma omp simd
  for (int64_t j = 0; j < vc; ++j) z[j] = c * rk::r_tanh((z[j] + (kBias ? b[j] : T(0))) * ic);
}

// One row of a logits tile: scale it in place, return its (max, Σe, Σe·(z − max)) state.
template <typename T, bool kBias>
RK_ALWAYS_INLINE rk::LseState<T> row_state(T* z, const T* b, int64_t vc, T inv_t) {
  T m = -rk::r_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < vc; ++j) {
    T v = (z[j] + (kBias ? b[j] : T(0))) * inv_t;
    z[j] = v;
    m = v > m ? v : m;
  }
  if (m == -rk::r_inf<T>()) return rk::lse_init<T>();
  T s = 0, w = 0;
#pragma omp simd reduction(+ : s, w)
  for (int64_t j = 0; j < vc; ++j) {
    T d = z[j] - m;
    T e = rk::r_exp(d);
    s += e;
    w += e > T(0) ? e * d : T(0);  // e·d is 0·(−inf) for −inf logits
  }
  return {m, s, w};
}

// One row of a logits tile turned into d(logits): the per-logit gradient of g_lp·logp + g_H·H
// (rk::logprob_entropy_grad, without its target term, which the caller adds), times invT.
template <typename T, bool kBias>
RK_ALWAYS_INLINE void row_grad(T* z, const T* b, int64_t vc, T inv_t, T lse, T ent, T g_lp,
                                                    T g_h) {
  const T a = -g_lp * inv_t, c = -g_h * inv_t;
#pragma omp simd
  for (int64_t j = 0; j < vc; ++j) {
    T lp = (z[j] + (kBias ? b[j] : T(0))) * inv_t - lse;
    T p = rk::r_exp(lp);
    T pe = p > T(0) ? p * (lp + ent) : T(0);
    z[j] = a * p + c * pe;
  }
}

// Forward pass over a tile: merge each row's chunk state into st[i], pick the target logit.
template <typename T>
void fwd_tile(T* Z, const T* b, const T* inv_t, const TileArgs& a, rk::LseState<T>* st, T* tgt) {
  const T cap = T(a.softcap);
  for (int64_t i = 0; i < a.nr; ++i) {
    T* z = Z + i * a.vc;
    if (a.tok[i] == a.ignore_index) continue;  // its outputs are zeros: no pass over its logits
    const T* bb = b;
    if (cap > T(0)) {  // the bias goes inside the cap, so it is applied here and not again
      if (b) cap_row<T, true>(z, b, a.vc, cap);
      else cap_row<T, false>(z, b, a.vc, cap);
      bb = nullptr;
    }
    rk::LseState<T> s = bb ? row_state<T, true>(z, bb, a.vc, inv_t[i]) : row_state<T, false>(z, bb, a.vc, inv_t[i]);
    st[i] = rk::lse_merge(st[i], s);
    const int64_t t = a.tok[i] - a.v0;
    if (t >= 0 && t < a.vc) tgt[i] = z[t];
  }
}

// Backward pass over a tile: Z becomes d(logits) in place; db (if given) += its column sums.
template <typename T>
void bwd_tile(T* Z, const T* b, const T* inv_t, const TileArgs& a, const T* lse, const T* ent, const T* g_lp,
              const T* g_h, T* db) {
  const T cap = T(a.softcap);
  for (int64_t i = 0; i < a.nr; ++i) {
    T* z = Z + i * a.vc;
    const int64_t tok = a.tok[i];
    const bool valid = tok != a.ignore_index;
    // an out-of-range token (validate=False) has logp = NaN and, as in the reference, no logp gradient
    const T g1 = valid && tok >= 0 && tok < a.vocab ? g_lp[i] : T(0);
    const T g2 = valid && g_h ? g_h[i] : T(0);
    if (g1 == T(0) && g2 == T(0)) {
      std::memset(z, 0, sizeof(T) * a.vc);
      continue;
    }
    const T it = inv_t[i];
    if (cap > T(0)) {
      if (b) cap_row<T, true>(z, b, a.vc, cap);
      else cap_row<T, false>(z, b, a.vc, cap);
      // z holds cap(y) now; keep d cap/dy = 1 − (cap/c)² aside in the same pass order as below
      const T ic = T(1) / cap, l = lse[i], h = ent[i];
      const int64_t t = tok - a.v0;
#pragma omp simd
      for (int64_t j = 0; j < a.vc; ++j) {
        const T y = z[j];
        const T lp = y * it - l;
        const T p = rk::r_exp(lp);
        const T pe = p > T(0) ? p * (lp + h) : T(0);
        const T u = y * ic;
        z[j] = ((-g1 * it) * p + (-g2 * it) * pe + (j == t ? g1 * it : T(0))) * (T(1) - u * u);
      }
      continue;
    }
    if (b) row_grad<T, true>(z, b, a.vc, it, lse[i], ent[i], g1, g2);
    else row_grad<T, false>(z, b, a.vc, it, lse[i], ent[i], g1, g2);
    const int64_t t = tok - a.v0;
    if (t >= 0 && t < a.vc) z[t] += g1 * it;
  }
  if (db) {
    for (int64_t i = 0; i < a.nr; ++i) {
      const T* z = Z + i * a.vc;
#pragma omp simd
      for (int64_t j = 0; j < a.vc; ++j) db[j] += z[j];
    }
  }
}

}  // namespace

extern const LinearKernels linear_logprobs = {{&fwd_tile<float>, &fwd_tile<double>},
                                              {&bwd_tile<float>, &bwd_tile<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
