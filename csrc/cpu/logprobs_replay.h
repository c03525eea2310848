// CPU row loops of logprobs_from_logits' sampler replay (top-k / top-p): the per-row threshold, then forward
// and backward on the logits with z < threshold set to −inf. Scalar code in the accumulation
// dtype; the threshold, forward and backward compute each z with the same expression, so a token is on the
// same side of its row's threshold in all three. Included once, by cpu/logprobs_from_logits.cpp.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace rk {
namespace cpu {
namespace replay {

template <typename T> inline T capped(T x, T c, T ic) { return c > T(0) ? c * rk::r_tanh(x * ic) : x; }

template <typename T, typename Args> T inv_t_of(const Args& a, int64_t r) {
  return a.temps ? T(1) / static_cast<const T*>(a.temps)[r] : static_cast<T>(a.inv_t);
}

// the scaled logits of row r: out[j] = cap(x_j)·(1/t)
template <typename T, typename in_t> void row_z(const in_t* x, int64_t V, T it, T c, T* out) {
  const T ic = c > T(0) ? T(1) / c : T(0);
  for (int64_t j = 0; j < V; ++j) out[j] = capped(static_cast<T>(x[j]), c, ic) * it;
}

// A survivor of the top-k cut: its scaled logit and e^{z − max}.
template <typename T> struct Survivor {
  T v, e;
};

// The threshold of one row whose scaled logits are z[0..V) (buf, sbuf: V scratch entries each). The same set as
// rk::replay_threshold (csrc/replay.h), found with selections instead of bisection passes, since the row is in a
// buffer: top-k is the k-th largest z (nth_element); top-p is the lowest value whose ascending cumulative mass,
// its whole group of equal values included, exceeds (1 − p)·Z, found by quickselect on mass (three-way
// partitions around a pivot, keeping the side that holds the crossing): expected O(V), not a sort.
template <typename T> T row_threshold(const T* z, int64_t V, int64_t k, T p, T* buf, Survivor<T>* sv) {
  const T ninf = -r_inf<T>();
  T m = ninf;
  for (int64_t j = 0; j < V; ++j) m = r_max(m, z[j]);
  if (m == ninf || m != m) return ninf;
  T th = ninf;
  if (k > 0 && k < V) {
    std::copy(z, z + V, buf);
    std::nth_element(buf, buf + (k - 1), buf + V, [](T a, T b) { return a > b; });
    th = buf[k - 1];
  }
  if (!(p < T(1))) return th;
  int64_t n = 0;
  T Z = T(0);
  for (int64_t j = 0; j < V; ++j)
    if (z[j] >= th && z[j] != ninf) {
      sv[n] = {z[j], r_exp(z[j] - m)};
      Z += sv[n++].e;
    }
  const T target = (T(1) - p) * Z;
  T below = T(0);  // the mass of the values already known to lie below the answer; stays <= target
  Survivor<T>*lo = sv, *hi = sv + n;
  while (lo < hi) {
    const T a = lo->v, b = lo[(hi - lo) / 2].v, c = hi[-1].v;  // median of three
    const T x = r_max(r_min(a, b), r_min(r_max(a, b), c));
    Survivor<T>* m1 = std::partition(lo, hi, [x](const Survivor<T>& s) { return s.v < x; });
    Survivor<T>* m2 = std::partition(m1, hi, [x](const Survivor<T>& s) { return s.v == x; });
    T mass_l = T(0), mass_e = T(0);
    for (Survivor<T>* s = lo; s < m1; ++s) mass_l += s->e;
    for (Survivor<T>* s = m1; s < m2; ++s) mass_e += s->e;
    if (below + mass_l > target) {
      hi = m1;  // the crossing lies among the smaller values
    } else if (below + mass_l + mass_e > target) {
      return x;
    } else {
      below += mass_l + mass_e;
      lo = m2;
    }
  }
  return m;  // rounding left nothing above the target: the most probable token always stays
}

template <typename T, typename in_t>
void threshold_rows(const LogitsFwdArgs& a, const int64_t* top_k, const T* top_p, T* thr, int64_t lo, int64_t hi) {
  std::vector<T> z(a.V), buf(a.V);
  std::vector<Survivor<T>> sv(a.V);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t k = top_k ? top_k[r] : 0;
    const T p = top_p ? top_p[r] : T(1);
    if (a.tokens[r] == a.ignore_index || ((k <= 0 || k >= a.V) && !(p < T(1)))) {
      thr[r] = -r_inf<T>();
      continue;
    }
    row_z<T>(static_cast<const in_t*>(a.logits) + a.rows.offset(r), a.V, inv_t_of<T>(a, r), T(a.softcap), z.data());
    thr[r] = row_threshold<T>(z.data(), a.V, k, p, buf.data(), sv.data());
  }
}

template <typename T, typename in_t> void fwd_rows(const LogitsFwdArgs& a, const T* thr, int64_t lo, int64_t hi) {
  std::vector<T> z(a.V);
  T* logp = static_cast<T*>(a.logp);
  T* lse = static_cast<T*>(a.lse);
  T* ent = static_cast<T*>(a.ent);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t tok = a.tokens[r];
    if (tok == a.ignore_index) {
      logp[r] = lse[r] = T(0);
      if (ent) ent[r] = T(0);
      continue;
    }
    row_z<T>(static_cast<const in_t*>(a.logits) + a.rows.offset(r), a.V, inv_t_of<T>(a, r), T(a.softcap), z.data());
    const T th = thr[r];
    LseState<T> st = lse_init<T>();
    for (int64_t j = 0; j < a.V; ++j)
      if (z[j] >= th) lse_push(st, z[j]);
    const T l = lse_value(st);
    lse[r] = l;
    const bool in_range = tok >= 0 && tok < a.V;
    logp[r] = !in_range ? r_nan<T>() : (z[tok] >= th ? z[tok] - l : -r_inf<T>());
    if (ent) ent[r] = lse_entropy(st);
  }
}

