// Arithmetic shared by the CPU (C++) and CUDA kernels, so both backends compute the same
// numbers the same way. Everything here is header-only and __host__ __device__.
// T is the accumulation type: float for fp32/bf16/fp16 inputs, double for fp64 inputs.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RK_HD __host__ __device__ __forceinline__
#elif defined(RK_CPU_CAPABILITY) && defined(__GNUC__)
// In the per-ISA kernel files (csrc/cpu/kernels/, compiled once per ISA) every helper is forced inline:
// an out-of-line copy built with AVX-512 could otherwise be picked by the linker for baseline code.
#define RK_HD inline __attribute__((always_inline))
#else
#define RK_HD inline
#endif
#if defined(__CUDACC__) || defined(__HIPCC__)
#define RK_UNROLL _Pragma("unroll")
#else
#define RK_UNROLL _Pragma("GCC unroll 24")
#endif

namespace rk {

// ---- codes shared with the Python layer (rlhf_kernels/ops/_common.py; tests/test_build.py compares them) ----
enum KlEstimator : int64_t { KL_K1 = 0, KL_K2 = 1, KL_K3 = 2 };
enum Aggregation : int64_t { AGG_TOKEN_MEAN = 0, AGG_SEQ_MEAN_TOKEN_MEAN = 1, AGG_SEQ_MEAN_TOKEN_SUM = 2, AGG_TOKEN_SUM = 3 };
enum DpoLoss : int64_t { DPO_SIGMOID = 0, DPO_IPO = 1, DPO_HINGE = 2, DPO_ROBUST = 3 };
enum GroupBaseline : int64_t { BASELINE_MEAN = 0, BASELINE_LEAVE_ONE_OUT = 1, BASELINE_NONE = 2 };
enum GroupScale : int64_t { SCALE_STD = 0, SCALE_NONE = 1 };
enum RcLevel : int64_t { RC_TOKEN = 0, RC_SEQUENCE = 1, RC_GEOMETRIC = 2 };
enum RcMode : int64_t { RC_TRUNCATE = 0, RC_MASK = 1 };
enum RatioLevel : int64_t { RATIO_TOKEN = 0, RATIO_SEQUENCE = 1 };
enum PolicyLoss : int64_t { LOSS_PPO = 0, LOSS_CISPO = 1 };

// ---- precision-generic math (float and double overloads, host and device) ----
#if defined(__CUDA_ARCH__)
RK_HD float r_exp(float x) { return expf(x); }
#else
// On the host, a branch-free exp that gcc vectorises (a call to expf stays scalar and keeps the
// whole loop scalar): Cody–Waite reduction x = k·ln2 + r, |r| ≤ ln2/2, a degree-6 minimax polynomial
// for e^r (Cephes' coefficients), then 2^k applied as two factors so every k in [−150, 128] stays a
// normal float. Within 1 ulp of the correctly rounded value for normal results (checked on every
// 16th float of [−103, 88.7]); exp(x ≤ −104) = 0, exp(+inf) = inf, exp(NaN) = NaN.
// always_inline: a call left in a hot loop stops it vectorising.
inline __attribute__((always_inline)) float r_exp(float x) {
  // clamping keeps k in range; NaN fails both tests and flows through the arithmetic
  float xc = x < -104.0f ? -104.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;
  // adding 1.5·2^23 rounds to nearest and leaves k in the low mantissa bits, so the integer comes
  // from the bits (a float → int conversion may trap, which blocks if-conversion)
  const float big = xc * 1.44269504088896341f + 12582912.0f;
  const float k = big - 12582912.0f;
  int32_t ki;
  std::memcpy(&ki, &big, sizeof ki);
  ki -= 0x4B400000;
  float r = xc - k * 0.693359375f;  // ln2 split in a short high part and a correction
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t k1 = ki >> 1, k2 = ki - k1;
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof s1);
  std::memcpy(&s2, &b2, sizeof s2);
  // below the clamp the product rounds to exactly 0, so exp(−inf) = 0 without a second test on x
  return p * s1 * s2;
}
#endif
RK_HD double r_exp(double x) { return exp(x); }
RK_HD float r_log(float x) { return logf(x); }
RK_HD double r_log(double x) { return log(x); }
RK_HD float r_log1p(float x) { return log1pf(x); }
RK_HD double r_log1p(double x) { return log1p(x); }
RK_HD float r_sqrt(float x) { return sqrtf(x); }
RK_HD double r_sqrt(double x) { return sqrt(x); }
template <typename T> RK_HD T r_max(T a, T b) { return a > b ? a : b; }
template <typename T> RK_HD T r_min(T a, T b) { return a < b ? a : b; }
template <typename T> RK_HD T r_nan() { return std::numeric_limits<T>::quiet_NaN(); }
template <typename T> RK_HD T r_inf() { return std::numeric_limits<T>::infinity(); }

