// CPU kernels of rlhf_kernels::logprobs_from_logits_{fwd,bwd}.
//
// Forward: one read of each row of logits from memory. The row is cut into L1-sized chunks; each chunk
// gives a log-sum-exp state {max, Σe, Σe·(z − max)} (its max first, then one exp per element while the
// chunk is still in L1), and the chunk states are folded into the row state with rk::lse_merge in a fixed
// order. Per-lane sums run in SIMD registers and are reduced in a fixed order, so results are bitwise
// reproducible for a given machine. Only lse[N] (and entropy[N]) is kept for backward.
// Backward: one pass per row writing the gradient, recomputing p from the saved lse.
//
// Inputs are read in their own dtype (fp32, bf16, fp16 accumulate in float; fp64 in double); bf16/fp16
// chunks are widened into a small stack buffer, never into an [N, V] copy. Leading dims may have any
// strides (e.g. logits[:, :-1]); only the vocabulary dim must be contiguous (the Python layer ensures it).
//
// The float SIMD code is written with GCC vector extensions and compiled three times (AVX-512, AVX2+FMA
// and the baseline ISA); the variant is chosen once at run time (RLHF_KERNELS_CPU_ISA=avx512|avx2|base
// overrides it, for testing the fallbacks).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "common.h"
#include "row_index.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

using Rows = rk::RowIndex;

// The logits as the kernels read them: their own strides when the leading dims fit a RowIndex, else a
// contiguous copy (only for more than RowIndex::kMaxDims non-mergeable leading dims).
at::Tensor readable(const at::Tensor& logits, Rows& rows) {
  if (rk::make_row_index(logits.sizes().data(), logits.strides().data(), logits.dim(), rows)) return logits;
  at::Tensor c = logits.contiguous();
  TORCH_CHECK(rk::make_row_index(c.sizes().data(), c.strides().data(), c.dim(), rows));
  return c;
}

// ---------------------------------------------------------------------------------------------------
// float SIMD core: GCC vector extensions of W lanes, W matching the ISA of the caller's target attribute
// (16 for AVX-512, 8 for AVX2, 4 for SSE2) so that no vector op is split into pieces.
// No lambdas here: a lambda body is a separate function without the caller's target attribute, and passing
// a vector across that boundary changes the ABI.
#define RK_AI inline __attribute__((always_inline))

constexpr int64_t kChunk = 2048;  // elements per chunk: 8 KB of float, stays in L1 between the two sweeps
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this, exp underflows (to a denormal); we flush to 0, which is below the sums' resolution anyway.
constexpr float kExpLo = -87.0f;

