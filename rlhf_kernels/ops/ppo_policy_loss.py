"""rk.ppo_policy_loss: the PPO clipped surrogate (asymmetric and dual clip), aggregated, with stats.

The kernels make one pass over the tokens (ratio, both branches, the clipped choice, per-row sums,
clipfrac, approx_kl), combine the rows in a fixed order, and return each row's token weight;
backward is one more pass. Gradients match the reference for all three float inputs: logp,
old_logp (−grad_logp) and advantages (computed only when advantages require grad).
"""
import torch

from .. import reference
from ._common import (
    AGG_CODES,
    HAVE_C,
    HAVE_TRITON,
    KL_CODES,
    POLICY_LOSS_CODES,
    RATIO_LEVEL_CODES,
    backend_for,
    choice,
    float_tensor,
    mask_tensor,
    number,
    same_device,
    same_shape,
)

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def rows2d(x, dtype=None):
    """[..., T] -> contiguous [R, T] in `dtype`, touching (and recording autograd nodes for) only what
    must change: the common call passes 2-D contiguous float32 tensors and gets them back as they are."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def check_loss_args(name_first, first, aggregation, **others):
    float_tensor(name_first, first, ndim_min=1)
    for n, t in others.items():
        if n != "mask":
            float_tensor(n, t)
    same_shape(name_first, first, **{n: t for n, t in others.items() if n != "mask"})
    mask = mask_tensor("mask", others["mask"], first.shape)
    choice("aggregation", aggregation, AGG_CODES)
    return mask


def check_denominator(denominator, aggregation, device):
    """None, a number > 0, or a 0-dim tensor on the inputs' device (e.g. an all-reduced token count)."""
    if denominator is None:
        return None
    if aggregation == "token-sum":
        raise ValueError("denominator does not apply to aggregation='token-sum' (it has no divisor)")
    if isinstance(denominator, torch.Tensor):
        if denominator.dim() != 0 or denominator.dtype.is_complex or denominator.dtype == torch.bool:
            raise TypeError(f"denominator must be a number or a 0-dim real tensor, got a {denominator.dtype} "
                            f"tensor of shape {tuple(denominator.shape)}")
        if denominator.device != device:
            raise ValueError(f"denominator is on {denominator.device} but logp is on {device}")
        return denominator.detach()
    return number("denominator", denominator, positive=True)


