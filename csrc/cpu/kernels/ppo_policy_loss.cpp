// Loops of ppo_policy_loss, compiled once per ISA (cpu/kernels.h). Forward: each row's loss sum, valid
// count, clipped count and ½(logp − old)² sum, reduced in a fixed (compile-time) order. Backward:
// ∂ℓ/∂logp recomputed per token and scaled by grad·row_weight. Masked positions are selected away
// (never multiplied by 0), so garbage/inf there cannot leak NaN.
#include <algorithm>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

constexpr int64_t kTile = 256;  // tokens per buffered tile of the forward

// Per tile: an elementwise loop writes each token's terms to small buffers, then plain sums
// reduce them. (A conditional accumulate in the token loop itself makes GCC branch, not vectorise.)
template <typename T>
RK_ALWAYS_INLINE void row_forward(const T* lp, const T* old, const T* adv, const uint8_t* m, int64_t len,
                                  const PolicyArgs<T>& c, RowPartial<T>& out) {
  const T cl = c.clip_low, ch = c.clip_high, dc = c.dual_clip;  // locals: loads the loop need not repeat
  alignas(64) T loss_buf[kTile], kl_buf[kTile], ratio_buf[kTile];
  alignas(64) int32_t n_buf[kTile], clip_buf[kTile];
  for (int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int64_t n = std::min(kTile, len - t0);
    const T *a = lp + t0, *b = old + t0, *e = adv + t0;
    const uint8_t* v = m + t0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T d = a[i] - b[i];
      const T ratio = rk::r_exp(d);
      const auto tok = rk::ppo_policy_token_ratio(ratio, e[i], cl, ch, dc);
      const int32_t valid = v[i] != 0;
      loss_buf[i] = valid ? tok.loss : T(0);
      kl_buf[i] = valid ? T(0.5) * d * d : T(0);
      ratio_buf[i] = valid ? ratio : T(0);
      n_buf[i] = valid;
      clip_buf[i] = tok.clipped & valid;
    }
    T s = 0, k = 0, rs = 0, rm = 0;
    int32_t nv = 0, nc = 0;
#pragma omp simd reduction(+ : s, k, nv, nc, rs) reduction(max : rm)
    for (int64_t i = 0; i < n; ++i) {
      s += loss_buf[i];
      k += kl_buf[i];
      nv += n_buf[i];
      nc += clip_buf[i];
      rs += ratio_buf[i];
      rm = rm > ratio_buf[i] ? rm : ratio_buf[i];
    }
    out.sum += s;
    out.kl += k;
    out.n += nv;
    out.clipped += nc;
    out.ratio_sum += rs;
    out.ratio_max = out.ratio_max > rm ? out.ratio_max : rm;
  }
}

// The GRPO-family row (per-row advantages, GSPO's row ratio, CISPO, weights, the KL term). GSPO's ratio
// needs the row's masked mean log-ratio before any token's loss: one row belongs to one thread, so that is
// a first pass over the row (still in cache) before the token pass; no cross-thread step is needed.
template <typename T> RK_ALWAYS_INLINE T row_log_ratio_mean(const T* lp, const T* old, const uint8_t* m, int64_t len) {
  T s = 0;
  int64_t nv = 0;
#pragma omp simd reduction(+ : s, nv)
  for (int64_t t = 0; t < len; ++t) {
    s += m[t] ? lp[t] - old[t] : T(0);
    nv += m[t] != 0;
  }
  return nv > 0 ? s / T(nv) : T(0);
}

// The token's inputs after the optional arguments are resolved (absent ones read as their neutral value).
template <typename T> struct ExtToken {
  T ratio, adv, w;
  PolicyToken<T> tok;
};
template <typename T>
RK_ALWAYS_INLINE ExtToken<T> ext_token(const PolicyArgs<T>& c, const T* lp, const T* old, const T* adv, T adv_row,
                                       const T* w, T seq_ratio, int64_t t) {
  ExtToken<T> x;
  x.ratio = c.seq_ratio ? seq_ratio : rk::r_exp(lp[t] - old[t]);
  x.adv = adv ? adv[t] : adv_row;
  x.w = w ? w[t] : T(1);
  x.tok = rk::policy_token(x.ratio, lp[t], x.adv, c.clip_low, c.clip_high, c.dual_clip, c.cispo);
  return x;
}

template <typename T> void row_forward_ext(const PolicyArgs<T>& c, int64_t r, RowPartial<T>& out) {
  const int64_t o = r * c.n, len = c.n;
  const T *lp = c.logp + o, *old = c.old + o;
  const uint8_t* m = c.mask + o;
  const T* adv = c.adv_per_row ? nullptr : c.adv + o;
  const T adv_row = c.adv_per_row ? c.adv[r] : T(0);
  const T* w = c.weights ? c.weights + o : nullptr;
  const T* ref = c.ref ? c.ref + o : nullptr;
  const T seq_ratio = c.seq_ratio ? rk::r_exp(row_log_ratio_mean(lp, old, m, len)) : T(1);
  T s = 0, k = 0, rs = 0, rm = 0, tk = 0, ws = 0;
  int64_t nv = 0, nc = 0;
  for (int64_t t = 0; t < len; ++t) {
    if (!m[t]) continue;  // masked: nothing of it is read into a sum, so garbage there cannot leak
    const ExtToken<T> x = ext_token(c, lp, old, adv, adv_row, w, seq_ratio, t);
    const T d = lp[t] - old[t];
    T loss = x.w * x.tok.loss;
    if (ref) {
      const T kl = rk::kl_value(lp[t], ref[t], c.kl_estimator);
      loss += c.kl_coef * kl;
      tk += kl;
    }
    s += loss;
    k += T(0.5) * d * d;
    rs += x.ratio;
    rm = rm > x.ratio ? rm : x.ratio;
    ws += x.w;
    nv += 1;
    nc += x.tok.clipped;
  }
  out.sum += s, out.kl += k, out.n += nv, out.clipped += nc;
  out.ratio_sum += rs, out.token_kl += tk, out.weight_sum += ws;
  out.ratio_max = out.ratio_max > rm ? out.ratio_max : rm;
}

