// Host-side argument checks of the native ops: one function per op, called by its CPU and its CUDA
// entry point alike, so both backends enforce the same device, dtype, shape and contiguity rules
// (plus the few host-side input helpers both share).
// The Python layer validates user input with friendly errors; these guard the raw torch.ops calls, so
// that no kernel reads out of bounds or dereferences memory of another device, whatever it is given.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "row_index.h"

namespace rk {

// ---- building blocks ----

inline bool is_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// `t` has the dtype, shape and device of `like`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                       const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ", like.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                         const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device());
}

inline void check_contiguous(const char* op, std::initializer_list<at::Tensor> ts) {
  for (const auto& t : ts) TORCH_CHECK(t.is_contiguous(), op, ": inputs must be contiguous");
}

// A per-position flag tensor (a mask, gae's dones) read as one byte per element, 0 or not.
inline void check_flags(const char* op, const char* name, const at::Tensor& flags, const at::Tensor& x) {
  TORCH_CHECK(flags.scalar_type() == at::kBool || flags.scalar_type() == at::kByte, op, ": ", name,
              " must be bool or uint8, got ", flags.scalar_type());
  TORCH_CHECK(flags.sizes() == x.sizes(), op, ": ", name, " must have the shape of the inputs");
  TORCH_CHECK(flags.device() == x.device(), op, ": ", name, " must be on the inputs' device");
}

// Float inputs of one dtype (fp32 or fp64), shape and device, and their mask: the [..., T] row ops.
inline void check_rows(const char* op, const at::Tensor& x, std::initializer_list<at::Tensor> same,
                       const at::Tensor& mask) {
  TORCH_CHECK(is_float_or_double(x), op, ": expected float32 or float64, got ", x.scalar_type());
  for (const auto& t : same) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": all float inputs must share one dtype");
    TORCH_CHECK(t.sizes() == x.sizes(), op, ": all inputs must share one shape");
    TORCH_CHECK(t.device() == x.device(), op, ": all inputs must be on one device");
  }
  check_flags(op, "mask", mask, x);
}

// Runs f(float{}) or f(double{}) by the dtype of a tensor the checks above accepted.
template <typename F> void float_or_double(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kDouble) f(double{});
  else f(float{});
}

// bool and uint8 masks are both one byte per element, 0 or not.
inline const uint8_t* mask_bytes(const at::Tensor& m) { return static_cast<const uint8_t*>(m.const_data_ptr()); }

// ---- per op ----

inline void check_token_kl(const at::Tensor& logp, const at::Tensor& ref, const at::Tensor* grad = nullptr) {
  TORCH_CHECK(is_float_or_double(logp), "token_kl: expected float32 or float64 logp, got ", logp.scalar_type());
  check_like("token_kl", "ref_logp", ref, "logp", logp);
  if (grad) check_like("token_kl_bwd", "grad", *grad, "logp", logp);
  check_contiguous("token_kl", {logp, ref});
  if (grad) check_contiguous("token_kl_bwd", {*grad});
}

inline void check_dpo_loss(const at::Tensor& c, const at::Tensor& r, const at::Tensor& cr, const at::Tensor& rr,
                           const at::Tensor* grad = nullptr) {
  TORCH_CHECK(is_float_or_double(c), "dpo_loss: expected float32 or float64 inputs, got ", c.scalar_type());
  check_like("dpo_loss", "rejected_logp", r, "chosen_logp", c);
  check_like("dpo_loss", "ref_chosen_logp", cr, "chosen_logp", c);
  check_like("dpo_loss", "ref_rejected_logp", rr, "chosen_logp", c);
  if (grad) check_like("dpo_loss_bwd", "grad_losses", *grad, "chosen_logp", c);
  check_contiguous("dpo_loss", {c, r, cr, rr});
  if (grad) check_contiguous("dpo_loss_bwd", {*grad});
}

