"""rk.token_rewards: per-token PPO rewards (KL penalty, dense reward, score at the end)."""
import torch

from .. import reference
from ._common import (
    HAVE_C,
    HAVE_TRITON,
    KL_CODES,
    backend_for,
    choice,
    float_tensor,
    mask_tensor,
    number,
    same_device,
    same_shape,
)
from ._nograd import raise_on_backward

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def token_rewards(score, mask, *, logp=None, ref_logp=None, kl_coef=0.0, kl_estimator="k1", dense=None,
                  dense_coef=1.0, dense_clip=None, score_position="last", backend=None):
    """rewards[..., T]: at valid positions −kl_coef·KL_t + clip(dense_coef·dense_t, ±dense_clip), plus
    `score` at the row's last valid position ("last") or one past it ("eos+1", clamped to the row end);
    0 elsewhere. A row with no valid position gets no reward. Float32 (float64 if any input is).

    Not differentiable: on the cpu, cuda and triton backends backpropagating into the result raises
    (the reference backend is plain torch and lets gradients through)."""
    float_tensor("score", score)
    if not isinstance(mask, torch.Tensor) or mask.dim() < 1:
        raise ValueError("mask must be a tensor [..., T] with at least one dimension")
    if tuple(score.shape) != tuple(mask.shape[:-1]):
        raise ValueError(f"score must have shape {tuple(mask.shape[:-1])} (mask without its last dim), "
                         f"got {tuple(score.shape)}")
    mask = mask_tensor("mask", mask, mask.shape)
    kl_coef = number("kl_coef", kl_coef)
    choice("kl_estimator", kl_estimator, KL_CODES)
    if kl_coef != 0.0 and (logp is None or ref_logp is None):
        raise ValueError("kl_coef != 0 needs both logp and ref_logp")
    for name, t in (("logp", logp), ("ref_logp", ref_logp), ("dense", dense)):
        if t is not None:
            float_tensor(name, t)
    same_shape("mask", mask, logp=logp, ref_logp=ref_logp, dense=dense)
    device = same_device(score=score, mask=mask, logp=logp, ref_logp=ref_logp, dense=dense)
    dense_coef = number("dense_coef", dense_coef)
    dense_clip = number("dense_clip", dense_clip, positive=True, optional=True)
    choice("score_position", score_position, reference.SCORE_POSITIONS)
    name = backend_for(backend, device, "token_rewards", IMPLEMENTED)
    if name == "reference":
        return reference.token_rewards(score, mask, logp, ref_logp, kl_coef, kl_estimator, dense, dense_coef,
                                       dense_clip, score_position)
    dt = reference.compute_dtype(score, logp, ref_logp, dense)

    def prep(t):
        return None if t is None else t.to(dt).contiguous()

    if kl_coef == 0.0:  # the reference ignores logp/ref_logp then (even non-finite ones)
        logp = ref_logp = None
    op = torch.ops.rlhf_kernels.token_rewards_triton if name == "triton" else torch.ops.rlhf_kernels.token_rewards
    return op(prep(score), mask.contiguous(), prep(logp), prep(ref_logp), kl_coef, KL_CODES[kl_estimator],
              prep(dense), dense_coef, 0.0 if dense_clip is None else dense_clip, score_position == "eos+1")


def _fake(score, mask, logp, ref_logp, kl_coef, kl_estimator, dense, dense_coef, dense_clip, score_after_eos):
    return score.new_empty(mask.shape)


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::token_rewards")(_fake)
    raise_on_backward("rlhf_kernels::token_rewards", "token_rewards")

if HAVE_TRITON:
    from ..triton import token_rewards as _tr

    @torch.library.triton_op("rlhf_kernels::token_rewards_triton", mutates_args=())
    def _token_rewards_triton(score: torch.Tensor, mask: torch.Tensor, logp: torch.Tensor | None,
                              ref_logp: torch.Tensor | None, kl_coef: float, kl_estimator: int,
                              dense: torch.Tensor | None, dense_coef: float, dense_clip: float,
                              score_after_eos: bool) -> torch.Tensor:
        return _tr.token_rewards(score, mask, logp, ref_logp, kl_coef, kl_estimator, dense, dense_coef, dense_clip,
                                 score_after_eos)

    _token_rewards_triton.register_fake(_fake)
    raise_on_backward(_token_rewards_triton, "token_rewards")
