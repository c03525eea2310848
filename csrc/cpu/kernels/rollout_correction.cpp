// Loops of rollout_correction, compiled once per ISA (cpu/kernels.h). At the sequence and geometric levels a
// first pass sums the row's masked log-ratios; one pass then writes weights and mask_out and the row's stats
// partials.
#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace rk {
namespace cpu {
namespace RK_CPU_CAPABILITY {
namespace {

template <typename T>
RcRowStats<T> correct_row(const T* __restrict o, const T* __restrict q, const uint8_t* __restrict m,
                          T* __restrict w, uint8_t* __restrict mo, int64_t n, int64_t level, int64_t mode, T low,
                          T high) {
  T row_lr = 0;
  if (level != rk::RC_TOKEN) {
    T sum = 0;
    int64_t cnt = 0;
#pragma omp simd reduction(+ : sum, cnt)
    for (int64_t t = 0; t < n; ++t) {
      sum += rk::select_bits(m[t], o[t] - q[t]);  // a masked NaN or inf is dropped
      cnt += m[t] != 0;
    }
    row_lr = level == rk::RC_GEOMETRIC ? sum / T(cnt > 0 ? cnt : 1) : sum;
  }
  const T row_ratio = rk::r_exp(row_lr);
  const bool token = level == rk::RC_TOKEN;
  T k1 = 0, k3 = 0, ws = 0;
  int64_t cnt = 0, kept = 0;
#pragma omp simd reduction(+ : k1, k3, ws, cnt, kept)
  for (int64_t t = 0; t < n; ++t) {
    const T d = rk::select_bits(m[t], o[t] - q[t]);
    const T ratio = token ? rk::r_exp(d) : row_ratio;
    int32_t keep;
    const T wt = rk::rc_weight(ratio, m[t] != 0, mode, low, high, keep);
    w[t] = wt;
    mo[t] = static_cast<uint8_t>(keep);
    k1 += d;
    k3 += rk::kl_value(d, T(0), rk::KL_K3);  // token_kl k3 of (old, rollout): 0 at masked positions (d = 0)
    ws += wt;
    cnt += m[t] != 0;
    kept += keep;
  }
  RcRowStats<T> st;
  st.k1 = k1;
  st.k3 = k3;
  st.w = ws;
  st.n = cnt;
  st.kept = kept;
  return st;
}

template <typename T> void rows(const RcArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t o = i * a.n;
    a.part[i] = correct_row(a.old + o, a.rollout + o, a.mask + o, a.weights + o, a.mask_out + o, a.n, a.level,
                            a.mode, a.low, a.high);
  }
}

}  // namespace

extern const RolloutCorrectionKernels rollout_correction = {{&rows<float>, &rows<double>}};

}  // namespace RK_CPU_CAPABILITY
}  // namespace cpu
}  // namespace rk