// The PPO losses: three float [R, T] inputs (named names[0..2]) and a bool mask, all contiguous.
inline void check_ppo_loss(const char* op, const char* const names[3], const at::Tensor& x, const at::Tensor& a,
                           const at::Tensor& b, const at::Tensor& mask) {
  TORCH_CHECK(x.dim() == 2, op, ": ", names[0], " must be [R, T], got ", x.sizes());
  TORCH_CHECK(is_float_or_double(x), op, ": expected float32 or float64 inputs, got ", x.scalar_type());
  check_like(op, names[1], a, names[0], x);
  check_like(op, names[2], b, names[0], x);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool");
  TORCH_CHECK(mask.sizes() == x.sizes(), op, ": mask must have the shape of ", names[0]);
  check_device(op, "mask", mask, names[0], x);
  check_contiguous(op, {x, a, b, mask});
}
// Their backward's extra inputs: the scalar upstream gradient and the saved per-row weight.
inline void check_ppo_loss_bwd(const char* op, const at::Tensor& grad_loss, const at::Tensor& row_weight,
                               const at::Tensor& x) {
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == x.scalar_type(), op,
              ": grad_loss must be one value of the inputs' dtype");
  TORCH_CHECK(row_weight.numel() == x.size(0) && row_weight.scalar_type() == x.scalar_type() &&
                  row_weight.is_contiguous(),
              op, ": row_weight must be a contiguous [R] tensor of the inputs' dtype");
  check_device(op, "grad_loss", grad_loss, "the inputs", x);
  check_device(op, "row_weight", row_weight, "the inputs", x);
}

// advantages are [R, T] or one per row [R]; weights and ref_logp, when given, are [R, T] like logp.
inline void check_ppo_policy_loss(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                                  const at::Tensor& mask, const std::optional<at::Tensor>& weights = std::nullopt,
                                  const std::optional<at::Tensor>& ref = std::nullopt) {
  static const char* const names[3] = {"logp", "old_logp", "advantages"};
  const char* op = "ppo_policy_loss";
  if (adv.dim() == 1 && logp.dim() == 2) {
    check_ppo_loss(op, names, logp, old, old, mask);
    TORCH_CHECK(adv.size(0) == logp.size(0) && adv.scalar_type() == logp.scalar_type() && adv.is_contiguous(), op,
                ": per-row advantages must be a contiguous [R] tensor of logp's dtype, got ", adv.sizes());
    check_device(op, "advantages", adv, "logp", logp);
  } else {
    check_ppo_loss(op, names, logp, old, adv, mask);
  }
  if (weights) check_like(op, "weights", *weights, "logp", logp);
  if (ref) check_like(op, "ref_logp", *ref, "logp", logp);
  if (weights) check_contiguous(op, {*weights});
  if (ref) check_contiguous(op, {*ref});
}

inline void check_ppo_value_loss(const at::Tensor& values, const at::Tensor& old, const at::Tensor& ret,
                                 const at::Tensor& mask) {
  static const char* const names[3] = {"values", "old_values", "returns"};
  check_ppo_loss("ppo_value_loss", names, values, old, ret, mask);
}

inline void check_gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                      const std::optional<at::Tensor>& dones) {
  check_rows("gae", rewards, {values}, mask);
  if (dones) check_flags("gae", "dones", *dones, rewards);
}

inline void check_masked_whiten(const at::Tensor& x, const at::Tensor& mask) { check_rows("masked_whiten", x, {}, mask); }

inline void check_token_rewards(const at::Tensor& score, const at::Tensor& mask, const std::optional<at::Tensor>& logp,
                                const std::optional<at::Tensor>& ref_logp, bool use_kl, int64_t kl_estimator,
                                const std::optional<at::Tensor>& dense) {
  TORCH_CHECK(mask.dim() >= 1, "token_rewards: mask must be [..., T]");
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "token_rewards: mask must be bool or uint8, got ", mask.scalar_type());
  TORCH_CHECK(is_float_or_double(score), "token_rewards: expected float32 or float64 score, got ",
              score.scalar_type());
  TORCH_CHECK(score.numel() * mask.size(-1) == mask.numel() || mask.numel() == 0,
              "token_rewards: score must have one value per row of mask");
  check_device("token_rewards", "mask", mask, "score", score);
  TORCH_CHECK(!use_kl || (logp.has_value() && ref_logp.has_value()),
              "token_rewards: kl_coef != 0 needs logp and ref_logp");
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator <= 2, "token_rewards: unknown kl_estimator ", kl_estimator);
  if (use_kl) {
    check_rows("token_rewards", *logp, {*ref_logp}, mask);
    TORCH_CHECK(logp->scalar_type() == score.scalar_type(), "token_rewards: logp must have the dtype of score");
  }
  if (dense) {
    check_rows("token_rewards", *dense, {}, mask);
    TORCH_CHECK(dense->scalar_type() == score.scalar_type(), "token_rewards: dense must have the dtype of score");
  }
}

