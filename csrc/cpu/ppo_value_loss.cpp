// CPU kernels of rlhf_kernels::ppo_value_loss_{fwd,bwd}, and its autograd (all devices).
// Forward: one pass over the tokens, rows in parallel, each row's loss sum, valid and clipped counts
// reduced in a fixed (compile-time) order; then a serial combine over rows. Backward: one pass.
// Masked positions are selected away (never multiplied by 0), so garbage/inf there cannot leak NaN.
#if defined(__GNUC__) && !defined(__clang__)
// lets GCC if-convert (and so vectorise) the per-token selects; no code here reads FP exception flags
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/aggregate.h"
#include "cpu/vec_math.h"

namespace {

constexpr int64_t kGrain = 1 << 14;  // tokens per parallel task (at least one row)
constexpr int64_t kTile = 256;       // tokens per buffered tile of the forward

template <typename T> struct RowPartial {
  T sum = 0;
  int64_t n = 0, clipped = 0;
};

// Per tile: an elementwise loop writes each token's terms to small buffers, then plain sums reduce them.
template <typename T>
RK_ALWAYS_INLINE void row_forward(const T* val, const T* old, const T* ret, const uint8_t* m, int64_t len, T clip,
                                  RowPartial<T>& out) {
  alignas(64) T loss_buf[kTile];
  alignas(64) int32_t n_buf[kTile], clip_buf[kTile];
  for (int64_t t0 = 0; t0 < len; t0 += kTile) {
    const int64_t n = std::min(kTile, len - t0);
    const T *a = val + t0, *b = old + t0, *r = ret + t0;
    const uint8_t* v = m + t0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const auto tok = rk::ppo_value_token(a[i], b[i], r[i], clip);
      const int32_t valid = v[i] != 0;
      loss_buf[i] = valid ? tok.loss : T(0);
      n_buf[i] = valid;
      clip_buf[i] = tok.clipped & valid;
    }
    T s = 0;
    int32_t nv = 0, nc = 0;
#pragma omp simd reduction(+ : s, nv, nc)
    for (int64_t i = 0; i < n; ++i) {
      s += loss_buf[i];
      nv += n_buf[i];
      nc += clip_buf[i];
    }
    out.sum += s;
    out.n += nv;
    out.clipped += nc;
  }
}

template <typename T>
RK_ALWAYS_INLINE void row_backward(const T* val, const T* old, const T* ret, const uint8_t* m, int64_t len, T clip,
                                   T scale, T* g_v, T* g_old, T* g_ret) {
  if (g_old == nullptr) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const auto tok = rk::ppo_value_token(val[t], old[t], ret[t], clip);
      g_v[t] = m[t] ? scale * tok.dloss : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const auto tok = rk::ppo_value_token(val[t], old[t], ret[t], clip);
      g_v[t] = m[t] ? scale * tok.dloss : T(0);
      g_old[t] = m[t] ? scale * (tok.err - tok.dloss) : T(0);
      g_ret[t] = m[t] ? -scale * tok.err : T(0);
    }
  }
}

// The float loops compiled for AVX2 and for the baseline ISA (see vec_math.h); double runs the template.
RK_TARGET_AVX2 void row_forward_avx2(const float* a, const float* b, const float* r, const uint8_t* m, int64_t len,
                                     float clip, RowPartial<float>& out) {
  row_forward(a, b, r, m, len, clip, out);
}
void row_forward_base(const float* a, const float* b, const float* r, const uint8_t* m, int64_t len, float clip,
                      RowPartial<float>& out) {
  row_forward(a, b, r, m, len, clip, out);
}
void row_forward_best(const float* a, const float* b, const float* r, const uint8_t* m, int64_t len, float clip,
                      RowPartial<float>& out) {
  rk::cpu::has_avx2() ? row_forward_avx2(a, b, r, m, len, clip, out) : row_forward_base(a, b, r, m, len, clip, out);
}
void row_forward_best(const double* a, const double* b, const double* r, const uint8_t* m, int64_t len, double clip,
                      RowPartial<double>& out) {
  row_forward(a, b, r, m, len, clip, out);
}
RK_TARGET_AVX2 void row_backward_avx2(const float* a, const float* b, const float* r, const uint8_t* m, int64_t len,
                                      float clip, float scale, float* gv, float* go, float* gr) {
  row_backward(a, b, r, m, len, clip, scale, gv, go, gr);
}
void row_backward_base(const float* a, const float* b, const float* r, const uint8_t* m, int64_t len, float clip,
                       float scale, float* gv, float* go, float* gr) {
  row_backward(a, b, r, m, len, clip, scale, gv, go, gr);
}
void row_backward_best(const float* a, const float* b, const float* r, const uint8_t* m, int64_t len, float clip,
                       float scale, float* gv, float* go, float* gr) {
  rk::cpu::has_avx2() ? row_backward_avx2(a, b, r, m, len, clip, scale, gv, go, gr)
                      : row_backward_base(a, b, r, m, len, clip, scale, gv, go, gr);
}
void row_backward_best(const double* a, const double* b, const double* r, const uint8_t* m, int64_t len, double clip,
                       double scale, double* gv, double* go, double* gr) {
  row_backward(a, b, r, m, len, clip, scale, gv, go, gr);
}