// log σ(x) without overflow for either sign of x.
template <typename T> RK_HD T log_sigmoid(T x) {
  return x < T(0) ? x - r_log1p(r_exp(x)) : -r_log1p(r_exp(-x));
}
template <typename T> RK_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + r_exp(-x));
  T e = r_exp(x);
  return e / (T(1) + e);
}

// ---- online log-sum-exp with the accumulator entropy needs ----
// Over z_1..z_n: m = max z, s = Σ exp(z − m), w = Σ exp(z − m)·(z − m).
// Then lse = m + log s and entropy = lse − Σ p z = log s − w / s.
template <typename T> struct LseState {
  T m, s, w;
};
template <typename T> RK_HD LseState<T> lse_init() { return {-r_inf<T>(), T(0), T(0)}; }
template <typename T> RK_HD void lse_push(LseState<T>& st, T z) {
  if (z == -r_inf<T>()) return;  // a −inf logit has p = 0 and adds nothing (0·log 0 = 0)
  if (z > st.m) {
    // rescale the running sums to the new max: s' = s·e^{m−z}, w' = (w + s(m − z))·e^{m−z}
    T c = st.m == -r_inf<T>() ? T(0) : r_exp(st.m - z);
    T d = st.m == -r_inf<T>() ? T(0) : st.m - z;
    st.w = (st.w + st.s * d) * c;
    st.s = st.s * c;
    st.m = z;
  }
  T e = r_exp(z - st.m);
  st.s += e;
  st.w += e * (z - st.m);
}
template <typename T> RK_HD LseState<T> lse_merge(LseState<T> a, LseState<T> b) {
  if (a.m == -r_inf<T>()) return b;
  if (b.m == -r_inf<T>()) return a;
  if (b.m > a.m) { LseState<T> t = a; a = b; b = t; }
  T d = b.m - a.m, c = r_exp(d);
  return {a.m, a.s + b.s * c, a.w + (b.w + b.s * d) * c};
}
template <typename T> RK_HD T lse_value(const LseState<T>& st) { return st.m + r_log(st.s); }
template <typename T> RK_HD T lse_entropy(const LseState<T>& st) { return r_log(st.s) - st.w / st.s; }

// d/dz_j of (g_lp·logp_tok + g_H·H) with z = x / temperature, p = softmax(z):
//   g_lp·(1[j = tok] − p_j) − g_H·p_j·(z_j − lse + H);  the caller divides by temperature.
template <typename T> RK_HD T logprob_entropy_grad(T z, T lse, T H, bool is_tok, T g_lp, T g_H) {
  T logp = z - lse;
  T p = r_exp(logp);
  T ent = p > T(0) ? p * (logp + H) : T(0);  // p·log p → 0 for −inf logits
  return g_lp * ((is_tok ? T(1) : T(0)) - p) - g_H * ent;
}