template <int W> struct Simd {
  typedef float vf __attribute__((vector_size(4 * W)));
  typedef int32_t vi __attribute__((vector_size(4 * W)));

  static RK_AI vf splat(float a) { return vf{} + a; }
  static RK_AI vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
  static RK_AI void storeu(float* p, const vf& v) { std::memcpy(p, &v, sizeof v); }
  static RK_AI vf select(const vi& m, const vf& a, const vf& b) { return m ? a : b; }
  // the first n lanes from p, the rest `fill`
  static RK_AI vf load_tail(const float* p, int64_t n, float fill) {
    alignas(64) float t[W];
    for (int i = 0; i < W; ++i) t[i] = i < n ? p[i] : fill;
    return loadu(t);
  }

  // exp(x) for x ≤ 88 (Cody–Waite reduction + degree-6 polynomial, ~1 ulp); x < kExpLo gives 0; NaN stays NaN.
  static RK_AI vf exp(const vf& x) {
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

  static RK_AI float hsum(const vf& v) {  // fixed pairwise order
    float t[W];
    std::memcpy(t, &v, sizeof t);
    for (int h = W / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) t[i] += t[i + h];
    return t[0];
  }
  static RK_AI float hmax(const vf& v) {
    float t[W];
    std::memcpy(t, &v, sizeof t);
    float m = t[0];
    for (int i = 1; i < W; ++i) m = t[i] > m ? t[i] : m;
    return m;
  }

  static RK_AI float chunk_max(const float* x, int64_t n) {
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
  template <bool ENT> static RK_AI void accumulate(const vf& v, const vf& it, const vf& m, vf& s, vf& w) {
    const vf lo = splat(-88.0f);
    vf d = v * it - m;
    d = select(d < lo, lo, d);
    vf e = exp(d);
    s += e;
    if (ENT) w += e * d;
  }

  // State of one chunk (n ≤ kChunk elements of raw logits x; z = x·inv_t) in rk::LseState form.
  template <bool ENT> static RK_AI rk::LseState<float> chunk_state(const float* x, int64_t n, float inv_t) {
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
  static RK_AI vf grad_vec(const vf& v, const vf& it, const vf& l, const vf& h, const vf& a, const vf& b) {
    const vf lo = splat(-88.0f);
    vf lp = v * it - l;
    lp = select(lp < lo, lo, lp);
    vf p = exp(lp);
    return p * a + p * (lp + h) * b;
  }

  // out[0..n) = ∂/∂x of (g_lp·logp_tok + g_H·H) without the token's 1[j = tok] term (the caller adds it):
  // the formula of rk::logprob_entropy_grad, with logp = x·inv_t − lse.
  static RK_AI void chunk_grad(const float* x, float* out, int64_t n, float inv_t, float lse, float H, float g_lp,
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
RK_AI void widen(const c10::BFloat16* x, float* buf, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b = static_cast<uint32_t>(u[i]) << 16;
    std::memcpy(buf + i, &b, 4);
  }
}
RK_AI void widen(const c10::Half* x, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
}
RK_AI void narrow(const float* buf, c10::BFloat16* out, int64_t n) {
  uint16_t* u = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) {  // round to nearest even, as c10::BFloat16(float)
    uint32_t b;
    std::memcpy(&b, buf + i, 4);
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    u[i] = buf[i] != buf[i] ? uint16_t(0x7fc0) : static_cast<uint16_t>(r);
  }
}
RK_AI void narrow(const float* buf, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = c10::Half(buf[i]);
}

struct FwdArgs {
  const char* logits;  // bytes
  Rows rows;
  int64_t V;
  const int64_t* tokens;
  float* logp;
  float* ent;  // null when not asked for
  float* lse;
  float inv_t;
  int64_t ignore_index;
};

struct BwdArgs {
  const char* logits;
  Rows rows;
  int64_t V;
  const int64_t* tokens;
  const float* g_logp;  // null: no gradient through logp
  const float* g_ent;   // null: none through entropy
  const float* lse;
  const float* ent;
  char* grad;  // contiguous [N, V] in the logits dtype
  float inv_t;
  int64_t ignore_index;
};

template <int W, typename in_t, bool ENT> RK_AI void fwd_rows_f(const FwdArgs& a, int64_t lo, int64_t hi) {
  alignas(64) float buf[std::is_same<in_t, float>::value ? 1 : kChunk];
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t tok = a.tokens[r];
    if (tok == a.ignore_index) {
      a.logp[r] = 0.0f;
      a.lse[r] = 0.0f;
      if (ENT) a.ent[r] = 0.0f;
      continue;
    }
    const in_t* x = reinterpret_cast<const in_t*>(a.logits) + a.rows.offset(r);
    rk::LseState<float> st = rk::lse_init<float>();
    for (int64_t c = 0; c < a.V; c += kChunk) {
      const int64_t n = std::min(kChunk, a.V - c);
      const float* xf;
      if constexpr (std::is_same<in_t, float>::value) {
        xf = x + c;
      } else {
        widen(x + c, buf, n);
        xf = buf;
      }
      st = rk::lse_merge(st, Simd<W>::template chunk_state<ENT>(xf, n, a.inv_t));
    }
    const float l = rk::lse_value(st);
    a.lse[r] = l;
    // out-of-range ids (validate=False) read nothing and give NaN
    a.logp[r] = (tok >= 0 && tok < a.V) ? static_cast<float>(x[tok]) * a.inv_t - l : rk::r_nan<float>();
    if (ENT) a.ent[r] = rk::lse_entropy(st);
  }
}

template <int W, typename in_t> RK_AI void bwd_rows_f(const BwdArgs& a, int64_t lo, int64_t hi) {
  alignas(64) float xbuf[std::is_same<in_t, float>::value ? 1 : kChunk];
  alignas(64) float gbuf[std::is_same<in_t, float>::value ? 1 : kChunk];
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t tok = a.tokens[r];
    in_t* g = reinterpret_cast<in_t*>(a.grad) + r * a.V;
    if (tok == a.ignore_index) {
      std::memset(static_cast<void*>(g), 0, sizeof(in_t) * a.V);  // all-zero bits is +0 in every float dtype
      continue;
    }
    const in_t* x = reinterpret_cast<const in_t*>(a.logits) + a.rows.offset(r);
    const bool in_range = tok >= 0 && tok < a.V;
    // An out-of-range id has logp = NaN (a constant): no gradient flows through it, as in the reference.
    const float g_lp = (a.g_logp && in_range) ? a.g_logp[r] : 0.0f;
    const float g_H = a.g_ent ? a.g_ent[r] : 0.0f;
    const float H = a.g_ent ? a.ent[r] : 0.0f;
    const float l = a.lse[r];
    for (int64_t c = 0; c < a.V; c += kChunk) {
      const int64_t n = std::min(kChunk, a.V - c);
      const bool has_tok = in_range && tok >= c && tok < c + n;
      if constexpr (std::is_same<in_t, float>::value) {
        Simd<W>::chunk_grad(x + c, g + c, n, a.inv_t, l, H, g_lp, g_H);
        if (has_tok) g[tok] += g_lp * a.inv_t;
      } else {
        widen(x + c, xbuf, n);
        Simd<W>::chunk_grad(xbuf, gbuf, n, a.inv_t, l, H, g_lp, g_H);
        if (has_tok) gbuf[tok - c] += g_lp * a.inv_t;
        narrow(gbuf, g + c, n);
      }
    }
  }
}

template <int W, typename in_t> RK_AI void fwd_rows_any(const FwdArgs& a, int64_t lo, int64_t hi) {
  if (a.ent) fwd_rows_f<W, in_t, true>(a, lo, hi);
  else fwd_rows_f<W, in_t, false>(a, lo, hi);
}

// The three ISA variants of the float kernels.
#define RK_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")))
#define RK_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))

template <typename in_t> void fwd_base(const FwdArgs& a, int64_t lo, int64_t hi) { fwd_rows_any<4, in_t>(a, lo, hi); }
template <typename in_t> void bwd_base(const BwdArgs& a, int64_t lo, int64_t hi) { bwd_rows_f<4, in_t>(a, lo, hi); }
#if defined(__GNUC__) && defined(__x86_64__)
#define RK_HAVE_X86_VARIANTS 1
template <typename in_t> RK_AVX512 void fwd_avx512(const FwdArgs& a, int64_t lo, int64_t hi) {
  fwd_rows_any<16, in_t>(a, lo, hi);
}
template <typename in_t> RK_AVX512 void bwd_avx512(const BwdArgs& a, int64_t lo, int64_t hi) {
  bwd_rows_f<16, in_t>(a, lo, hi);
}
template <typename in_t> RK_AVX2 void fwd_avx2(const FwdArgs& a, int64_t lo, int64_t hi) {
  fwd_rows_any<8, in_t>(a, lo, hi);
}
template <typename in_t> RK_AVX2 void bwd_avx2(const BwdArgs& a, int64_t lo, int64_t hi) {
  bwd_rows_f<8, in_t>(a, lo, hi);
}
#endif

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
  Isa best = Isa::kBase;
#ifdef RK_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#endif
  const char* env = std::getenv("RLHF_KERNELS_CPU_ISA");
  if (env != nullptr) {
    // a request can only lower the choice: never run instructions the CPU lacks
    std::string want(env);
    Isa req = want == "base" ? Isa::kBase : want == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
    if (static_cast<int>(req) < static_cast<int>(best)) best = req;
  }
  return best;
}

