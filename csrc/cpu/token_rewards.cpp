// CPU kernel of rlhf_kernels::token_rewards: rows in parallel; per row find the last valid position
// (scanning back from the end), then one pass writing −kl_coef·KL + clip(dense_coef·dense) at valid
// positions and 0 elsewhere, and add the score at its position.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/vec_math.h"
#include "row_checks.h"

namespace {

template <typename T> struct RewardArgs {
  const T *logp, *ref, *dense;
  T kl_coef, dense_coef, dense_clip;
};

// EST < 0: no KL term. The terms are computed at every position and selected by the mask, which
// keeps the loop branch-free (vectorisable for k1/k2); garbage at masked positions is discarded.
template <typename T, int EST, bool DENSE>
void reward_row(const uint8_t* __restrict m, const RewardArgs<T>& a, int64_t o, T* __restrict out, int64_t n) {
  const T* __restrict lp = EST >= 0 ? a.logp + o : nullptr;
  const T* __restrict rf = EST >= 0 ? a.ref + o : nullptr;
  const T* __restrict dn = DENSE ? a.dense + o : nullptr;
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    T val = 0;
    if constexpr (EST >= 0) val = -(a.kl_coef * rk::kl_value(lp[t], rf[t], int64_t(EST)));
    if constexpr (DENSE) val = val + rk::clamp_sym(a.dense_coef * dn[t], a.dense_clip);
    out[t] = rk::select_bits(m[t], val);
  }
}

template <typename T, int EST, bool DENSE>
void reward_rows(const T* score, const uint8_t* mask, const RewardArgs<T>& a, T* out, int64_t R, int64_t n,
                 bool after_eos) {
  at::parallel_for(0, R, rk::row_grain(n), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t o = i * n;
      const uint8_t* m = mask + o;
      reward_row<T, EST, DENSE>(m, a, o, out + o, n);
      int64_t last = n - 1;
      while (last >= 0 && !m[last]) --last;
      if (last < 0) continue;  // no valid position: no score
      const int64_t pos = after_eos && last + 1 < n ? last + 1 : last;
      out[o + pos] += score[i];
    }
  });
}

template <typename T, bool DENSE>
void dispatch_est(int64_t est, const T* score, const uint8_t* mask, const RewardArgs<T>& a, T* out, int64_t R,
                  int64_t n, bool after_eos) {
  switch (est) {
    case -1: return reward_rows<T, -1, DENSE>(score, mask, a, out, R, n, after_eos);
    case rk::KL_K1: return reward_rows<T, rk::KL_K1, DENSE>(score, mask, a, out, R, n, after_eos);
    case rk::KL_K2: return reward_rows<T, rk::KL_K2, DENSE>(score, mask, a, out, R, n, after_eos);
    default: return reward_rows<T, rk::KL_K3, DENSE>(score, mask, a, out, R, n, after_eos);
  }
}

at::Tensor token_rewards(const at::Tensor& score, const at::Tensor& mask, const std::optional<at::Tensor>& logp,
                         const std::optional<at::Tensor>& ref_logp, double kl_coef, int64_t kl_estimator,
                         const std::optional<at::Tensor>& dense, double dense_coef, double dense_clip,
                         bool score_after_eos) {
  TORCH_CHECK(mask.dim() >= 1, "token_rewards: mask must be [..., T]");
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "token_rewards: mask must be bool or uint8, got ", mask.scalar_type());
  TORCH_CHECK(score.numel() * (mask.size(-1)) == mask.numel() || mask.numel() == 0,
              "token_rewards: score must have one value per row of mask");
  const bool use_kl = kl_coef != 0.0;
  TORCH_CHECK(!use_kl || (logp.has_value() && ref_logp.has_value()), "token_rewards: kl_coef != 0 needs logp and ref_logp");
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator <= 2, "token_rewards: unknown kl_estimator ", kl_estimator);
  auto out = at::empty(mask.sizes(), score.options());
  const int64_t n = mask.size(-1), R = n ? mask.numel() / n : 0;
  if (mask.numel() == 0) return out;
  auto s = score.contiguous(), m = mask.contiguous();
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
              "token_rewards: expected float32 or float64 score, got ", s.scalar_type());
  at::Tensor lp, rf, dn;
  if (use_kl) {
    rk::check_rows("token_rewards", *logp, {*ref_logp}, mask);
    lp = logp->contiguous();
    rf = ref_logp->contiguous();
    TORCH_CHECK(lp.scalar_type() == s.scalar_type(), "token_rewards: logp must have the dtype of score");
  }
  if (dense.has_value()) {
    rk::check_rows("token_rewards", *dense, {}, mask);
    dn = dense->contiguous();
    TORCH_CHECK(dn.scalar_type() == s.scalar_type(), "token_rewards: dense must have the dtype of score");
  }
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "token_rewards", [&] {
    RewardArgs<scalar_t> a{use_kl ? lp.const_data_ptr<scalar_t>() : nullptr,
                           use_kl ? rf.const_data_ptr<scalar_t>() : nullptr,
                           dn.defined() ? dn.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(kl_coef),
                           static_cast<scalar_t>(dense_coef), static_cast<scalar_t>(dense_clip)};
    const int64_t est = use_kl ? kl_estimator : -1;
    auto* o = out.mutable_data_ptr<scalar_t>();
    const auto* sc = s.const_data_ptr<scalar_t>();
    const uint8_t* pm = rk::mask_bytes(m);
    if (dn.defined())
      dispatch_est<scalar_t, true>(est, sc, pm, a, o, R, n, score_after_eos);
    else
      dispatch_est<scalar_t, false>(est, sc, pm, a, o, R, n, score_after_eos);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("token_rewards", &token_rewards); }
