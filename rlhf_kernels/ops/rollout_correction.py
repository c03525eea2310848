"""rk.rollout_correction: importance weights for the mismatch between the sampler and the trainer."""

import torch

from .. import reference
from ._common import (
    HAVE_C,
    HAVE_TRITON,
    RC_LEVEL_CODES,
    RC_MODE_CODES,
    backend_for,
    choice,
    float_tensor,
    mask_tensor,
    number,
    rows,
    same_device,
    same_shape,
)

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())
STATS = ("mismatch_k1", "mismatch_k3", "masked_fraction", "weight_mean")  # the kernels' stats, in order


def rollout_correction(old_logp, rollout_logp, mask, *, level="token", mode="truncate", low=None, high=2.0,
                       backend=None):
    """(weights, mask_out, stats) correcting for the sampler (rollout_logp, e.g. vLLM in bf16) and the
    trainer (old_logp, the same policy recomputed by the trainer) disagreeing. Inputs are [..., T].

    ρ = exp(old_logp − rollout_logp) per token (level="token"), or one ρ per row broadcast over its valid
    tokens: exp of the row's masked sum, the sequence's probability ratio (level="sequence"), or exp of
    its masked mean, the geometric mean of the token ratios (level="geometric").
      mode="truncate" (TIS): weights = min(ρ, high), and ≥ low when low is given; mask_out = mask.
      mode="mask" (MIS, IcePop): weights = ρ where low ≤ ρ ≤ high else 0, mask_out = mask ∧ (low ≤ ρ ≤ high)
      (whole rows at the sequence and geometric levels).
    low=None is no lower bound (the same as low=0, since ρ > 0); high=None is no upper bound.
    Masked positions get weight 0 and mask_out False. The weights carry no gradient (inputs are detached).
    Weights are float32 (float64 for float64 inputs), mask_out is bool.

    stats (detached float32 scalars, masked means over the valid tokens of `mask`): mismatch_k1 = mean of
    old − rollout, mismatch_k3 = mean of exp(rollout − old) − 1 − (rollout − old) (rk.token_kl's k1 and k3
    with logp = old_logp, ref_logp = rollout_logp), masked_fraction = share of valid tokens that mask_out
    drops, weight_mean = mean weight. All 0 when no token is valid. Deterministic (fixed-order reductions)."""
    float_tensor("old_logp", old_logp, ndim_min=1)
    float_tensor("rollout_logp", rollout_logp)
    same_shape("old_logp", old_logp, rollout_logp=rollout_logp)
    mask = mask_tensor("mask", mask, old_logp.shape)
    device = same_device(old_logp=old_logp, rollout_logp=rollout_logp, mask=mask)
    choice("level", level, RC_LEVEL_CODES)
    choice("mode", mode, RC_MODE_CODES)
    low = number("low", low, nonneg=True, optional=True)
    high = number("high", high, positive=True, optional=True)
    if low is not None and high is not None and low > high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")
    name = backend_for(backend, device, "rollout_correction", IMPLEMENTED)
    old_logp, rollout_logp = old_logp.detach(), rollout_logp.detach()
    if name == "reference":
        return reference.rollout_correction(old_logp, rollout_logp, mask, level, mode, low, high)
    dt = reference.compute_dtype(old_logp, rollout_logp)
    op = (torch.ops.rlhf_kernels.rollout_correction_triton if name == "triton"
          else torch.ops.rlhf_kernels.rollout_correction)
    weights, mask_out, stats = op(rows(old_logp, dt), rows(rollout_logp, dt), rows(mask), RC_LEVEL_CODES[level],
                                  RC_MODE_CODES[mode], 0.0 if low is None else low,
                                  float("inf") if high is None else high)
    return weights.view(mask.shape), mask_out.view(mask.shape), dict(zip(STATS, stats.unbind(0)))


def _fake(old_logp, rollout_logp, mask, level, mode, low, high):
    return (old_logp.new_empty(old_logp.shape), mask.new_empty(mask.shape, dtype=torch.bool),
            old_logp.new_empty((len(STATS),), dtype=torch.float32))


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::rollout_correction")(_fake)

if HAVE_TRITON:
    from ..triton import rollout_correction as _tr

    @torch.library.triton_op("rlhf_kernels::rollout_correction_triton", mutates_args=())
    def _rollout_correction_triton(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, level: int,
                                   mode: int, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
        return _tr.rollout_correction(old_logp, rollout_logp, mask, level, mode, low, high)

    _rollout_correction_triton.register_fake(_fake)