Isa isa() {
  static const Isa v = detect_isa();
  return v;
}

template <typename in_t> void fwd_float(const FwdArgs& a, int64_t lo, int64_t hi) {
#ifdef RK_HAVE_X86_VARIANTS
  switch (isa()) {
    case Isa::kAvx512: return fwd_avx512<in_t>(a, lo, hi);
    case Isa::kAvx2: return fwd_avx2<in_t>(a, lo, hi);
    default: break;
  }
#endif
  fwd_base<in_t>(a, lo, hi);
}

template <typename in_t> void bwd_float(const BwdArgs& a, int64_t lo, int64_t hi) {
#ifdef RK_HAVE_X86_VARIANTS
  switch (isa()) {
    case Isa::kAvx512: return bwd_avx512<in_t>(a, lo, hi);
    case Isa::kAvx2: return bwd_avx2<in_t>(a, lo, hi);
    default: break;
  }
#endif
  bwd_base<in_t>(a, lo, hi);
}

// ---------------------------------------------------------------------------------------------------
// float64: scalar, straight from common.h (exactness matters there, speed does not)
void fwd_double(const double* logits, const Rows& rows, int64_t V, const int64_t* tokens, double* logp, double* ent,
                double* lse, double inv_t, int64_t ignore_index, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t tok = tokens[r];
    if (tok == ignore_index) {
      logp[r] = lse[r] = 0.0;
      if (ent) ent[r] = 0.0;
      continue;
    }
    const double* x = logits + rows.offset(r);
    rk::LseState<double> st = rk::lse_init<double>();
    for (int64_t j = 0; j < V; ++j) rk::lse_push(st, x[j] * inv_t);
    const double l = rk::lse_value(st);
    lse[r] = l;
    logp[r] = (tok >= 0 && tok < V) ? x[tok] * inv_t - l : rk::r_nan<double>();
    if (ent) ent[r] = rk::lse_entropy(st);
  }
}