def ppo_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    aggregation="token-mean", ratio_level="token", loss_type="ppo", weights=None, ref_logp=None,
                    kl_coef=0.0, kl_estimator="k3", denominator=None, backend=None):
    """(loss, stats): the clipped policy-gradient surrogate of PPO and its GRPO-family variants, aggregated.

    Inputs are [..., T]; `advantages` is [..., T] or one per row ([...]), broadcast over the row's tokens.
    ρ_t = exp(logp_t − old_logp_t) (ratio_level="token"), or with ratio_level="sequence" (GSPO) the row's
    s = exp(Σ_t m_t·(logp_t − old_logp_t) / Σ_t m_t) on every valid token of the row (gradient through s).
      loss_type="ppo":   ℓ_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − clip_low, 1 + clip_high)); with dual_clip = c > 1,
                         ℓ_t = min(ℓ_t, −c·A_t) where A_t < 0.
      loss_type="cispo": ℓ_t = −sg(min(ρ_t, 1 + clip_high))·A_t·logp_t (clip_low unused; dual_clip an error).
    clip_high=None means clip_high = clip_low. Then ℓ_t ← w_t·ℓ_t with the detached `weights` (e.g.
    rk.rollout_correction's), and ℓ_t ← ℓ_t + kl_coef·KL_t(logp, ref_logp) with rk.token_kl's `kl_estimator`
    (ref_logp is a constant; the KL term is not weighted). Aggregation over the valid tokens as in the
    aggregation names; `denominator` (a number > 0 or a 0-dim tensor) replaces the divisor — Σ mask for
    "token-mean", the number of rows with a valid token for "seq-mean-*" — so that micro-batch losses summed
    with the global count as denominator equal the full-batch loss.

    stats (detached float32 masked means over valid tokens, 0 when none): clipfrac (ppo: the clipped branch
    was taken; cispo: ρ was truncated), approx_kl = mean ½(logp − old_logp)², ratio_mean and ratio_max (of
    the ρ the surrogate used), kl (mean KL_t, when ref_logp is given), weight_mean (when weights are given).
    Gradients: logp, old_logp and advantages (weights and ref_logp get none)."""
    float_tensor("logp", logp, ndim_min=1)
    float_tensor("old_logp", old_logp)
    float_tensor("advantages", advantages)
    same_shape("logp", logp, old_logp=old_logp)
    if tuple(advantages.shape) not in (tuple(logp.shape), tuple(logp.shape[:-1])):
        raise ValueError(f"advantages must have the shape of logp {tuple(logp.shape)} or one per row "
                         f"{tuple(logp.shape[:-1])}, got {tuple(advantages.shape)}")
    mask = mask_tensor("mask", mask, logp.shape)
    choice("aggregation", aggregation, AGG_CODES)
    choice("ratio_level", ratio_level, RATIO_LEVEL_CODES)
    choice("loss_type", loss_type, POLICY_LOSS_CODES)
    choice("kl_estimator", kl_estimator, KL_CODES)
    for n, t in (("weights", weights), ("ref_logp", ref_logp)):
        if t is not None:
            float_tensor(n, t)
            same_shape("logp", logp, **{n: t})
    device = same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, weights=weights,
                         ref_logp=ref_logp)
    clip_low = number("clip_low", clip_low, nonneg=True)
    clip_high = number("clip_high", clip_high, nonneg=True, optional=True)
    dual_clip = number("dual_clip", dual_clip, optional=True)
    if dual_clip is not None and loss_type == "cispo":
        raise ValueError("dual_clip does not apply to loss_type='cispo' (its ratio is a truncated constant weight)")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (commonly 3), got {dual_clip}")
    kl_coef = number("kl_coef", kl_coef)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp (the reference policy's log-probs)")
    denominator = check_denominator(denominator, aggregation, device)
    name = backend_for(backend, device, "ppo_policy_loss", IMPLEMENTED)
    if name == "reference":
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                                         aggregation, ratio_level, loss_type, weights, ref_logp, kl_coef,
                                         kl_estimator, denominator)
    clip_high = clip_low if clip_high is None else clip_high
    dual_clip = 0.0 if dual_clip is None else dual_clip
    dt = reference.compute_dtype(logp, old_logp, advantages, weights, ref_logp)
    adv = rows2d(advantages, dt) if advantages.shape == logp.shape else advantages.reshape(-1).to(dt).contiguous()
    # weights and ref_logp are constants of the loss: detached, so autograd neither saves nor expects their graph
    w = None if weights is None else rows2d(weights.detach(), dt)
    ref = None if ref_logp is None else rows2d(ref_logp.detach(), dt)
    den_is_tensor = isinstance(denominator, torch.Tensor)
    den = 0.0 if denominator is None else 1.0 if den_is_tensor else denominator
    op = (torch.ops.rlhf_kernels.ppo_policy_loss_fwd_triton if name == "triton"
          else torch.ops.rlhf_kernels.ppo_policy_loss_fwd)
    loss, stats, _ = op(
        rows2d(logp, dt), rows2d(old_logp, dt), adv, rows2d(mask), w, ref, clip_low, clip_high, dual_clip,
        AGG_CODES[aggregation], RATIO_LEVEL_CODES[ratio_level], POLICY_LOSS_CODES[loss_type], kl_coef,
        KL_CODES[kl_estimator], den)
    if den_is_tensor:  # a device tensor (e.g. an all-reduced count) divides here: no host sync for its value
        loss = loss / denominator.to(loss.dtype)
    return loss, _stats(stats.unbind(0), weights is not None, ref_logp is not None)


