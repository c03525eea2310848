// Loops of token_rewards, compiled once per ISA (cpu/kernels.h): per row, one pass writing
// −kl_coef·KL + clip(dense_coef·dense) at valid positions and 0 elsewhere, then the score added at the
// last valid position (or one past it), found by scanning back from the row end.
#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

// EST < 0: no KL term. The terms are computed at every position and selected by the mask, which
// keeps the loop branch-free (vectorisable for k1/k2); garbage at masked positions is discarded.
template <typename T, int EST, bool DENSE>
void reward_row(const uint8_t* __restrict m, const RewardArgs<T>& a, int64_t o, T* __restrict out) {
  const T* __restrict lp = EST >= 0 ? a.logp + o : nullptr;
  const T* __restrict rf = EST >= 0 ? a.ref + o : nullptr;
  const T* __restrict dn = DENSE ? a.dense + o : nullptr;
  const T kl_coef = a.kl_coef, dense_coef = a.dense_coef, dense_clip = a.dense_clip;
#pragma omp simd
  for (int64_t t = 0; t < a.n; ++t) {
    T val = 0;
    if constexpr (EST >= 0) val = -(kl_coef * rk::kl_value(lp[t], rf[t], int64_t(EST)));
    if constexpr (DENSE) val = val + rk::clamp_sym(dense_coef * dn[t], dense_clip);
    out[t] = rk::select_bits(m[t], val);
  }
}

template <typename T, int EST, bool DENSE> void reward_rows(const RewardArgs<T>& a, int64_t lo, int64_t hi) {
  const int64_t n = a.n;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t o = i * n;
    const uint8_t* m = a.mask + o;
    reward_row<T, EST, DENSE>(m, a, o, a.out + o);
    int64_t last = n - 1;
    while (last >= 0 && !m[last]) --last;
    if (last < 0) continue;  // no valid position: no score
    const int64_t pos = a.after_eos && last + 1 < n ? last + 1 : last;
    a.out[o + pos] += a.score[i];
  }
}

template <typename T, bool DENSE> void by_estimator(const RewardArgs<T>& a, int64_t lo, int64_t hi) {
  switch (a.logp ? a.estimator : -1) {
    case -1: return reward_rows<T, -1, DENSE>(a, lo, hi);
    case rk::KL_K1: return reward_rows<T, rk::KL_K1, DENSE>(a, lo, hi);
    case rk::KL_K2: return reward_rows<T, rk::KL_K2, DENSE>(a, lo, hi);
    default: return reward_rows<T, rk::KL_K3, DENSE>(a, lo, hi);
  }
}

template <typename T> void rows(const RewardArgs<T>& a, int64_t lo, int64_t hi) {
  if (a.dense) by_estimator<T, true>(a, lo, hi);
  else by_estimator<T, false>(a, lo, hi);
}

}  // namespace

extern const TokenRewardsKernels token_rewards = {{&rows<float>, &rows<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