void bwd_double(const double* logits, const Rows& rows, int64_t V, const int64_t* tokens, const double* g_logp,
                const double* g_ent, const double* lse, const double* ent, double* grad, double inv_t,
                int64_t ignore_index, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t tok = tokens[r];
    double* g = grad + r * V;
    if (tok == ignore_index) {
      for (int64_t j = 0; j < V; ++j) g[j] = 0.0;
      continue;
    }
    const double* x = logits + rows.offset(r);
    const bool in_range = tok >= 0 && tok < V;
    const double g_lp = (g_logp && in_range) ? g_logp[r] : 0.0;
    const double g_H = g_ent ? g_ent[r] : 0.0;
    const double H = g_ent ? ent[r] : 0.0;
    for (int64_t j = 0; j < V; ++j)
      g[j] = rk::logprob_entropy_grad(x[j] * inv_t, lse[r], H, j == tok, g_lp, g_H) * inv_t;
  }
}

// ---------------------------------------------------------------------------------------------------
void check_inputs(const at::Tensor& logits, const at::Tensor& tokens) {
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, "logprobs_from_logits: logits must be [..., V] with V > 0");
  TORCH_CHECK(logits.stride(-1) == 1, "logprobs_from_logits: the vocabulary dim of logits must be contiguous");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous(),
              "logprobs_from_logits: tokens must be contiguous int64");
  TORCH_CHECK(tokens.sizes() == logits.sizes().slice(0, logits.dim() - 1),
              "logprobs_from_logits: tokens must have the shape of logits without its last dim");
}

