// CPU kernels of rlhf_kernels::ppo_policy_loss_{fwd,bwd}.
// Forward: one pass over the tokens, rows in parallel, each row's loss sum, valid count, clipped
// count and ½(logp − old)² sum reduced in a fixed (compile-time) order; then a serial combine over
// rows. Backward: one pass, ∂ℓ/∂logp recomputed per token and scaled by grad·row_weight.
// Masked positions are selected away (never multiplied by 0), so garbage/inf there cannot leak NaN.
#if defined(__GNUC__) && !defined(__clang__)
// lets GCC if-convert (and so vectorise) the per-token selects; no code here reads FP exception flags
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/aggregate.h"
#include "cpu/vec_math.h"

namespace {

constexpr int64_t kGrain = 1 << 14;     // tokens per parallel task (at least one row)
constexpr int64_t kTile = 256;          // tokens per buffered tile of the forward

template <typename T> struct Clip {
  T low, high, dual;
};

template <typename T> struct RowPartial {
  T sum = 0, kl = 0;
  int64_t n = 0, clipped = 0;
};

// Per tile: an elementwise loop writes each token's terms to small buffers, then plain sums
// reduce them. (A conditional accumulate in the token loop itself makes GCC branch, not vectorise.)
template <typename T>
RK_ALWAYS_INLINE void row_forward(const T* lp, const T* old, const T* adv, const uint8_t* m, int64_t len, Clip<T> c,
                                  RowPartial<T>& out) {
  alignas(64) T loss_buf[kTile], kl_buf[kTile];
  alignas(64) int32_t n_buf[kTile], clip_buf[kTile];
  for (int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int64_t n = std::min(kTile, len - t0);
    const T *a = lp + t0, *b = old + t0, *e = adv + t0;
    const uint8_t* v = m + t0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T d = a[i] - b[i];
      const auto tok = rk::ppo_policy_token_ratio(rk::r_exp(d), e[i], c.low, c.high, c.dual);
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
RK_ALWAYS_INLINE void row_backward(const T* lp, const T* old, const T* adv, const uint8_t* m, int64_t len, Clip<T> c,
                                   T scale, T* g_lp, T* g_adv) {
  if (g_adv == nullptr) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const auto tok = rk::ppo_policy_token_ratio(rk::r_exp(lp[t] - old[t]), adv[t], c.low, c.high, c.dual);
      g_lp[t] = m[t] ? scale * tok.dloss : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const auto tok = rk::ppo_policy_token_ratio(rk::r_exp(lp[t] - old[t]), adv[t], c.low, c.high, c.dual);
      g_lp[t] = m[t] ? scale * tok.dloss : T(0);
      g_adv[t] = m[t] ? scale * tok.dadv : T(0);
    }
  }
}

// The float loops compiled for AVX2 and for the baseline ISA (see vec_math.h); double runs the template.
RK_TARGET_AVX2 void row_forward_avx2(const float* lp, const float* old, const float* adv, const uint8_t* m,
                                     int64_t len, Clip<float> c, RowPartial<float>& out) {
  row_forward(lp, old, adv, m, len, c, out);
}
void row_forward_base(const float* lp, const float* old, const float* adv, const uint8_t* m, int64_t len,
                      Clip<float> c, RowPartial<float>& out) {
  row_forward(lp, old, adv, m, len, c, out);
}
void row_forward_best(const float* lp, const float* old, const float* adv, const uint8_t* m, int64_t len,
                      Clip<float> c, RowPartial<float>& out) {
  rk::cpu::has_avx2() ? row_forward_avx2(lp, old, adv, m, len, c, out) : row_forward_base(lp, old, adv, m, len, c, out);
}
void row_forward_best(const double* lp, const double* old, const double* adv, const uint8_t* m, int64_t len,
                      Clip<double> c, RowPartial<double>& out) {
  row_forward(lp, old, adv, m, len, c, out);
}
RK_TARGET_AVX2 void row_backward_avx2(const float* lp, const float* old, const float* adv, const uint8_t* m,
                                      int64_t len, Clip<float> c, float scale, float* g_lp, float* g_adv) {
  row_backward(lp, old, adv, m, len, c, scale, g_lp, g_adv);
}
void row_backward_base(const float* lp, const float* old, const float* adv, const uint8_t* m, int64_t len,
                       Clip<float> c, float scale, float* g_lp, float* g_adv) {
  row_backward(lp, old, adv, m, len, c, scale, g_lp, g_adv);
}
void row_backward_best(const float* lp, const float* old, const float* adv, const uint8_t* m, int64_t len,
                       Clip<float> c, float scale, float* g_lp, float* g_adv) {
  rk::cpu::has_avx2() ? row_backward_avx2(lp, old, adv, m, len, c, scale, g_lp, g_adv)
                      : row_backward_base(lp, old, adv, m, len, c, scale, g_lp, g_adv);
}
void row_backward_best(const double* lp, const double* old, const double* adv, const uint8_t* m, int64_t len,
                       Clip<double> c, double scale, double* g_lp, double* g_adv) {
  row_backward(lp, old, adv, m, len, c, scale, g_lp, g_adv);
}

void check_inputs(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask) {
  TORCH_CHECK(logp.dim() == 2 && logp.is_contiguous(), "ppo_policy_loss: logp must be a contiguous [R, T] tensor");
  TORCH_CHECK(old.sizes() == logp.sizes() && adv.sizes() == logp.sizes() && mask.sizes() == logp.sizes(),
              "ppo_policy_loss: inputs must share logp's shape");
  TORCH_CHECK(old.scalar_type() == logp.scalar_type() && adv.scalar_type() == logp.scalar_type(),
              "ppo_policy_loss: logp, old_logp and advantages must share a dtype");
  TORCH_CHECK(old.is_contiguous() && adv.is_contiguous() && mask.is_contiguous(),
              "ppo_policy_loss: inputs must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "ppo_policy_loss: mask must be bool");
}

template <typename T>
void forward_impl(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask,
                  Clip<T> c, int64_t agg, at::Tensor& loss, at::Tensor& clipfrac, at::Tensor& approx_kl,
                  at::Tensor& row_weight) {
  const int64_t R = logp.size(0), L = logp.size(1);
  const T* lp = logp.const_data_ptr<T>();
  const T* ol = old.const_data_ptr<T>();
  const T* ad = adv.const_data_ptr<T>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  std::vector<RowPartial<T>> part(R);
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * L;
      row_forward_best(lp + o, ol + o, ad + o, m + o, L, c, part[r]);
    }
  });
  std::vector<int64_t> row_n(R);
  std::vector<T> row_sum(R);
  int64_t clipped = 0;
  double kl = 0;
  for (int64_t r = 0; r < R; ++r) {
    row_n[r] = part[r].n;
    row_sum[r] = part[r].sum;
    clipped += part[r].clipped;
    kl += double(part[r].kl);
  }
  const rk::cpu::Totals tot = rk::cpu::count_totals(row_n);
  const double total = rk::cpu::combine_rows<T>(agg, row_n, row_sum, tot, row_weight.mutable_data_ptr<T>());
  *loss.mutable_data_ptr<T>() = static_cast<T>(total);
  *clipfrac.mutable_data_ptr<float>() = static_cast<float>(rk::cpu::masked_mean(double(clipped), tot.tokens));
  *approx_kl.mutable_data_ptr<float>() = static_cast<float>(rk::cpu::masked_mean(kl, tot.tokens));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd(
    const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask, double clip_low,
    double clip_high, double dual_clip, int64_t agg) {
  check_inputs(logp, old, adv, mask);
  auto loss = at::empty({}, logp.options());
  auto f32 = logp.options().dtype(at::kFloat);
  auto clipfrac = at::empty({}, f32), approx_kl = at::empty({}, f32);
  auto row_weight = at::empty({logp.size(0)}, logp.options());
  if (logp.scalar_type() == at::kFloat) {
    forward_impl<float>(logp, old, adv, mask, {float(clip_low), float(clip_high), float(dual_clip)}, agg, loss,
                        clipfrac, approx_kl, row_weight);
  } else {
    TORCH_CHECK(logp.scalar_type() == at::kDouble, "ppo_policy_loss: expected float32 or float64 inputs");
    forward_impl<double>(logp, old, adv, mask, {clip_low, clip_high, dual_clip}, agg, loss, clipfrac, approx_kl,
                         row_weight);
  }
  return {loss, clipfrac, approx_kl, row_weight};
}