// Backward of one row, scaled by `scale` = ∂L/∂loss · the row's token weight. GSPO: every token's
// log-probability moves the row ratio, ∂log s/∂logp_t = m_t / n, so the row's policy gradient is
// Σ_u w_u·∂ℓ_u/∂log s / n on each valid token: a first pass sums it, the second writes it.
template <typename T> void row_backward_ext(const PolicyArgs<T>& c, int64_t r, T scale) {
  const int64_t o = r * c.n, len = c.n;
  const T *lp = c.logp + o, *old = c.old + o;
  const uint8_t* m = c.mask + o;
  const T* adv = c.adv_per_row ? nullptr : c.adv + o;
  const T adv_row = c.adv_per_row ? c.adv[r] : T(0);
  const T* w = c.weights ? c.weights + o : nullptr;
  const T* ref = c.ref ? c.ref + o : nullptr;
  T *g_lp = c.g_logp + o, *g_old = c.g_old ? c.g_old + o : nullptr;
  T* g_adv = c.g_adv && !c.adv_per_row ? c.g_adv + o : nullptr;
  const bool row_grad = c.seq_ratio && !c.cispo;
  T seq_ratio = T(1), row_g = T(0);
  if (c.seq_ratio) {
    int64_t nv = 0;
    for (int64_t t = 0; t < len; ++t) nv += m[t] != 0;
    seq_ratio = rk::r_exp(row_log_ratio_mean(lp, old, m, len));
    if (row_grad) {
      for (int64_t t = 0; t < len; ++t) {
        if (!m[t]) continue;
        const ExtToken<T> x = ext_token(c, lp, old, adv, adv_row, w, seq_ratio, t);
        row_g += x.w * x.tok.dloss;
      }
      row_g = nv > 0 ? row_g / T(nv) : T(0);
    }
  }
  T adv_sum = 0;
  for (int64_t t = 0; t < len; ++t) {
    if (!m[t]) {
      g_lp[t] = T(0);
      if (g_old) g_old[t] = T(0);
      if (g_adv) g_adv[t] = T(0);
      continue;
    }
    const ExtToken<T> x = ext_token(c, lp, old, adv, adv_row, w, seq_ratio, t);
    const T pol = row_grad ? row_g : x.w * x.tok.dloss;
    const T kl = ref ? c.kl_coef * rk::kl_dlogp(lp[t], ref[t], c.kl_estimator) : T(0);
    g_lp[t] = scale * (pol + kl);
    if (g_old) g_old[t] = c.cispo ? T(0) : -scale * pol;
    const T ga = scale * x.w * x.tok.dadv;
    if (g_adv) g_adv[t] = ga;
    adv_sum += ga;
  }
  if (c.g_adv && c.adv_per_row) c.g_adv[r] = adv_sum;
}

template <typename T>
RK_ALWAYS_INLINE void row_backward(const T* lp, const T* old, const T* adv, const uint8_t* m, int64_t len,
                                   const PolicyArgs<T>& c, T scale, T* g_lp, T* g_adv) {
  const T cl = c.clip_low, ch = c.clip_high, dc = c.dual_clip;
  if (g_adv == nullptr) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const auto tok = rk::ppo_policy_token_ratio(rk::r_exp(lp[t] - old[t]), adv[t], cl, ch, dc);
      g_lp[t] = m[t] ? scale * tok.dloss : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const auto tok = rk::ppo_policy_token_ratio(rk::r_exp(lp[t] - old[t]), adv[t], cl, ch, dc);
      g_lp[t] = m[t] ? scale * tok.dloss : T(0);
      g_adv[t] = m[t] ? scale * tok.dadv : T(0);
    }
  }
}

template <typename T> void fwd_rows(const PolicyArgs<T>& a, int64_t lo, int64_t hi) {
  if (a.extended()) {
    for (int64_t r = lo; r < hi; ++r) row_forward_ext(a, r, a.part[r]);
    return;
  }
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * a.n;
    row_forward(a.logp + o, a.old + o, a.adv + o, a.mask + o, a.n, a, a.part[r]);
  }
}

template <typename T> void bwd_rows(const PolicyArgs<T>& a, int64_t lo, int64_t hi) {
  if (a.extended()) {
    for (int64_t r = lo; r < hi; ++r) row_backward_ext(a, r, a.grad * a.row_weight[r]);
    return;
  }
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * a.n;
    row_backward(a.logp + o, a.old + o, a.adv + o, a.mask + o, a.n, a, a.grad * a.row_weight[r], a.g_logp + o,
                 a.g_adv ? a.g_adv + o : nullptr);
  }
}

}  // namespace

extern const PolicyLossKernels ppo_policy_loss = {{&fwd_rows<float>, &fwd_rows<double>},
                                                  {&bwd_rows<float>, &bwd_rows<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
