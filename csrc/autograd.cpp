// The C++ autograd of the three losses (ppo_policy_loss, ppo_value_loss, dpo_loss), for every device:
// each forward calls the op's kernel through the dispatcher (CPU or CUDA) and saves what its backward
// needs. In C++ rather than torch.library.register_autograd: the Python autograd.Function round trip
// costs more than these ops' whole kernel time at RLHF sizes.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of rlhf_kernels::<name>.
template <typename Sig> c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using OptTensor = std::optional<Tensor>;
using PolicyFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                     const OptTensor&, const OptTensor&, double, double, double,
                                                     int64_t, int64_t, int64_t, double, int64_t, double);
using PolicyBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                     const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                                     double, double, double, int64_t, int64_t, double, int64_t, bool,
                                                     bool);

// weights and ref_logp are constants of the loss (they get no gradient); saved as empty tensors when absent.
class PolicyLossFn : public torch::autograd::Function<PolicyLossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logp, const Tensor& old, const Tensor& adv,
                               const Tensor& mask, const OptTensor& weights, const OptTensor& ref, double clip_low,
                               double clip_high, double dual_clip, int64_t agg, int64_t ratio_level, int64_t loss_type,
                               double kl_coef, int64_t kl_estimator, double denominator) {
    static const auto fwd = op<PolicyFwd>("rlhf_kernels::ppo_policy_loss_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, stats, row_weight] = fwd.call(logp, old, adv, mask, weights, ref, clip_low, clip_high, dual_clip, agg,
                                              ratio_level, loss_type, kl_coef, kl_estimator, denominator);
    ctx->save_for_backward({logp, old, adv, mask, weights.value_or(Tensor()), ref.value_or(Tensor()), row_weight});
    ctx->saved_data["clip_low"] = clip_low;
    ctx->saved_data["clip_high"] = clip_high;
    ctx->saved_data["dual_clip"] = dual_clip;
    ctx->saved_data["ratio_level"] = ratio_level;
    ctx->saved_data["loss_type"] = loss_type;
    ctx->saved_data["kl_coef"] = kl_coef;
    ctx->saved_data["kl_estimator"] = kl_estimator;
    ctx->mark_non_differentiable({stats, row_weight});
    return {loss, stats, row_weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<PolicyBwd>("rlhf_kernels::ppo_policy_loss_bwd");
    const auto s = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    const bool need_old = ctx->needs_input_grad(1), need_adv = ctx->needs_input_grad(2);
    const OptTensor weights = s[4].defined() ? OptTensor(s[4]) : std::nullopt;
    const OptTensor ref = s[5].defined() ? OptTensor(s[5]) : std::nullopt;
    auto [g_lp, g_old, g_adv] =
        bwd.call(grads[0], s[0], s[1], s[2], s[3], weights, ref, s[6], d.at("clip_low").toDouble(),
                 d.at("clip_high").toDouble(), d.at("dual_clip").toDouble(), d.at("ratio_level").toInt(),
                 d.at("loss_type").toInt(), d.at("kl_coef").toDouble(), d.at("kl_estimator").toInt(), need_old,
                 need_adv);
    variable_list out(15);
    out[0] = ctx->needs_input_grad(0) ? g_lp : Tensor();
    out[1] = need_old ? g_old : Tensor();
    out[2] = need_adv ? g_adv : Tensor();
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> ppo_policy_loss_fwd(const Tensor& logp, const Tensor& old, const Tensor& adv,
                                                      const Tensor& mask, const OptTensor& weights,
                                                      const OptTensor& ref, double clip_low, double clip_high,
                                                      double dual_clip, int64_t agg, int64_t ratio_level,
                                                      int64_t loss_type, double kl_coef, int64_t kl_estimator,
                                                      double denominator) {
  auto out = PolicyLossFn::apply(logp, old, adv, mask, weights, ref, clip_low, clip_high, dual_clip, agg, ratio_level,
                                 loss_type, kl_coef, kl_estimator, denominator);
  return {out[0], out[1], out[2]};
}

using ValueFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    double, int64_t);
using ValueBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                    const Tensor&, const Tensor&, double, bool);

class ValueLossFn : public torch::autograd::Function<ValueLossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& val, const Tensor& old, const Tensor& ret,
                               const Tensor& mask, double clip, int64_t agg) {
    static const auto fwd = op<ValueFwd>("rlhf_kernels::ppo_value_loss_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, clipfrac, row_weight] = fwd.call(val, old, ret, mask, clip, agg);
    ctx->save_for_backward({val, old, ret, mask, row_weight});
    ctx->saved_data["clip"] = clip;
    ctx->mark_non_differentiable({clipfrac, row_weight});
    return {loss, clipfrac, row_weight};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<ValueBwd>("rlhf_kernels::ppo_value_loss_bwd");
    const auto s = ctx->get_saved_variables();
    const bool need_data = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    auto [g_v, g_old, g_ret] =
        bwd.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["clip"].toDouble(), need_data);
    return {ctx->needs_input_grad(0) ? g_v : Tensor(), ctx->needs_input_grad(1) ? g_old : Tensor(),
            ctx->needs_input_grad(2) ? g_ret : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> ppo_value_loss_fwd(const Tensor& val, const Tensor& old, const Tensor& ret,
                                                      const Tensor& mask, double clip, int64_t agg) {
  auto out = ValueLossFn::apply(val, old, ret, mask, clip, agg);
  return {out[0], out[1], out[2]};
}

using DpoFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                                  int64_t, double);
using DpoBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, double, int64_t, double);

class DpoLossFn : public torch::autograd::Function<DpoLossFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& c, const Tensor& r, const Tensor& cr,
                               const Tensor& rr, double beta, int64_t type, double eps) {
    static const auto fwd = op<DpoFwd>("rlhf_kernels::dpo_loss_fwd");
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
    static const auto bwd = op<DpoBwd>("rlhf_kernels::dpo_loss_bwd");
    const auto s = ctx->get_saved_variables();
    auto [gc, gr, gcr, grr] = bwd.call(grads[0].contiguous(), s[0], s[1], s[2], s[3],
                                       ctx->saved_data["beta"].toDouble(), ctx->saved_data["type"].toInt(),
                                       ctx->saved_data["eps"].toDouble());
    auto keep = [&](int i, const Tensor& g) { return ctx->needs_input_grad(i) ? g : Tensor(); };
    return {keep(0, gc), keep(1, gr), keep(2, gcr), keep(3, grr), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> dpo_loss_fwd(const Tensor& c, const Tensor& r, const Tensor& cr, const Tensor& rr,
                                                double beta, int64_t type, double eps) {
  auto out = DpoLossFn::apply(c, r, cr, rr, beta, type, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) {
  m.impl("ppo_policy_loss_fwd", &ppo_policy_loss_fwd);
  m.impl("ppo_value_loss_fwd", &ppo_value_loss_fwd);
  m.impl("dpo_loss_fwd", &dpo_loss_fwd);
}
