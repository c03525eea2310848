// Loops of ppo_policy_loss, compiled once per ISA (cpu/kernels.h). Forward: each row's loss sum, valid
// count, clipped count and ½(logp − old)² sum, reduced in a fixed (compile-time) order. Backward:
// ∂ℓ/∂logp recomputed per token and scaled by grad·row_weight. Masked positions are selected away
// (never multiplied by 0), so garbage/inf there cannot leak NaN.
#include <algorithm>
#include <type_traits>

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

// The GRPO-family row (per-row advantages, GSPO's row ratio, CISPO, weights, the KL term). GSPO's ratio
// needs the row's masked mean log-ratio before any token's loss: one row belongs to one thread, so that is
// a first pass over the row (still in cache) before the token pass; no cross-thread step is needed.
template <typename T> struct RowRatio {
  T ratio;    // exp of the masked mean of logp − old (1 for a row without valid tokens)
  int64_t n;  // valid tokens
};
template <typename T>
RK_ALWAYS_INLINE RowRatio<T> row_ratio(const T* lp, const T* old, const uint8_t* m, int64_t len) {
  T s = 0;
  int64_t nv = 0;
#pragma omp simd reduction(+ : s, nv)
  for (int64_t t = 0; t < len; ++t) {
    s += m[t] ? lp[t] - old[t] : T(0);
    nv += m[t] != 0;
  }
  return {rk::r_exp(nv > 0 ? s / T(nv) : T(0)), nv};
}

// The loops are tiled as row_forward's: absent inputs read from constant tile buffers (the row's advantage,
// weight 1), so the token loops are branch-free selects. The KL term, GSPO's row ratio and CISPO are template
// flags: as runtime bools, their selects (`seq ? s_ratio : exp(d)`) were COND_EXPRs on a scalar condition,
// which GCC 12's vectoriser rejects ("relevant stmt not supported"), leaving the whole token loop scalar.
template <typename T> struct ExtRow {
  const T *lp, *old, *adv, *w, *ref;  // adv / w point at a tile buffer when per-row / absent
  const uint8_t* m;
  bool adv_tiled, w_tiled;            // whether adv / w advance with the tile
};
template <typename T>
RK_ALWAYS_INLINE ExtRow<T> ext_row(const PolicyArgs<T>& c, int64_t r, T* adv_buf, T* w_buf) {
  const int64_t o = r * c.n;
  ExtRow<T> x{c.logp + o, c.old + o, c.adv + o, c.weights ? c.weights + o : w_buf, c.ref ? c.ref + o : nullptr,
              c.mask + o, !c.adv_per_row, c.weights != nullptr};
  if (c.adv_per_row) {
    for (int64_t i = 0; i < kTile; ++i) adv_buf[i] = c.adv[r];
    x.adv = adv_buf;
  }
  if (!c.weights)
    for (int64_t i = 0; i < kTile; ++i) w_buf[i] = T(1);
  return x;
}