template <typename T>
void backward_impl(T g, const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask,
                   const at::Tensor& row_weight, Clip<T> c, at::Tensor& g_lp, at::Tensor* g_adv) {
  const int64_t R = logp.size(0), L = logp.size(1);
  const T* lp = logp.const_data_ptr<T>();
  const T* ol = old.const_data_ptr<T>();
  const T* ad = adv.const_data_ptr<T>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const T* w = row_weight.const_data_ptr<T>();
  T* gl = g_lp.mutable_data_ptr<T>();
  T* ga = g_adv ? g_adv->mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * L;
      row_backward_best(lp + o, ol + o, ad + o, m + o, L, c, g * w[r], gl + o, ga ? ga + o : nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logp,
                                                       const at::Tensor& old, const at::Tensor& adv,
                                                       const at::Tensor& mask, const at::Tensor& row_weight,
                                                       double clip_low, double clip_high, double dual_clip,
                                                       bool need_adv_grad) {
  check_inputs(logp, old, adv, mask);
  TORCH_CHECK(grad_loss.numel() == 1 && row_weight.numel() == logp.size(0),
              "ppo_policy_loss_bwd: grad_loss must be a scalar and row_weight [R]");
  auto g_lp = at::empty_like(logp);
  auto g_adv = need_adv_grad ? at::empty_like(adv) : at::empty({0}, adv.options());
  if (logp.scalar_type() == at::kFloat) {
    backward_impl<float>(grad_loss.item<float>(), logp, old, adv, mask, row_weight,
                         {float(clip_low), float(clip_high), float(dual_clip)}, g_lp, need_adv_grad ? &g_adv : nullptr);
  } else {
    TORCH_CHECK(logp.scalar_type() == at::kDouble, "ppo_policy_loss: expected float32 or float64 inputs");
    backward_impl<double>(grad_loss.item<double>(), logp, old, adv, mask, row_weight, {clip_low, clip_high, dual_clip},
                          g_lp, need_adv_grad ? &g_adv : nullptr);
  }
  return {g_lp, g_adv};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_policy_loss_bwd", &ppo_policy_loss_bwd);
}

// ---- autograd (device-independent: serves the CPU and CUDA kernels alike) ----
// In C++ rather than torch.library.register_autograd: the Python autograd.Function round trip
// costs more than this op's whole kernel time at RLHF sizes.
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class PolicyLossFn : public torch::autograd::Function<PolicyLossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logp, const at::Tensor& old,
                               const at::Tensor& adv, const at::Tensor& mask, double clip_low, double clip_high,
                               double dual_clip, int64_t agg) {
    static const auto fwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("rlhf_kernels::ppo_policy_loss_fwd", "")
                                .typed<decltype(ppo_policy_loss_fwd)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, clipfrac, approx_kl, row_weight] =
        fwd.call(logp, old, adv, mask, clip_low, clip_high, dual_clip, agg);
    ctx->save_for_backward({logp, old, adv, mask, row_weight});
    ctx->saved_data["clip_low"] = clip_low;
    ctx->saved_data["clip_high"] = clip_high;
    ctx->saved_data["dual_clip"] = dual_clip;
    ctx->mark_non_differentiable({clipfrac, approx_kl, row_weight});
    return {loss, clipfrac, approx_kl, row_weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("rlhf_kernels::ppo_policy_loss_bwd", "")
                                .typed<decltype(ppo_policy_loss_bwd)>();
    const auto s = ctx->get_saved_variables();
    const bool need_adv = ctx->needs_input_grad(2);
    auto [g_lp, g_adv] = bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["clip_low"].toDouble(),
                                  ctx->saved_data["clip_high"].toDouble(), ctx->saved_data["dual_clip"].toDouble(),
                                  need_adv);
    return {ctx->needs_input_grad(0) ? g_lp : at::Tensor(), ctx->needs_input_grad(1) ? g_lp.neg() : at::Tensor(),
            need_adv ? g_adv : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_policy_loss_fwd_autograd(
    const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv, const at::Tensor& mask, double clip_low,
    double clip_high, double dual_clip, int64_t agg) {
  auto out = PolicyLossFn::apply(logp, old, adv, mask, clip_low, clip_high, dual_clip, agg);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) { m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd_autograd); }