// ---- e^x − 1 and e^x − 1 − x without cancellation near 0 ----
// Σ_{n=S..L} x^(n−S) / n! by Horner (smallest term first). L leaves out terms below 2⁻²⁷ (float)
// and 2⁻⁵⁵ (double) of the sum for |x| ≤ 1, the range the callers use it on.
template <typename T, int S> RK_HD T exp_series_tail(T x) {
  constexpr double inv_fact[] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
                                 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600,
                                 1.0 / 6227020800.0, 1.0 / 87178291200.0, 1.0 / 1307674368000.0,
                                 1.0 / 20922789888000.0, 1.0 / 355687428096000.0, 1.0 / 6402373705728000.0};
  constexpr int L = sizeof(T) <= 4 ? 11 : 18;
  T p = T(inv_fact[L]);
  RK_UNROLL
  for (int n = L - 1; n >= S; --n) p = p * x + T(inv_fact[n]);
  return p;
}
// e^x − 1: the series on |x| ≤ 1, where e^x − 1 would lose the low bits of a small result; e^x − 1
// elsewhere (relative error ≤ ~2 ulp there). Branch-free selects, so the CPU loops calling it still
// vectorise; the series runs on a clamped argument so the discarded branch stays finite.
template <typename T> RK_HD T r_expm1(T x) {
  const bool small = x >= T(-1) && x <= T(1);
  const T series = x * exp_series_tail<T, 1>(small ? x : T(0));
  return small ? series : r_exp(x) - T(1);
}
// tanh(x) = −e/(2 + e) with e = e^{−2|x|} − 1 (r_expm1: exact near 0), the sign restored. Branch-free,
// so the CPU softcap loops vectorise (std::tanh is a libm call per element); within a few ulps of 1 in
// absolute terms, the triton kernels' tanh. Every CPU softcap site uses it, so the replay's threshold and the
// logits it cuts are the same bits.
template <typename T> RK_HD T r_tanh(T x) {
  const bool neg = x < T(0);
  const T e = r_expm1(T(-2) * (neg ? -x : x));
  const T t = -e / (T(2) + e);
  return neg ? -t : t;
}
// e^x − 1 − x (k3's shape), the same way: x²·Σ x^(n−2)/n! on |x| ≤ 1.
template <typename T> RK_HD T r_expm1_minus(T x) {
  const bool small = x >= T(-1) && x <= T(1);
  const T xs = small ? x : T(0);
  const T series = xs * xs * exp_series_tail<T, 2>(xs);
  return small ? series : (r_exp(x) - T(1)) - x;
}

// ---- token KL estimators (log r = ref − logp) ----
template <typename T> RK_HD T kl_value(T logp, T ref, int64_t est) {
  T d = logp - ref;
  if (est == KL_K1) return d;
  if (est == KL_K2) return T(0.5) * d * d;
  return r_expm1_minus(-d);  // k3 = e^{−d} − 1 + d
}
// ∂kl/∂logp; ∂kl/∂ref is its negation for all three estimators.
template <typename T> RK_HD T kl_dlogp(T logp, T ref, int64_t est) {
  T d = logp - ref;
  if (est == KL_K1) return T(1);
  if (est == KL_K2) return d;
  return -r_expm1(-d);  // k3: d/dlogp [e^{−d} − 1 + d] = 1 − e^{−d}
}
// clamp ≤ 0 means no clamp; the gradient is zero where the clamp is active (as torch.clamp).
template <typename T> RK_HD T clamp_sym(T x, T c) { return c > T(0) ? r_min(r_max(x, -c), c) : x; }
template <typename T> RK_HD bool clamp_passes(T x, T c) { return c <= T(0) || (x >= -c && x <= c); }

