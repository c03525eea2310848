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
  alignas(64) T loss_buf[kTile], kl_buf[kTile];
  alignas(64) int32_t n_buf[kTile], clip_buf[kTile];
  for (int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int64_t n = std::min(kTile, len - t0);
    const T *a = lp + t0, *b = old + t0, *e = adv + t0;
    const uint8_t* v = m + t0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T d = a[i] - b[i];
      const auto tok = rk::ppo_policy_token_ratio(rk::r_exp(d), e[i], cl, ch, dc);
      const int32_t valid = v[i] != 0;
      loss_buf[i] = valid ? tok.loss : T(0);
      kl_buf[i] = valid ? T(0.5) * d * d : T(0);
      n_buf[i] = valid;
      clip_buf[i] = tok.clipped & valid;
    }
    T s = 0, k = 0;
    int32_t nv = 0, nc = 0;
#pragma omp simd reduction(+ : s, k, nv, nc)
    for (int64_t i = 0; i < n; ++i) {
      s += loss_buf[i];
      k += kl_buf[i];
      nv += n_buf[i];
      nc += clip_buf[i];
    }
    out.sum += s;
    out.kl += k;
    out.n += nv;
    out.clipped += nc;
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

template <typename T> void fwd_rows(const PolicyArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t o = r * a.n;
    row_forward(a.logp + o, a.old + o, a.adv + o, a.mask + o, a.n, a, a.part[r]);
  }
}

template <typename T> void bwd_rows(const PolicyArgs<T>& a, int64_t lo, int64_t hi) {
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