void check_inputs(const at::Tensor& val, const at::Tensor& old, const at::Tensor& ret, const at::Tensor& mask) {
  TORCH_CHECK(val.dim() == 2 && val.is_contiguous(), "ppo_value_loss: values must be a contiguous [R, T] tensor");
  TORCH_CHECK(old.sizes() == val.sizes() && ret.sizes() == val.sizes() && mask.sizes() == val.sizes(),
              "ppo_value_loss: inputs must share values' shape");
  TORCH_CHECK(old.scalar_type() == val.scalar_type() && ret.scalar_type() == val.scalar_type(),
              "ppo_value_loss: values, old_values and returns must share a dtype");
  TORCH_CHECK(old.is_contiguous() && ret.is_contiguous() && mask.is_contiguous(),
              "ppo_value_loss: inputs must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "ppo_value_loss: mask must be bool");
}

template <typename T>
void forward_impl(const at::Tensor& val, const at::Tensor& old, const at::Tensor& ret, const at::Tensor& mask, T clip,
                  int64_t agg, at::Tensor& loss, at::Tensor& clipfrac, at::Tensor& row_weight) {
  const int64_t R = val.size(0), L = val.size(1);
  const T* a = val.const_data_ptr<T>();
  const T* b = old.const_data_ptr<T>();
  const T* r = ret.const_data_ptr<T>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  std::vector<RowPartial<T>> part(R);
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) row_forward_best(a + i * L, b + i * L, r + i * L, m + i * L, L, clip, part[i]);
  });
  std::vector<int64_t> row_n(R);
  std::vector<T> row_sum(R);
  int64_t clipped = 0;
  for (int64_t i = 0; i < R; ++i) {
    row_n[i] = part[i].n;
    row_sum[i] = part[i].sum;
    clipped += part[i].clipped;
  }
  const rk::cpu::Totals tot = rk::cpu::count_totals(row_n);
  const double total = rk::cpu::combine_rows<T>(agg, row_n, row_sum, tot, row_weight.mutable_data_ptr<T>());
  *loss.mutable_data_ptr<T>() = static_cast<T>(total);
  *clipfrac.mutable_data_ptr<float>() = static_cast<float>(rk::cpu::masked_mean(double(clipped), tot.tokens));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd(const at::Tensor& val, const at::Tensor& old,
                                                                  const at::Tensor& ret, const at::Tensor& mask,
                                                                  double clip, int64_t agg) {
  check_inputs(val, old, ret, mask);
  auto loss = at::empty({}, val.options());
  auto clipfrac = at::empty({}, val.options().dtype(at::kFloat));
  auto row_weight = at::empty({val.size(0)}, val.options());
  if (val.scalar_type() == at::kFloat) {
    forward_impl<float>(val, old, ret, mask, float(clip), agg, loss, clipfrac, row_weight);
  } else {
    TORCH_CHECK(val.scalar_type() == at::kDouble, "ppo_value_loss: expected float32 or float64 inputs");
    forward_impl<double>(val, old, ret, mask, clip, agg, loss, clipfrac, row_weight);
  }
  return {loss, clipfrac, row_weight};
}