// ---- PPO clipped policy loss, one token ----
template <typename T> struct PolicyToken {
  T loss;     // ℓ
  T dloss;    // ∂ℓ/∂logp (∂ℓ/∂old_logp is its negation)
  int32_t clipped;  // 1 if the clipped branch is strictly larger (N+ "pg_clipfrac"), else 0; an int
                    // rather than bool because GCC keeps bool fields in memory, which blocks vectorising
  T dadv;     // ∂ℓ/∂A
};
// The token given ρ = exp(logp − old) already computed (the CPU kernels use a vectorisable exp).
// dual_clip ≤ 0 disables dual clipping.
template <typename T>
RK_HD PolicyToken<T> ppo_policy_token_ratio(T ratio, T adv, T clip_low, T clip_high, T dual_clip) {
  T lo = T(1) - clip_low, hi = T(1) + clip_high;
  T cr = r_min(r_max(ratio, lo), hi);
  T l1 = -adv * ratio, l2 = -adv * cr;
  // selects on locals rather than branches or reads of `out`, so the CPU loops calling this vectorise
  const int32_t clipped = l2 > l1;
  const bool inside = (ratio >= lo) & (ratio <= hi);
  const T loss = clipped ? l2 : l1;
  const bool dual = (dual_clip > T(0)) & (adv < T(0)) & (loss > -dual_clip * adv);
  PolicyToken<T> out;
  out.clipped = clipped;
  out.loss = dual ? -dual_clip * adv : loss;
  out.dloss = (dual | (clipped & !inside)) ? T(0) : -adv * ratio;
  out.dadv = dual ? -dual_clip : (clipped ? -cr : -ratio);
  return out;
}
template <typename T>
RK_HD PolicyToken<T> ppo_policy_token(T logp, T old, T adv, T clip_low, T clip_high, T dual_clip) {
  return ppo_policy_token_ratio(r_exp(logp - old), adv, clip_low, clip_high, dual_clip);
}

// One token of the GRPO-family policy term given its ratio ρ (the token's, or GSPO's row ratio): PPO's
// clipped surrogate, or CISPO's −sg(min(ρ, 1 + clip_high))·A·logp. For PPO dloss is ∂ℓ/∂log ρ (which is
// ∂ℓ/∂logp at token level); for CISPO it is ∂ℓ/∂logp with ρ held constant, and old_logp gets no gradient.
template <typename T>
RK_HD PolicyToken<T> policy_token(T ratio, T logp, T adv, T clip_low, T clip_high, T dual_clip, bool cispo) {
  const PolicyToken<T> p = ppo_policy_token_ratio(ratio, adv, clip_low, clip_high, dual_clip);
  const T hi = T(1) + clip_high;
  const T w = r_min(ratio, hi);
  PolicyToken<T> out;
  out.clipped = cispo ? int32_t(ratio > hi) : p.clipped;
  out.loss = cispo ? -w * adv * logp : p.loss;
  out.dloss = cispo ? -w * adv : p.dloss;
  out.dadv = cispo ? -w * logp : p.dadv;
  return out;
}

// ---- PPO clipped value loss, one token: ½·max((V − R)², (V_old + clip(V − V_old, ±c) − R)²) ----
template <typename T> struct ValueToken {
  T loss, dloss;  // ℓ and ∂ℓ/∂V
  int32_t clipped;  // 0/1 (see PolicyToken)
  T err;  // the chosen branch's error: ∂ℓ/∂R = −err, ∂ℓ/∂V_old = err − dloss
};
// clip ≤ 0 means unclipped. Selects on locals, no branches, so the CPU loops calling this vectorise.
template <typename T> RK_HD ValueToken<T> ppo_value_token(T v, T v_old, T ret, T clip) {
  const T e1 = v - ret;
  const T dv = v - v_old;
  const T e2 = v_old + r_min(r_max(dv, -clip), clip) - ret;
  const int32_t clipped = (clip > T(0)) & (e2 * e2 > e1 * e1);
  const bool inside = (dv >= -clip) & (dv <= clip);
  const T err = clipped ? e2 : e1;
  ValueToken<T> out;
  out.clipped = clipped;
  out.err = err;
  out.loss = T(0.5) * err * err;
  out.dloss = (clipped & !inside) ? T(0) : err;
  return out;
}

// ---- loss aggregation: the weight of each valid token of a row ----
// row_n: valid tokens in the row; total_n: in the batch; rows_n: rows with ≥ 1 valid token.
// A row (or batch) with no valid token has weight 0, so an all-masked input gives 0, not NaN.
template <typename T> RK_HD T aggregation_weight(int64_t agg, T row_n, T total_n, T rows_n) {
  if (row_n <= T(0)) return T(0);
  switch (agg) {
    case AGG_TOKEN_MEAN: return T(1) / total_n;
    case AGG_SEQ_MEAN_TOKEN_MEAN: return T(1) / (row_n * rows_n);
    case AGG_SEQ_MEAN_TOKEN_SUM: return T(1) / rows_n;
    default: return T(1);
  }
}

