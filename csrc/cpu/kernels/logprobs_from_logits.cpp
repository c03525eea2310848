// Loops of logprobs_from_logits, compiled once per ISA (cpu/kernels.h).
//
// Forward: one read of each row of logits from memory. The row is cut into L1-sized chunks; each chunk
// gives a log-sum-exp state {max, Σe, Σe·(z − max)} (its max first, then one exp per element while the
// chunk is still in L1), and the chunk states are folded into the row state with rk::lse_merge in a fixed
// order. Per-lane sums run in SIMD registers and are reduced in a fixed order, so results are bitwise
// reproducible for a given ISA. Backward: one pass per row writing the gradient, recomputing p from the
// saved lse. bf16/fp16 chunks are widened into a small stack buffer, never into an [N, V] copy.
// The float code is written with GCC vector extensions W lanes wide, W matching this copy's ISA
// (16 for AVX-512, 8 for AVX2, 4 for SSE2 or NEON) so that no vector op is split into pieces; fp64 runs
// scalar, straight from common.h (exactness matters there, speed does not).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

using Rows = rk::RowIndex;

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

constexpr int64_t kChunk = 2048;  // elements per chunk: 8 KB of float, stays in L1 between the two sweeps
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this, exp underflows (to a denormal); we flush to 0, which is below the sums' resolution anyway.
constexpr float kExpLo = -87.0f;

template <int W> struct Simd {
  typedef float vf __attribute__((vector_size(4 * W)));
  typedef int32_t vi __attribute__((vector_size(4 * W)));

  static RK_ALWAYS_INLINE vf splat(float a) { return vf{} + a; }
  static RK_ALWAYS_INLINE vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
  static RK_ALWAYS_INLINE void storeu(float* p, const vf& v) { std::memcpy(p, &v, sizeof v); }
  static RK_ALWAYS_INLINE vf select(const vi& m, const vf& a, const vf& b) { return m ? a : b; }
  // the first n lanes from p, the rest `fill`
  static RK_ALWAYS_INLINE vf load_tail(const float* p, int64_t n, float fill) {
    alignas(64) float t[W];
    for (int i = 0; i < W; ++i) t[i] = i < n ? p[i] : fill;
    return loadu(t);
  }

  // exp(x) for x ≤ 88 (Cody–Waite reduction + degree-6 polynomial, ~1 ulp); x < kExpLo gives 0; NaN stays NaN.
  static RK_ALWAYS_INLINE vf exp(const vf& x) {
    const vf magic = splat(12582912.0f);  // 1.5·2^23: adding it rounds to an integer in the low mantissa bits
    vf t = x * splat(1.44269504088896341f) + magic;
    vf n = t - magic;
    vf r = x - n * splat(0.693359375f);
    r = r - n * splat(-2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    vf y = p * (r * r) + r + splat(1.0f);
    // a vector cast between same-size vector types reinterprets the bits
    vi ni = (vi)t - (vi)magic;
    vf y2 = y * (vf)((ni + 127) << 23);
    return select(x < splat(kExpLo), splat(0.0f), y2);
  }

  static RK_ALWAYS_INLINE float hsum(const vf& v) {  // fixed pairwise order
    float t[W];
    std::memcpy(t, &v, sizeof t);
    for (int h = W / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) t[i] += t[i + h];
    return t[0];
  }
  static RK_ALWAYS_INLINE float hmax(const vf& v) {
    float t[W];
    std::memcpy(t, &v, sizeof t);
    float m = t[0];
    for (int i = 1; i < W; ++i) m = t[i] > m ? t[i] : m;
    return m;
  }

  static RK_ALWAYS_INLINE float chunk_max(const float* x, int64_t n) {
    vf m = splat(kNegInf);
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      vf v = loadu(x + i);
      m = select(v > m, v, m);
    }
    if (i < n) {
      vf v = load_tail(x + i, n - i, kNegInf);
      m = select(v > m, v, m);
    }
    return hmax(m);
  }

  // One vector of the chunk sums: d = z − max clamped so that −inf logits give e = 0 and e·d = 0.
  template <bool ENT> static RK_ALWAYS_INLINE void accumulate(const vf& v, const vf& it, const vf& m, vf& s, vf& w) {
    const vf lo = splat(-88.0f);
    vf d = v * it - m;
    d = select(d < lo, lo, d);
    vf e = exp(d);
    s += e;
    if (ENT) w += e * d;
  }

  // State of one chunk (n ≤ kChunk elements of raw logits x; z = x·inv_t) in rk::LseState form.
  template <bool ENT> static RK_ALWAYS_INLINE rk::LseState<float> chunk_state(const float* x, int64_t n, float inv_t) {
    const float mc = chunk_max(x, n) * inv_t;  // max(x·c) = max(x)·c for c > 0, rounding is monotone
    if (mc == kNegInf) return rk::lse_init<float>();
    const vf it = splat(inv_t), m = splat(mc);
    vf s = vf{}, w = vf{};
    int64_t i = 0;
    for (; i + W <= n; i += W) accumulate<ENT>(loadu(x + i), it, m, s, w);
    if (i < n) accumulate<ENT>(load_tail(x + i, n - i, kNegInf), it, m, s, w);
    return {mc, hsum(s), ENT ? hsum(w) : 0.0f};
  }

  // −(g_lp·p + g_H·p·(logp + H)) / temperature for one vector, with a = −g_lp/t, b = −g_H/t.
  static RK_ALWAYS_INLINE vf grad_vec(const vf& v, const vf& it, const vf& l, const vf& h, const vf& a, const vf& b) {
    const vf lo = splat(-88.0f);
    vf lp = v * it - l;
    lp = select(lp < lo, lo, lp);
    vf p = exp(lp);
    return p * a + p * (lp + h) * b;
  }

  // out[0..n) = ∂/∂x of (g_lp·logp_tok + g_H·H) without the token's 1[j = tok] term (the caller adds it):
  // the formula of rk::logprob_entropy_grad, with logp = x·inv_t − lse.
  static RK_ALWAYS_INLINE void chunk_grad(const float* x, float* out, int64_t n, float inv_t, float lse, float H, float g_lp,
                               float g_H) {
    const vf it = splat(inv_t), l = splat(lse), h = splat(H), a = splat(-g_lp * inv_t), b = splat(-g_H * inv_t);
    int64_t i = 0;
    for (; i + W <= n; i += W) storeu(out + i, grad_vec(loadu(x + i), it, l, h, a, b));
    if (i < n) {
      alignas(64) float t[W];
      storeu(t, grad_vec(load_tail(x + i, n - i, kNegInf), it, l, h, a, b));
      for (int64_t j = 0; i + j < n; ++j) out[i + j] = t[j];
    }
  }
};