template <typename T>
void backward_impl(T g, const at::Tensor& val, const at::Tensor& old, const at::Tensor& ret, const at::Tensor& mask,
                   const at::Tensor& row_weight, T clip, at::Tensor& g_v, at::Tensor* g_old, at::Tensor* g_ret) {
  const int64_t R = val.size(0), L = val.size(1);
  const T* a = val.const_data_ptr<T>();
  const T* b = old.const_data_ptr<T>();
  const T* r = ret.const_data_ptr<T>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const T* w = row_weight.const_data_ptr<T>();
  T* gv = g_v.mutable_data_ptr<T>();
  T* go = g_old ? g_old->mutable_data_ptr<T>() : nullptr;
  T* gr = g_ret ? g_ret->mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t o = i * L;
      row_backward_best(a + o, b + o, r + o, m + o, L, clip, g * w[i], gv + o, go ? go + o : nullptr,
                        gr ? gr + o : nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& val,
                                                                  const at::Tensor& old, const at::Tensor& ret,
                                                                  const at::Tensor& mask, const at::Tensor& row_weight,
                                                                  double clip, bool need_data_grads) {
  check_inputs(val, old, ret, mask);
  TORCH_CHECK(grad_loss.numel() == 1 && row_weight.numel() == val.size(0),
              "ppo_value_loss_bwd: grad_loss must be a scalar and row_weight [R]");
  auto g_v = at::empty_like(val);
  auto g_old = need_data_grads ? at::empty_like(old) : at::empty({0}, old.options());
  auto g_ret = need_data_grads ? at::empty_like(ret) : at::empty({0}, ret.options());
  at::Tensor* go = need_data_grads ? &g_old : nullptr;
  at::Tensor* gr = need_data_grads ? &g_ret : nullptr;
  if (val.scalar_type() == at::kFloat) {
    backward_impl<float>(grad_loss.item<float>(), val, old, ret, mask, row_weight, float(clip), g_v, go, gr);
  } else {
    TORCH_CHECK(val.scalar_type() == at::kDouble, "ppo_value_loss: expected float32 or float64 inputs");
    backward_impl<double>(grad_loss.item<double>(), val, old, ret, mask, row_weight, clip, g_v, go, gr);
  }
  return {g_v, g_old, g_ret};
}

// ---- autograd (device-independent: serves the CPU and CUDA kernels alike) ----
// In C++ rather than torch.library.register_autograd: the Python autograd.Function round trip
// costs more than this op's whole kernel time at RLHF sizes.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ValueLossFn : public torch::autograd::Function<ValueLossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& val, const at::Tensor& old,
                               const at::Tensor& ret, const at::Tensor& mask, double clip, int64_t agg) {
    static const auto fwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("rlhf_kernels::ppo_value_loss_fwd", "")
                                .typed<decltype(ppo_value_loss_fwd)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, clipfrac, row_weight] = fwd.call(val, old, ret, mask, clip, agg);
    ctx->save_for_backward({val, old, ret, mask, row_weight});
    ctx->saved_data["clip"] = clip;
    ctx->mark_non_differentiable({clipfrac, row_weight});
    return {loss, clipfrac, row_weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("rlhf_kernels::ppo_value_loss_bwd", "")
                                .typed<decltype(ppo_value_loss_bwd)>();
    const auto s = ctx->get_saved_variables();
    const bool need_data = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    auto [g_v, g_old, g_ret] =
        bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["clip"].toDouble(), need_data);
    return {ctx->needs_input_grad(0) ? g_v : at::Tensor(), ctx->needs_input_grad(1) ? g_old : at::Tensor(),
            ctx->needs_input_grad(2) ? g_ret : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_value_loss_fwd_autograd(const at::Tensor& val,
                                                                           const at::Tensor& old,
                                                                           const at::Tensor& ret,
                                                                           const at::Tensor& mask, double clip,
                                                                           int64_t agg) {
  auto out = ValueLossFn::apply(val, old, ret, mask, clip, agg);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("ppo_value_loss_bwd", &ppo_value_loss_bwd);
}

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) { m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd_autograd); }