template <typename T, typename in_t> void bwd_rows(const LogitsBwdArgs& a, const T* thr, int64_t lo, int64_t hi) {
  std::vector<T> z(a.V);
  const T* g_logp = static_cast<const T*>(a.g_logp);
  const T* g_ent = static_cast<const T*>(a.g_ent);
  const T* lse = static_cast<const T*>(a.lse);
  const T* ent = static_cast<const T*>(a.ent);
  const T c = T(a.softcap), ic = c > T(0) ? T(1) / c : T(0);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t tok = a.tokens[r];
    in_t* g = static_cast<in_t*>(a.grad) + r * a.V;
    if (tok == a.ignore_index) {
      for (int64_t j = 0; j < a.V; ++j) g[j] = in_t(0);
      continue;
    }
    const T it = inv_t_of<T>(a, r);
    const in_t* x = static_cast<const in_t*>(a.logits) + a.rows.offset(r);
    row_z<T>(x, a.V, it, c, z.data());
    const T th = thr[r];
    const bool in_range = tok >= 0 && tok < a.V;
    // logp is a constant (NaN, or −inf outside the kept set) for these tokens: no gradient through it
    const T g_lp = (g_logp && in_range && z[tok] >= th) ? g_logp[r] : T(0);
    const T g_H = g_ent ? g_ent[r] : T(0);
    const T H = g_ent ? ent[r] : T(0);
    for (int64_t j = 0; j < a.V; ++j) {
      if (!(z[j] >= th)) {
        g[j] = in_t(0);
        continue;
      }
      T d = logprob_entropy_grad(z[j], lse[r], H, j == tok, g_lp, g_H) * it;
      if (c > T(0)) {  // d c·tanh(x/c)/dx = 1 − (cap(x)/c)²
        const T u = capped(static_cast<T>(x[j]), c, ic) * ic;
        d *= T(1) - u * u;
      }
      g[j] = static_cast<in_t>(d);
    }
  }
}

}  // namespace replay
}  // namespace cpu
}  // namespace rk