// ---- dtype adapters: widen a chunk of the input into float, narrow a float gradient chunk back ----
struct Bf16 {
  uint16_t bits;
};
#if defined(__FLT16_MAX__)
using Half = _Float16;  // converts in hardware with F16C, else through libgcc; rounds to nearest even
#else
#error "the CPU kernels need a compiler with _Float16 (GCC >= 12 or Clang >= 15)"
#endif

RK_ALWAYS_INLINE void widen(const Bf16* x, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b = static_cast<uint32_t>(x[i].bits) << 16;
    std::memcpy(buf + i, &b, 4);
  }
}
RK_ALWAYS_INLINE void widen(const Half* x, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
}
RK_ALWAYS_INLINE void narrow(const float* buf, Bf16* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {  // round to nearest even, as c10::BFloat16(float)
    uint32_t b;
    std::memcpy(&b, buf + i, 4);
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    out[i].bits = buf[i] != buf[i] ? uint16_t(0x7fc0) : static_cast<uint16_t>(r);
  }
}
RK_ALWAYS_INLINE void widen_one(const float* x, float& out) { out = *x; }
RK_ALWAYS_INLINE void widen_one(const Bf16* x, float& out) { widen(x, &out, 1); }
RK_ALWAYS_INLINE void widen_one(const Half* x, float& out) { widen(x, &out, 1); }
RK_ALWAYS_INLINE void narrow(const float* buf, Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Half>(buf[i]);
}

using Vec = Simd<kLanes>;

// The head's per-row options: 1/temperature of row r, and the softcap pass over a widened chunk.
template <typename T, typename Args> RK_ALWAYS_INLINE T inv_t_of(const Args& a, int64_t r) {
  return a.temps ? T(1) / static_cast<const T*>(a.temps)[r] : static_cast<T>(a.inv_t);
}
template <typename T> RK_ALWAYS_INLINE T capped(T x, T c, T ic) { return c > T(0) ? c * rk::r_tanh(x * ic) : x; }
// buf[0..n) = c·tanh(buf/c) in place
RK_ALWAYS_INLINE void cap_chunk(float* buf, int64_t n, float c) {
  const float ic = 1.0f / c;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = c * rk::r_tanh(buf[i] * ic);
}
// the softcap's chain factor on a gradient chunk: g·(1 − (cap/c)²), with cap the capped logits
RK_ALWAYS_INLINE void cap_grad(const float* capv, float* g, int64_t n, float c) {
  const float ic = 1.0f / c;
  for (int64_t i = 0; i < n; ++i) {
    const float u = capv[i] * ic;
    g[i] *= 1.0f - u * u;
  }
}