// ---- DPO losses on h = (c − c_ref) − (r − r_ref) ----
// log σ(x) and log σ(−x) from one exp and one log1p (the same values as log_sigmoid(±x)).
template <typename T> RK_HD void log_sigmoid_pair(T x, T& pos, T& neg) {
  const T l = r_log1p(r_exp(x < T(0) ? x : -x));
  pos = r_min(x, T(0)) - l;
  neg = r_min(-x, T(0)) - l;
}
// σ(x) and σ(−x) from one exp (the same values as sigmoid(±x)).
template <typename T> RK_HD void sigmoid_pair(T x, T& pos, T& neg) {
  const T e = r_exp(x < T(0) ? x : -x);
  const T big = T(1) / (T(1) + e), small = e / (T(1) + e);
  pos = x >= T(0) ? big : small;
  neg = x >= T(0) ? small : big;
}
template <typename T> RK_HD T dpo_loss_value(T h, T beta, int64_t type, T eps) {
  T bh = beta * h;
  T ls_pos, ls_neg;  // log σ(βh), log σ(−βh)
  switch (type) {
    case DPO_SIGMOID: log_sigmoid_pair(bh, ls_pos, ls_neg); return -(T(1) - eps) * ls_pos - eps * ls_neg;
    case DPO_IPO: { T d = h - T(1) / (T(2) * beta); return d * d; }
    case DPO_HINGE: return r_max(T(1) - bh, T(0));
    default: log_sigmoid_pair(bh, ls_pos, ls_neg); return ((T(1) - eps) * -ls_pos + eps * ls_neg) / (T(1) - T(2) * eps);
  }
}
// ∂loss/∂h
template <typename T> RK_HD T dpo_loss_dh(T h, T beta, int64_t type, T eps) {
  T bh = beta * h;
  // d/dx[−log σ(x)] = −σ(−x);  d/dx[log σ(−x)] = −σ(x)
  T s_pos, s_neg;  // σ(βh), σ(−βh)
  switch (type) {
    case DPO_SIGMOID: sigmoid_pair(bh, s_pos, s_neg); return beta * (-(T(1) - eps) * s_neg + eps * s_pos);
    case DPO_IPO: return T(2) * (h - T(1) / (T(2) * beta));
    case DPO_HINGE: return bh < T(1) ? -beta : T(0);
    default: sigmoid_pair(bh, s_pos, s_neg); return beta * (-(T(1) - eps) * s_neg - eps * s_pos) / (T(1) - T(2) * eps);
  }
}

// ---- GAE: one step of the reverse recursion over valid positions ----
// next_v / next_a hold V and A of the next valid position (0 past the row's end). `done` marks the last
// step of an episode: the recursion is cut there, δ = r − v and A = δ (what follows belongs to the next
// episode). With done false the arithmetic is exactly the single-episode step.
template <typename T> RK_HD T gae_step(T r, T v, bool done, T gamma, T lam, T& next_v, T& next_a) {
  const T nv = done ? T(0) : next_v, na = done ? T(0) : next_a;
  T delta = r + gamma * nv - v;
  T a = delta + gamma * lam * na;
  next_v = v;
  next_a = a;
  return a;
}