// logits[..., V] (vocabulary dim contiguous, leading dims any strides) and int64 tokens[...].
inline void check_logprobs_from_logits(const at::Tensor& logits, const at::Tensor& tokens) {
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, "logprobs_from_logits: logits must be [..., V] with V > 0");
  TORCH_CHECK(logits.stride(-1) == 1, "logprobs_from_logits: the vocabulary dim of logits must be contiguous");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.is_contiguous(),
              "logprobs_from_logits: tokens must be contiguous int64");
  check_device("logprobs_from_logits", "tokens", tokens, "logits", logits);
  TORCH_CHECK(tokens.sizes() == logits.sizes().slice(0, logits.dim() - 1),
              "logprobs_from_logits: tokens must have the shape of logits without its last dim");
}

// The logits as the kernels read them: their own strides when the leading dims fit a RowIndex, else a
// contiguous copy (only for more than RowIndex::kMaxDims non-mergeable leading dims).
inline at::Tensor readable_rows(const at::Tensor& logits, RowIndex& rows) {
  if (make_row_index(logits.sizes().data(), logits.strides().data(), logits.dim(), rows)) return logits;
  at::Tensor c = logits.contiguous();
  TORCH_CHECK(make_row_index(c.sizes().data(), c.strides().data(), c.dim(), rows));
  return c;
}

// A per-row tensor the backward of a head reads: contiguous, of the accumulation dtype, one value per
// row, on the device of `like`.
inline void check_per_row(const char* op, const char* name, const at::Tensor& t, at::ScalarType acc, int64_t rows,
                          const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == acc && t.is_contiguous() && t.numel() == rows, op, ": ", name,
              " must be a contiguous ", acc, " tensor with one value per row");
  check_device(op, name, t, "the inputs", like);
}

inline at::ScalarType accumulation_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logprobs_from_logits_bwd(const std::optional<at::Tensor>& grad_logp,
                                           const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                           const at::Tensor& tokens, const at::Tensor& lse,
                                           const at::Tensor& entropy) {
  check_logprobs_from_logits(logits, tokens);
  const char* op = "logprobs_from_logits_bwd";
  const auto acc = accumulation_type(logits);
  const int64_t N = tokens.numel();
  if (grad_logp && grad_logp->defined()) check_per_row(op, "grad_logp", *grad_logp, acc, N, logits);
  if (grad_entropy && grad_entropy->defined()) {
    check_per_row(op, "grad_entropy", *grad_entropy, acc, N, logits);
    check_per_row(op, "entropy", entropy, acc, N, logits);
  }
  check_per_row(op, "lse", lse, acc, N, logits);
}

// The head's options: per-row temperatures (contiguous, accumulation dtype, one per row) and the softcap (>= 0, 0 = none).
inline void check_head_options(const char* op, const std::optional<at::Tensor>& temperatures, double softcap,
                               at::ScalarType acc, int64_t rows, const at::Tensor& like) {
  if (temperatures && temperatures->defined()) check_per_row(op, "temperatures", *temperatures, acc, rows, like);
  TORCH_CHECK(softcap >= 0, op, ": softcap must be >= 0 (0 = none), got ", softcap);
}

// The sampler replay's threshold op: the logits op's inputs and options, top_k int64 [N] and top_p [N] in the
// accumulation dtype (either may be absent), every tensor on the logits' device.
inline void check_replay_threshold(const at::Tensor& logits, const at::Tensor& tokens,
                                   const std::optional<at::Tensor>& temperatures, double softcap,
                                   const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p) {
  const char* op = "logprobs_from_logits_threshold";
  check_logprobs_from_logits(logits, tokens);
  const auto acc = accumulation_type(logits);
  check_head_options(op, temperatures, softcap, acc, tokens.numel(), logits);
  if (top_k && top_k->defined()) {
    TORCH_CHECK(top_k->scalar_type() == at::kLong && top_k->is_contiguous() && top_k->numel() == tokens.numel(), op,
                ": top_k must be a contiguous int64 tensor with one value per row");
    check_device(op, "top_k", *top_k, "logits", logits);
  }
  if (top_p && top_p->defined()) check_per_row(op, "top_p", *top_p, acc, tokens.numel(), logits);
}