template <typename in_t, bool ENT> void fwd_rows_f(const LogitsFwdArgs& a, int64_t lo, int64_t hi) {
  // a softcap needs a chunk buffer for fp32 logits too (the capped chunk)
  alignas(64) float buf[kChunk];
  float* logp = static_cast<float*>(a.logp);
  float* lse = static_cast<float*>(a.lse);
  float* ent = static_cast<float*>(a.ent);
  const float cap = static_cast<float>(a.softcap), icap = cap > 0.0f ? 1.0f / cap : 0.0f;
  for (int64_t r = lo; r < hi; ++r) {
    const float inv_t = inv_t_of<float>(a, r);
    const int64_t tok = a.tokens[r];
    if (tok == a.ignore_index) {
      logp[r] = 0.0f;
      lse[r] = 0.0f;
      if (ENT) ent[r] = 0.0f;
      continue;
    }
    const in_t* x = static_cast<const in_t*>(a.logits) + a.rows.offset(r);
    rk::LseState<float> st = rk::lse_init<float>();
    for (int64_t c = 0; c < a.V; c += kChunk) {
      const int64_t n = std::min(kChunk, a.V - c);
      const float* xf;
      if constexpr (std::is_same<in_t, float>::value) {
        xf = x + c;
        if (cap > 0.0f) {
          std::memcpy(buf, xf, sizeof(float) * n);
          xf = buf;
        }
      } else {
        widen(x + c, buf, n);
        xf = buf;
      }
      if (cap > 0.0f) cap_chunk(buf, n, cap);
      st = rk::lse_merge(st, Vec::template chunk_state<ENT>(xf, n, inv_t));
    }
    const float l = rk::lse_value(st);
    lse[r] = l;
    // out-of-range ids (validate=False) read nothing and give NaN
    float xt = 0.0f;
    if (tok >= 0 && tok < a.V) widen_one(x + tok, xt);
    logp[r] = (tok >= 0 && tok < a.V) ? capped(xt, cap, icap) * inv_t - l : rk::r_nan<float>();
    if (ENT) ent[r] = rk::lse_entropy(st);
  }
}

template <typename in_t> void bwd_rows_f(const LogitsBwdArgs& a, int64_t lo, int64_t hi) {
  alignas(64) float xbuf[kChunk];
  alignas(64) float gbuf[std::is_same<in_t, float>::value ? 1 : kChunk];
  const float* g_logp = static_cast<const float*>(a.g_logp);
  const float* g_ent = static_cast<const float*>(a.g_ent);
  const float* lse = static_cast<const float*>(a.lse);
  const float* ent = static_cast<const float*>(a.ent);
  const float cap = static_cast<float>(a.softcap);
  for (int64_t r = lo; r < hi; ++r) {
    const float inv_t = inv_t_of<float>(a, r);
    const int64_t tok = a.tokens[r];
    in_t* g = static_cast<in_t*>(a.grad) + r * a.V;
    if (tok == a.ignore_index) {
      std::memset(static_cast<void*>(g), 0, sizeof(in_t) * a.V);  // all-zero bits is +0 in every float dtype
      continue;
    }
    const in_t* x = static_cast<const in_t*>(a.logits) + a.rows.offset(r);
    const bool in_range = tok >= 0 && tok < a.V;
    // An out-of-range id has logp = NaN (a constant): no gradient flows through it, as in the reference.
    const float g_lp = (g_logp && in_range) ? g_logp[r] : 0.0f;
    const float g_H = g_ent ? g_ent[r] : 0.0f;
    const float H = g_ent ? ent[r] : 0.0f;
    const float l = lse[r];
    for (int64_t c = 0; c < a.V; c += kChunk) {
      const int64_t n = std::min(kChunk, a.V - c);
      const bool has_tok = in_range && tok >= c && tok < c + n;
      if constexpr (std::is_same<in_t, float>::value) {
        const float* xf = x + c;
        if (cap > 0.0f) {
          std::memcpy(xbuf, xf, sizeof(float) * n);
          cap_chunk(xbuf, n, cap);
          xf = xbuf;
        }
        Vec::chunk_grad(xf, g + c, n, inv_t, l, H, g_lp, g_H);
        if (has_tok) g[tok] += g_lp * inv_t;
        if (cap > 0.0f) cap_grad(xbuf, g + c, n, cap);
      } else {
        widen(x + c, xbuf, n);
        if (cap > 0.0f) cap_chunk(xbuf, n, cap);
        Vec::chunk_grad(xbuf, gbuf, n, inv_t, l, H, g_lp, g_H);
        if (has_tok) gbuf[tok - c] += g_lp * inv_t;
        if (cap > 0.0f) cap_grad(xbuf, gbuf, n, cap);
        narrow(gbuf, g + c, n);
      }
    }
  }
}