// Rows per task: enough elements per task that scheduling is noise.
int64_t grain_for(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 15) / V); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_from_logits_fwd(const at::Tensor& logits_in,
                                                                        const at::Tensor& tokens, double temperature,
                                                                        int64_t ignore_index, bool return_entropy) {
  check_inputs(logits_in, tokens);
  Rows rows;
  const at::Tensor logits = readable(logits_in, rows);
  const bool f64 = logits.scalar_type() == at::kDouble;
  auto opts = logits.options().dtype(f64 ? at::kDouble : at::kFloat);
  auto shape = tokens.sizes();
  at::Tensor logp = at::empty(shape, opts), lse = at::empty(shape, opts);
  at::Tensor ent = return_entropy ? at::empty(shape, opts) : at::empty({0}, opts);
  const int64_t N = tokens.numel(), V = logits.size(-1);
  if (N == 0) return {logp, ent, lse};
  if (f64) {
    const double* x = logits.const_data_ptr<double>();
    at::parallel_for(0, N, grain_for(V), [&](int64_t lo, int64_t hi) {
      fwd_double(x, rows, V, tokens.const_data_ptr<int64_t>(), logp.mutable_data_ptr<double>(),
                 return_entropy ? ent.mutable_data_ptr<double>() : nullptr, lse.mutable_data_ptr<double>(),
                 1.0 / temperature, ignore_index, lo, hi);
    });
    return {logp, ent, lse};
  }
  FwdArgs a{static_cast<const char*>(logits.const_data_ptr()), rows, V, tokens.const_data_ptr<int64_t>(),
            logp.mutable_data_ptr<float>(), return_entropy ? ent.mutable_data_ptr<float>() : nullptr,
            lse.mutable_data_ptr<float>(), static_cast<float>(1.0 / temperature), ignore_index};
  const int64_t grain = grain_for(V);
  switch (logits.scalar_type()) {
    case at::kFloat: at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { fwd_float<float>(a, lo, hi); }); break;
    case at::kBFloat16:
      at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { fwd_float<c10::BFloat16>(a, lo, hi); });
      break;
    case at::kHalf: at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { fwd_float<c10::Half>(a, lo, hi); }); break;
    default: TORCH_CHECK(false, "logprobs_from_logits: unsupported logits dtype ", logits.scalar_type());
  }
  return {logp, ent, lse};
}

at::Tensor logprobs_from_logits_bwd(const std::optional<at::Tensor>& grad_logp,
                                    const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                                    const at::Tensor& tokens, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature, int64_t ignore_index) {
  check_inputs(logits_in, tokens);
  Rows rows;
  const at::Tensor logits = readable(logits_in, rows);
  const bool f64 = logits.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const int64_t N = tokens.numel(), V = logits.size(-1);
  const bool has_glp = grad_logp.has_value() && grad_logp->defined();
  const bool has_gH = grad_entropy.has_value() && grad_entropy->defined();
  auto check_row_tensor = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == acc && t.is_contiguous() && t.numel() == N, "logprobs_from_logits_bwd: ", name,
                " must be a contiguous ", acc, " tensor with one value per row");
  };
  if (has_glp) check_row_tensor(*grad_logp, "grad_logp");
  if (has_gH) {
    check_row_tensor(*grad_entropy, "grad_entropy");
    check_row_tensor(entropy, "entropy");
  }
  check_row_tensor(lse, "lse");
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return grad;
  if (f64) {
    at::parallel_for(0, N, grain_for(V), [&](int64_t lo, int64_t hi) {
      bwd_double(logits.const_data_ptr<double>(), rows, V, tokens.const_data_ptr<int64_t>(),
                 has_glp ? grad_logp->const_data_ptr<double>() : nullptr,
                 has_gH ? grad_entropy->const_data_ptr<double>() : nullptr, lse.const_data_ptr<double>(),
                 has_gH ? entropy.const_data_ptr<double>() : nullptr, grad.mutable_data_ptr<double>(),
                 1.0 / temperature, ignore_index, lo, hi);
    });
    return grad;
  }
  BwdArgs a{static_cast<const char*>(logits.const_data_ptr()), rows, V, tokens.const_data_ptr<int64_t>(),
            has_glp ? grad_logp->const_data_ptr<float>() : nullptr,
            has_gH ? grad_entropy->const_data_ptr<float>() : nullptr, lse.const_data_ptr<float>(),
            has_gH ? entropy.const_data_ptr<float>() : nullptr, static_cast<char*>(grad.mutable_data_ptr()),
            static_cast<float>(1.0 / temperature), ignore_index};
  const int64_t grain = grain_for(V);
  switch (logits.scalar_type()) {
    case at::kFloat: at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { bwd_float<float>(a, lo, hi); }); break;
    case at::kBFloat16:
      at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { bwd_float<c10::BFloat16>(a, lo, hi); });
      break;
    case at::kHalf: at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) { bwd_float<c10::Half>(a, lo, hi); }); break;
    default: TORCH_CHECK(false, "logprobs_from_logits: unsupported logits dtype ", logits.scalar_type());
  }
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("logprobs_from_logits_fwd", &logprobs_from_logits_fwd);
  m.impl("logprobs_from_logits_bwd", &logprobs_from_logits_bwd);
}