template <bool kRef, bool kSeq, bool kCispo, typename T>
void row_forward_ext(const PolicyArgs<T>& c, int64_t r, RowPartial<T>& out) {
  alignas(64) T adv_buf[kTile], w_buf[kTile];
  alignas(64) T loss_buf[kTile], kl_buf[kTile], ratio_buf[kTile], tk_buf[kTile], ws_buf[kTile];
  alignas(64) int32_t n_buf[kTile], clip_buf[kTile];
  const ExtRow<T> x = ext_row(c, r, adv_buf, w_buf);
  const int64_t len = c.n, est = c.kl_estimator;
  const T cl = c.clip_low, ch = c.clip_high, dc = c.dual_clip, kc = c.kl_coef;
  constexpr bool seq = kSeq, cispo = kCispo;
  const T s_ratio = seq ? row_ratio(x.lp, x.old, x.m, len).ratio : T(1);
  for (int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int64_t n = std::min(kTile, len - t0);
    const T *a = x.lp + t0, *b = x.old + t0, *e = x.adv_tiled ? x.adv + t0 : x.adv, *w = x.w_tiled ? x.w + t0 : x.w;
    const T* rf = kRef ? x.ref + t0 : nullptr;
    const uint8_t* v = x.m + t0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T d = a[i] - b[i];
      const T ratio = seq ? s_ratio : rk::r_exp(d);
      const auto tok = rk::policy_token(ratio, a[i], e[i], cl, ch, dc, cispo);
      T loss = w[i] * tok.loss, kl = T(0);
      if constexpr (kRef) {
        kl = rk::kl_value(a[i], rf[i], est);
        loss += kc * kl;
      }
      const int32_t valid = v[i] != 0;  // selects, never products: garbage at masked positions stays out
      loss_buf[i] = valid ? loss : T(0);
      kl_buf[i] = valid ? T(0.5) * d * d : T(0);
      ratio_buf[i] = valid ? ratio : T(0);
      tk_buf[i] = valid ? kl : T(0);
      ws_buf[i] = valid ? w[i] : T(0);
      n_buf[i] = valid;
      clip_buf[i] = tok.clipped & valid;
    }
    T s = 0, k = 0, rs = 0, rm = 0, tk = 0, ws = 0;
    int32_t nv = 0, nc = 0;
#pragma omp simd reduction(+ : s, k, nv, nc, rs, tk, ws) reduction(max : rm)
    for (int64_t i = 0; i < n; ++i) {
      s += loss_buf[i];
      k += kl_buf[i];
      nv += n_buf[i];
      nc += clip_buf[i];
      rs += ratio_buf[i];
      rm = rm > ratio_buf[i] ? rm : ratio_buf[i];
      tk += tk_buf[i];
      ws += ws_buf[i];
    }
    out.sum += s, out.kl += k, out.n += nv, out.clipped += nc;
    out.ratio_sum += rs, out.token_kl += tk, out.weight_sum += ws;
    out.ratio_max = out.ratio_max > rm ? out.ratio_max : rm;
  }
}

// Backward of one row, scaled by `scale` = ∂L/∂loss · the row's token weight. GSPO: every token's
// log-probability moves the row ratio, ∂log s/∂logp_t = m_t / n, so the row's policy gradient is
// Σ_u w_u·∂ℓ_u/∂log s / n on each valid token: a first pass sums it, the second writes it. Per-row
// advantages sum their gradient over the row. Outputs not asked for go to tile scratch buffers.
template <bool kRef, bool kSeq, bool kCispo, typename T>
void row_backward_ext(const PolicyArgs<T>& c, int64_t r, T scale) {
  alignas(64) T adv_buf[kTile], w_buf[kTile], old_scratch[kTile], adv_scratch[kTile];
  const ExtRow<T> x = ext_row(c, r, adv_buf, w_buf);
  const int64_t o = r * c.n, len = c.n, est = c.kl_estimator;
  const T cl = c.clip_low, ch = c.clip_high, dc = c.dual_clip, kc = c.kl_coef;
  constexpr bool seq = kSeq, cispo = kCispo, row_grad = seq && !cispo;
  const RowRatio<T> rr = seq ? row_ratio(x.lp, x.old, x.m, len) : RowRatio<T>{T(1), 0};
  const T s_ratio = rr.ratio;
  T row_g = 0;
  if (row_grad) {
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int64_t n = std::min(kTile, len - t0);
      const T *a = x.lp + t0, *e = x.adv_tiled ? x.adv + t0 : x.adv, *w = x.w_tiled ? x.w + t0 : x.w;
      const uint8_t* v = x.m + t0;
      T g = 0;
#pragma omp simd reduction(+ : g)
      for (int64_t i = 0; i < n; ++i) {
        const auto tok = rk::policy_token(s_ratio, a[i], e[i], cl, ch, dc, false);
        g += v[i] ? w[i] * tok.dloss : T(0);
      }
      row_g += g;
    }
    row_g = rr.n > 0 ? row_g / T(rr.n) : T(0);
  }
  const bool old_out = c.g_old != nullptr, adv_out = c.g_adv != nullptr && x.adv_tiled;
  T adv_sum = 0;
  for (int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int64_t n = std::min(kTile, len - t0);
    const T *a = x.lp + t0, *b = x.old + t0, *e = x.adv_tiled ? x.adv + t0 : x.adv, *w = x.w_tiled ? x.w + t0 : x.w;
    const T* rf = kRef ? x.ref + t0 : nullptr;
    const uint8_t* v = x.m + t0;
    T* g_lp = c.g_logp + o + t0;
    T* g_old = old_out ? c.g_old + o + t0 : old_scratch;
    T* g_adv = adv_out ? c.g_adv + o + t0 : adv_scratch;
    // two copies of the token loop: the advantages' gradient (PPO's dadv selects on the int `clipped`, which
    // GCC 12 does not vectorise) only when asked for, so the common call (detached advantages) vectorises
    auto tokens = [&](auto with_adv) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const T ratio = seq ? s_ratio : rk::r_exp(a[i] - b[i]);
        const auto tok = rk::policy_token(ratio, a[i], e[i], cl, ch, dc, cispo);
        const T pol = row_grad ? row_g : w[i] * tok.dloss;
        T kl = T(0);
        if constexpr (kRef) kl = kc * rk::kl_dlogp(a[i], rf[i], est);
        const bool valid = v[i] != 0;
        g_lp[i] = valid ? scale * (pol + kl) : T(0);
        g_old[i] = valid && !cispo ? -scale * pol : T(0);
        if constexpr (decltype(with_adv)::value) g_adv[i] = valid ? scale * w[i] * tok.dadv : T(0);
      }
    };
    if (c.g_adv != nullptr) tokens(std::true_type{});
    else tokens(std::false_type{});
    if (c.g_adv != nullptr && !x.adv_tiled) {
      T sa = 0;
#pragma omp simd reduction(+ : sa)
      for (int64_t i = 0; i < n; ++i) sa += adv_scratch[i];
      adv_sum += sa;
    }
  }
  if (c.g_adv != nullptr && !x.adv_tiled) c.g_adv[r] = adv_sum;
}