void fwd_rows_double(const LogitsFwdArgs& a, int64_t lo, int64_t hi) {
  double* logp = static_cast<double*>(a.logp);
  double* lse = static_cast<double*>(a.lse);
  double* ent = static_cast<double*>(a.ent);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t tok = a.tokens[r];
    if (tok == a.ignore_index) {
      logp[r] = lse[r] = 0.0;
      if (ent) ent[r] = 0.0;
      continue;
    }
    const double* x = static_cast<const double*>(a.logits) + a.rows.offset(r);
    const double it = inv_t_of<double>(a, r), c = a.softcap, ic = c > 0 ? 1.0 / c : 0.0;
    rk::LseState<double> st = rk::lse_init<double>();
    for (int64_t j = 0; j < a.V; ++j) rk::lse_push(st, capped(x[j], c, ic) * it);
    const double l = rk::lse_value(st);
    lse[r] = l;
    logp[r] = (tok >= 0 && tok < a.V) ? capped(x[tok], c, ic) * it - l : rk::r_nan<double>();
    if (ent) ent[r] = rk::lse_entropy(st);
  }
}

void bwd_rows_double(const LogitsBwdArgs& a, int64_t lo, int64_t hi) {
  const double* g_logp = static_cast<const double*>(a.g_logp);
  const double* g_ent = static_cast<const double*>(a.g_ent);
  const double* lse = static_cast<const double*>(a.lse);
  const double* ent = static_cast<const double*>(a.ent);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t tok = a.tokens[r];
    double* g = static_cast<double*>(a.grad) + r * a.V;
    if (tok == a.ignore_index) {
      for (int64_t j = 0; j < a.V; ++j) g[j] = 0.0;
      continue;
    }
    const double* x = static_cast<const double*>(a.logits) + a.rows.offset(r);
    const bool in_range = tok >= 0 && tok < a.V;
    const double g_lp = (g_logp && in_range) ? g_logp[r] : 0.0;
    const double g_H = g_ent ? g_ent[r] : 0.0;
    const double H = g_ent ? ent[r] : 0.0;
    const double it = inv_t_of<double>(a, r), c = a.softcap, ic = c > 0 ? 1.0 / c : 0.0;
    for (int64_t j = 0; j < a.V; ++j) {
      const double y = capped(x[j], c, ic), u = y * ic;
      g[j] = rk::logprob_entropy_grad(y * it, lse[r], H, j == tok, g_lp, g_H) * it * (c > 0 ? 1.0 - u * u : 1.0);
    }
  }
}

template <typename in_t> void fwd_rows_in(const LogitsFwdArgs& a, int64_t lo, int64_t hi) {
  if (a.ent) fwd_rows_f<in_t, true>(a, lo, hi);
  else fwd_rows_f<in_t, false>(a, lo, hi);
}

void fwd_rows(const LogitsFwdArgs& a, int64_t lo, int64_t hi) {
  switch (a.dtype) {
    case Dtype::f64: return fwd_rows_double(a, lo, hi);
    case Dtype::bf16: return fwd_rows_in<Bf16>(a, lo, hi);
    case Dtype::f16: return fwd_rows_in<Half>(a, lo, hi);
    default: return fwd_rows_in<float>(a, lo, hi);
  }
}

void bwd_rows(const LogitsBwdArgs& a, int64_t lo, int64_t hi) {
  switch (a.dtype) {
    case Dtype::f64: return bwd_rows_double(a, lo, hi);
    case Dtype::bf16: return bwd_rows_f<Bf16>(a, lo, hi);
    case Dtype::f16: return bwd_rows_f<Half>(a, lo, hi);
    default: return bwd_rows_f<float>(a, lo, hi);
  }
}

}  // namespace

extern const LogitsKernels logprobs_from_logits = {&fwd_rows, &bwd_rows};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