// fixed_gemm: a [M, K] and b ([N, K] when trans_b, else [K, N]), one float dtype, contiguous, one device.
inline void check_fixed_gemm(const at::Tensor& a, const at::Tensor& b, bool trans_b) {
  const char* op = "fixed_gemm";
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(is_float_or_double(a), op, ": expected float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b must have a's dtype (", a.scalar_type(), "), got ",
              b.scalar_type());
  TORCH_CHECK(a.size(1) == b.size(trans_b ? 1 : 0), op, ": a [M, K] and b ", trans_b ? "[N, K]" : "[K, N]",
              " must share K, got ", a.sizes(), " and ", b.sizes());
  check_contiguous(op, {a, b});
  check_device(op, "b", b, "a", a);
}

// hidden[N, H] and weight[V, H] of one dtype, contiguous; bias[V] in the accumulation dtype; tokens[N] int64.
inline void check_linear_logprobs(const at::Tensor& hidden, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& tokens) {
  const char* op = "linear_logprobs";
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), op,
              ": expected hidden [N, H] and weight [V, H], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), op, ": hidden and weight dtypes differ");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.numel() == hidden.size(0), op,
              ": expected int64 tokens [N]");
  check_contiguous(op, {hidden, weight, tokens});
  check_device(op, "weight", weight, "hidden", hidden);
  check_device(op, "tokens", tokens, "hidden", hidden);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == accumulation_type(hidden) && bias->numel() == weight.size(0) &&
                    bias->is_contiguous(),
                op, ": expected a contiguous bias [V] in the accumulation dtype");
    check_device(op, "bias", *bias, "hidden", hidden);
  }
}

inline void check_linear_logprobs_bwd(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                      const at::Tensor& hidden, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& tokens,
                                      const at::Tensor& lse, const at::Tensor& entropy, bool need_bias) {
  check_linear_logprobs(hidden, weight, bias, tokens);
  const char* op = "linear_logprobs_bwd";
  TORCH_CHECK(!need_bias || bias, op, ": a bias gradient was asked for without a bias");
  const auto acc = accumulation_type(hidden);
  const int64_t N = hidden.size(0);
  // the upstream gradients are cast and made contiguous by the kernels; lse and entropy are read as they are
  TORCH_CHECK(grad_logp.numel() == N, op, ": grad_logp must have one value per row");
  check_device(op, "grad_logp", grad_logp, "hidden", hidden);
  if (grad_entropy) {
    TORCH_CHECK(grad_entropy->numel() == N, op, ": grad_entropy must have one value per row");
    check_device(op, "grad_entropy", *grad_entropy, "hidden", hidden);
  }
  check_per_row(op, "lse", lse, acc, N, hidden);
  check_per_row(op, "entropy", entropy, acc, N, hidden);
}

// Returns the number of group slots: B / group_size for consecutive groups; B with labels (group_size 0,
// order int64 [B] and offsets int64 [B + 1] from a stable sort of the labels).
inline int64_t check_groups(const at::Tensor& scores, const std::optional<at::Tensor>& order,
                            const std::optional<at::Tensor>& offsets, int64_t group_size) {
  TORCH_CHECK(scores.dim() == 1, "group_advantages: scores must be 1-D, got ", scores.dim(), " dims");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "group_advantages: scores must be float32 or float64, got ", scores.scalar_type());
  const int64_t B = scores.size(0);
  if (group_size != 0) {
    TORCH_CHECK(group_size > 0 && B % group_size == 0, "group_advantages: group_size must be >= 1 and divide ", B,
                ", got ", group_size);
    return B / group_size;
  }
  TORCH_CHECK(order && offsets, "group_advantages: group_size 0 needs order and offsets");
  TORCH_CHECK(order->scalar_type() == at::kLong && order->dim() == 1 && order->size(0) == B,
              "group_advantages: order must be int64 [", B, "]");
  TORCH_CHECK(offsets->scalar_type() == at::kLong && offsets->dim() == 1 && offsets->size(0) == B + 1,
              "group_advantages: offsets must be int64 [", B + 1, "]");
  TORCH_CHECK(order->device() == scores.device() && offsets->device() == scores.device(),
              "group_advantages: order and offsets must be on the scores' device");
  return B;
}

inline void check_rollout_correction(const at::Tensor& old_logp, const at::Tensor& rollout_logp,
                                     const at::Tensor& mask) {
  check_rows("rollout_correction", old_logp, {rollout_logp}, mask);
  TORCH_CHECK(old_logp.dim() == 2, "rollout_correction: expected [R, T] inputs, got ", old_logp.dim(), " dims");
}

}  // namespace rk
