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


def ppo_policy_loss(logp, old_logp, advantages, mask, *, clip_low=0.2, clip_high=None, dual_clip=None,
                    aggregation="token-mean", backend=None):
    """(loss, {"clipfrac", "approx_kl"}): ρ = exp(logp − old_logp),
    ℓ = max(−Aρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)), with dual_clip = c > 1: ℓ = min(ℓ, −cA) where A < 0."""
    mask = check_loss_args("logp", logp, aggregation, old_logp=old_logp, advantages=advantages, mask=mask)
    device = same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    clip_low = number("clip_low", clip_low, nonneg=True)
    clip_high = number("clip_high", clip_high, nonneg=True, optional=True)
    dual_clip = number("dual_clip", dual_clip, optional=True)
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (commonly 3), got {dual_clip}")
    name = backend_for(backend, device, "ppo_policy_loss", IMPLEMENTED)
    if name == "reference":
        return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip,
                                         aggregation)
    dt = reference.compute_dtype(logp, old_logp, advantages)
    op = (torch.ops.rlhf_kernels.ppo_policy_loss_fwd_triton if name == "triton"
          else torch.ops.rlhf_kernels.ppo_policy_loss_fwd)
    loss, clipfrac, approx_kl, _ = op(rows2d(logp, dt), rows2d(old_logp, dt), rows2d(advantages, dt), rows2d(mask),
                                      clip_low, clip_low if clip_high is None else clip_high,
                                      0.0 if dual_clip is None else dual_clip, AGG_CODES[aggregation])
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def _fake_fwd(logp, old, adv, mask, clip_low, clip_high, dual_clip, aggregation):
    scalar = logp.new_empty(())
    return scalar, scalar.new_empty((), dtype=torch.float32), scalar.new_empty((), dtype=torch.float32), \
        logp.new_empty(logp.shape[:1])


def _fake_bwd(grad_loss, logp, old, adv, mask, row_weight, clip_low, clip_high, dual_clip, need_adv_grad):
    return torch.empty_like(logp), torch.empty_like(adv) if need_adv_grad else adv.new_empty((0,))


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::ppo_policy_loss_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::ppo_policy_loss_bwd")(_fake_bwd)
    # autograd of the C++ op is registered in C++ (csrc/cpu/ppo_policy_loss.cpp): far less per-call overhead

if HAVE_TRITON:
    from ..triton import ppo_policy_loss as _tk

    @torch.library.triton_op("rlhf_kernels::ppo_policy_loss_fwd_triton", mutates_args=())
    def _fwd_triton(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_low: float, clip_high: float, dual_clip: float,
                    aggregation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.ppo_policy_loss_fwd(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, aggregation)

    @torch.library.triton_op("rlhf_kernels::ppo_policy_loss_bwd_triton", mutates_args=())
    def _bwd_triton(grad_loss: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, row_weight: torch.Tensor, clip_low: float, clip_high: float,
                    dual_clip: float, need_adv_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.ppo_policy_loss_bwd(grad_loss, logp, old_logp, advantages, mask, row_weight, clip_low, clip_high,
                                       dual_clip, need_adv_grad)

    def _setup_context(ctx, inputs, output):
        logp, old, adv, mask, clip_low, clip_high, dual_clip, _ = inputs
        ctx.save_for_backward(logp, old, adv, mask, output[3])
        ctx.clips = (clip_low, clip_high, dual_clip)
        ctx.mark_non_differentiable(*output[1:])

    def _backward(ctx, grad_loss, *_stats):
        logp, old, adv, mask, row_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_logp, g_adv = torch.ops.rlhf_kernels.ppo_policy_loss_bwd_triton(grad_loss, logp, old, adv, mask, row_weight,
                                                                         *ctx.clips, need[2])
        return (g_logp if need[0] else None, -g_logp if need[1] else None, g_adv if need[2] else None,
                None, None, None, None, None)

    _fwd_triton.register_fake(_fake_fwd)
    _bwd_triton.register_fake(_fake_bwd)
    _fwd_triton.register_autograd(_backward, setup_context=_setup_context)