// GAE as a scan: each position is a map of the state (A, V) = (advantage, value) of the next valid
// position to its own state. Valid t: A ← (r_t − v_t) + γλ·A + γ·V, V ← v_t. Masked t: identity.
// Valid and done t: A ← r_t − v_t, V ← v_t (the cut forgets the state after it).
// Any composition keeps the form A ← α·A + β·V + p, V ← κ·V + q (κ is 1 or 0), so a row is a
// reverse scan of these 5-tuples; the parallel backends (warp shuffles, Triton) use it.
template <typename T> struct GaeMap {
  T alpha, beta, p, kappa, q;
};
template <typename T> RK_HD GaeMap<T> gae_map(T r, T v, bool valid, bool done, T gamma, T lam) {
  if (!valid) return {T(1), T(0), T(0), T(1), T(0)};
  if (done) return {T(0), T(0), r - v, T(0), v};
  return {gamma * lam, gamma, r - v, T(0), v};
}
// The map "apply `later`, then `earlier`" (earlier ∘ later).
template <typename T> RK_HD GaeMap<T> gae_compose(const GaeMap<T>& earlier, const GaeMap<T>& later) {
  return {earlier.alpha * later.alpha, earlier.alpha * later.beta + earlier.beta * later.kappa,
          earlier.alpha * later.p + earlier.beta * later.q + earlier.p, earlier.kappa * later.kappa,
          earlier.kappa * later.q + earlier.q};
}
template <typename T> RK_HD void gae_apply(const GaeMap<T>& f, T& a, T& v) {
  T a2 = f.alpha * a + f.beta * v + f.p;
  v = f.kappa * v + f.q;
  a = a2;
}

// ---- count, mean and sum of squared deviations of a set, merged in a fixed order (Chan et al.) ----
template <typename T> struct Moments {
  int64_t n;
  T mean, m2;
};
template <typename T> RK_HD Moments<T> moments_merge(const Moments<T>& a, const Moments<T>& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  int64_t n = a.n + b.n;
  T d = b.mean - a.mean, fb = T(b.n) / T(n);
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * T(a.n) * fb};
}
// 1/sqrt(var + eps) with var = m2/n (or m2/max(n − 1, 1) when unbiased); only called with n ≥ 1.
template <typename T> RK_HD T moments_inv_std(const Moments<T>& s, bool unbiased, T eps) {
  int64_t d = unbiased ? (s.n > 1 ? s.n - 1 : 1) : s.n;
  return T(1) / r_sqrt(s.m2 / T(d) + eps);
}

// ---- group-relative advantages: every member r of a group gets (r − shift)·mult ----
// From the group's n members, their mean and m2 = Σ(r − mean)²: σ = sqrt(m2 / (n − 1)) (0 for n = 1);
// "mean": r − mean; "leave_one_out": r − (S − r)/(n − 1) = (r − mean)·n/(n − 1); "none": r; then
// scale "std" divides by σ + eps. With a baseline, a group of one gets 0.
template <typename T> struct GroupAffine {
  T shift, mult;
};
template <typename T>
RK_HD GroupAffine<T> group_affine(int64_t n, T mean, T m2, int64_t baseline, int64_t scale, T eps) {
  const T dof = T(n > 1 ? n - 1 : 1);
  T mult = scale == SCALE_STD ? T(1) / (r_sqrt(m2 / dof) + eps) : T(1);
  if (baseline == BASELINE_NONE) return {T(0), mult};
  if (baseline == BASELINE_LEAVE_ONE_OUT) mult = mult * T(n) / dof;
  return {mean, n > 1 ? mult : T(0)};
}

// ---- rollout correction: the weight of one token from its ratio ρ (token's or row's) ----
// truncate (TIS): clamp(ρ, low, high), the token kept; mask (MIS): ρ if low ≤ ρ ≤ high, else 0 and dropped.
// An invalid token gets 0 and is dropped. `keep` is an int so that the CPU loops calling this vectorise.
template <typename T> RK_HD T rc_weight(T ratio, bool valid, int64_t mode, T low, T high, int32_t& keep) {
  const bool inside = (ratio >= low) & (ratio <= high);
  keep = valid & ((mode == RC_TRUNCATE) | inside);
  const T w = mode == RC_TRUNCATE ? r_min(r_max(ratio, low), high) : ratio;
  return keep ? w : T(0);
}

// The four stats from the batch's totals (summed in double): masked means over the n valid tokens
// (k1, k3, dropped fraction, weight); all 0 when nothing is valid.
RK_HD void rc_stats(double k1, double k3, double w, int64_t n, int64_t kept, float* out) {
  const double denom = double(n > 0 ? n : 1);
  out[0] = float(k1 / denom);
  out[1] = float(k3 / denom);
  out[2] = float(double(n - kept) / denom);
  out[3] = float(w / denom);
}

}  // namespace rk
