"""rk.ppo_policy_loss: the PPO clipped surrogate (asymmetric and dual clip), aggregated, with stats."""
from .. import reference
from ._common import AGG_CODES, backend_for, choice, float_tensor, mask_tensor, number, same_device, same_shape

IMPLEMENTED = ("reference",)


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
    backend_for(backend, device, "ppo_policy_loss", IMPLEMENTED)
    return reference.ppo_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, aggregation)