// The eight instantiations of the extended rows, indexed by (ref, sequence ratio, cispo) as bits 2, 1, 0.
template <typename T> using ExtFwd = void (*)(const PolicyArgs<T>&, int64_t, RowPartial<T>&);
template <typename T> using ExtBwd = void (*)(const PolicyArgs<T>&, int64_t, T);
template <typename T, int K> constexpr ExtFwd<T> kExtFwd = &row_forward_ext<(K & 4) != 0, (K & 2) != 0, (K & 1) != 0, T>;
template <typename T, int K> constexpr ExtBwd<T> kExtBwd = &row_backward_ext<(K & 4) != 0, (K & 2) != 0, (K & 1) != 0, T>;
template <typename T> int ext_variant(const PolicyArgs<T>& a) {
  return (a.ref != nullptr) * 4 + bool(a.seq_ratio) * 2 + bool(a.cispo);
}

template <typename T> void fwd_rows(const PolicyArgs<T>& a, int64_t lo, int64_t hi) {
  if (a.extended()) {
    static constexpr ExtFwd<T> table[8] = {kExtFwd<T, 0>, kExtFwd<T, 1>, kExtFwd<T, 2>, kExtFwd<T, 3>,
                                           kExtFwd<T, 4>, kExtFwd<T, 5>, kExtFwd<T, 6>, kExtFwd<T, 7>};
    const ExtFwd<T> row = table[ext_variant(a)];
    for (int64_t r = lo; r < hi; ++r) row(a, r, a.part[r]);
    return;
  }
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * a.n;
    row_forward(a.logp + o, a.old + o, a.adv + o, a.mask + o, a.n, a, a.part[r]);
  }
}

template <typename T> void bwd_rows(const PolicyArgs<T>& a, int64_t lo, int64_t hi) {
  if (a.extended()) {
    static constexpr ExtBwd<T> table[8] = {kExtBwd<T, 0>, kExtBwd<T, 1>, kExtBwd<T, 2>, kExtBwd<T, 3>,
                                           kExtBwd<T, 4>, kExtBwd<T, 5>, kExtBwd<T, 6>, kExtBwd<T, 7>};
    const ExtBwd<T> row = table[ext_variant(a)];
    for (int64_t r = lo; r < hi; ++r) row(a, r, a.grad * a.row_weight[r]);
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