STATS = ("clipfrac", "approx_kl", "ratio_mean", "ratio_max", "kl", "weight_mean")  # the kernels' stats, in order


def _stats(values, has_weights, has_ref):
    return {k: v for k, v in zip(STATS, values)
            if (k != "kl" or has_ref) and (k != "weight_mean" or has_weights)}


def _fake_fwd(logp, old, adv, mask, weights, ref, clip_low, clip_high, dual_clip, aggregation, ratio_level,
              loss_type, kl_coef, kl_estimator, denominator):
    return logp.new_empty(()), logp.new_empty((len(STATS),), dtype=torch.float32), logp.new_empty(logp.shape[:1])


def _fake_bwd(grad_loss, logp, old, adv, mask, weights, ref, row_weight, clip_low, clip_high, dual_clip, ratio_level,
              loss_type, kl_coef, kl_estimator, need_old_grad, need_adv_grad):
    return (torch.empty_like(logp), torch.empty_like(logp) if need_old_grad else logp.new_empty((0,)),
            torch.empty_like(adv) if need_adv_grad else adv.new_empty((0,)))


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::ppo_policy_loss_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::ppo_policy_loss_bwd")(_fake_bwd)
    # autograd of the C++ op is registered in C++ (csrc/autograd.cpp): far less per-call overhead

if HAVE_TRITON:
    from ..triton import ppo_policy_loss as _tk

    @torch.library.triton_op("rlhf_kernels::ppo_policy_loss_fwd_triton", mutates_args=())
    def _fwd_triton(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    weights: torch.Tensor | None, ref_logp: torch.Tensor | None, clip_low: float, clip_high: float,
                    dual_clip: float, aggregation: int, ratio_level: int, loss_type: int, kl_coef: float,
                    kl_estimator: int, denominator: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.ppo_policy_loss_fwd(logp, old_logp, advantages, mask, weights, ref_logp, clip_low, clip_high,
                                       dual_clip, aggregation, ratio_level, loss_type, kl_coef, kl_estimator,
                                       denominator)

    @torch.library.triton_op("rlhf_kernels::ppo_policy_loss_bwd_triton", mutates_args=())
    def _bwd_triton(grad_loss: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, weights: torch.Tensor | None, ref_logp: torch.Tensor | None,
                    row_weight: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float, ratio_level: int,
                    loss_type: int, kl_coef: float, kl_estimator: int, need_old_grad: bool,
                    need_adv_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.ppo_policy_loss_bwd(grad_loss, logp, old_logp, advantages, mask, weights, ref_logp, row_weight,
                                       clip_low, clip_high, dual_clip, ratio_level, loss_type, kl_coef, kl_estimator,
                                       need_old_grad, need_adv_grad)

    def _setup_context(ctx, inputs, output):
        logp, old, adv, mask, weights, ref, clip_low, clip_high, dual_clip, _, level, loss_type, kl_coef, est, _ = inputs
        ctx.save_for_backward(logp, old, adv, mask, weights, ref, output[2])
        ctx.scalars = (clip_low, clip_high, dual_clip, level, loss_type, kl_coef, est)
        ctx.mark_non_differentiable(*output[1:])

    def _backward(ctx, grad_loss, *_stats):
        logp, old, adv, mask, weights, ref, row_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_logp, g_old, g_adv = torch.ops.rlhf_kernels.ppo_policy_loss_bwd_triton(
            grad_loss, logp, old, adv, mask, weights, ref, row_weight, *ctx.scalars, need[1], need[2])
        return (g_logp if need[0] else None, g_old if need[1] else None, g_adv if need[2] else None) + (None,) * 12

    _fwd_triton.register_fake(_fake_fwd)
    _bwd_triton.register_fake(_fake_bwd)
    _fwd_triton.register_autograd(_backward, setup_context=_setup_context)
