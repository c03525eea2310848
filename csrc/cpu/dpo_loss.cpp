// CPU kernels of rlhf_kernels::dpo_loss_{fwd,bwd} (elementwise over the pairs), and its autograd
// (all devices). Backward gives all four input gradients in one pass: ±grad·∂loss/∂h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common.h"

namespace {

constexpr int64_t kGrain = 1 << 12;

void check_inputs(const at::Tensor& c, const at::Tensor& r, const at::Tensor& cr, const at::Tensor& rr) {
  TORCH_CHECK(r.sizes() == c.sizes() && cr.sizes() == c.sizes() && rr.sizes() == c.sizes(),
              "dpo_loss: inputs must share chosen_logp's shape");
  TORCH_CHECK(r.scalar_type() == c.scalar_type() && cr.scalar_type() == c.scalar_type() &&
                  rr.scalar_type() == c.scalar_type(),
              "dpo_loss: inputs must share a dtype");
  TORCH_CHECK(c.is_contiguous() && r.is_contiguous() && cr.is_contiguous() && rr.is_contiguous(),
              "dpo_loss: inputs must be contiguous");
  TORCH_CHECK(c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble,
              "dpo_loss: expected float32 or float64 inputs");
}

template <typename F> void dispatch(const at::Tensor& x, const F& f) {
  if (x.scalar_type() == at::kFloat)
    f(float{});
  else
    f(double{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_fwd(const at::Tensor& c, const at::Tensor& r,
                                                            const at::Tensor& cr, const at::Tensor& rr, double beta,
                                                            int64_t type, double eps) {
  check_inputs(c, r, cr, rr);
  auto losses = at::empty_like(c), c_rew = at::empty_like(c), r_rew = at::empty_like(c);
  dispatch(c, [&](auto tag) {
    using T = decltype(tag);
    const T *pc = c.const_data_ptr<T>(), *pr = r.const_data_ptr<T>();
    const T *pcr = cr.const_data_ptr<T>(), *prr = rr.const_data_ptr<T>();
    T *pl = losses.mutable_data_ptr<T>(), *pcw = c_rew.mutable_data_ptr<T>(), *prw = r_rew.mutable_data_ptr<T>();
    const T b = static_cast<T>(beta), e = static_cast<T>(eps);
    at::parallel_for(0, c.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const T dc = pc[i] - pcr[i], dr = pr[i] - prr[i];
        pl[i] = rk::dpo_loss_value(dc - dr, b, type, e);
        pcw[i] = b * dc;
        prw[i] = b * dr;
      }
    });
  });
  return {losses, c_rew, r_rew};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dpo_loss_bwd(const at::Tensor& grad, const at::Tensor& c,
                                                                        const at::Tensor& r, const at::Tensor& cr,
                                                                        const at::Tensor& rr, double beta,
                                                                        int64_t type, double eps) {
  check_inputs(c, r, cr, rr);
  TORCH_CHECK(grad.sizes() == c.sizes() && grad.is_contiguous() && grad.scalar_type() == c.scalar_type(),
              "dpo_loss_bwd: grad_losses must be contiguous, of chosen_logp's shape and dtype");
  auto gc = at::empty_like(c), gr = at::empty_like(c), gcr = at::empty_like(c), grr = at::empty_like(c);
  dispatch(c, [&](auto tag) {
    using T = decltype(tag);
    const T *pg = grad.const_data_ptr<T>(), *pc = c.const_data_ptr<T>(), *pr = r.const_data_ptr<T>();
    const T *pcr = cr.const_data_ptr<T>(), *prr = rr.const_data_ptr<T>();
    T *o_c = gc.mutable_data_ptr<T>(), *o_r = gr.mutable_data_ptr<T>();
    T *o_cr = gcr.mutable_data_ptr<T>(), *o_rr = grr.mutable_data_ptr<T>();
    const T b = static_cast<T>(beta), e = static_cast<T>(eps);
    at::parallel_for(0, c.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const T d = pg[i] * rk::dpo_loss_dh((pc[i] - pcr[i]) - (pr[i] - prr[i]), b, type, e);
        o_c[i] = d;
        o_r[i] = -d;
        o_cr[i] = -d;
        o_rr[i] = d;
      }
    });
  });
  return {gc, gr, gcr, grr};
}

// ---- autograd (device-independent: serves the CPU and CUDA kernels alike) ----
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class DpoLossFn : public torch::autograd::Function<DpoLossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& c, const at::Tensor& r, const at::Tensor& cr,
                               const at::Tensor& rr, double beta, int64_t type, double eps) {
    static const auto fwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("rlhf_kernels::dpo_loss_fwd", "")
                                .typed<decltype(dpo_loss_fwd)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [losses, c_rew, r_rew] = fwd.call(c, r, cr, rr, beta, type, eps);
    ctx->save_for_backward({c, r, cr, rr});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["type"] = type;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({c_rew, r_rew});  // the rewards are logged, not trained on
    return {losses, c_rew, r_rew};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("rlhf_kernels::dpo_loss_bwd", "")
                                .typed<decltype(dpo_loss_bwd)>();
    const auto s = ctx->get_saved_variables();
    auto [gc, gr, gcr, grr] = bwd.call(grads[0].contiguous(), s[0], s[1], s[2], s[3],
                                       ctx->saved_data["beta"].toDouble(), ctx->saved_data["type"].toInt(),
                                       ctx->saved_data["eps"].toDouble());
    auto keep = [&](int i, const at::Tensor& g) { return ctx->needs_input_grad(i) ? g : at::Tensor(); };
    return {keep(0, gc), keep(1, gr), keep(2, gcr), keep(3, grr), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_fwd_autograd(const at::Tensor& c, const at::Tensor& r,
                                                                     const at::Tensor& cr, const at::Tensor& rr,
                                                                     double beta, int64_t type, double eps) {
  auto out = DpoLossFn::apply(c, r, cr, rr, beta, type, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("dpo_loss_fwd", &dpo_loss_fwd);
  m.impl("dpo_loss_bwd", &dpo_loss_bwd);
}

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) { m.impl("dpo_loss_fwd", &dpo_loss_fwd_autograd); }
