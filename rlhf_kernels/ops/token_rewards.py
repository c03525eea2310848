"""rk.token_rewards: per-token PPO rewards (KL penalty, dense reward, score at the end)."""
from .. import reference
from ._common import KL_CODES, backend_for, choice, float_tensor, mask_tensor, number, same_device, same_shape

IMPLEMENTED = ("reference",)


def token_rewards(score, mask, *, logp=None, ref_logp=None, kl_coef=0.0, kl_estimator="k1", dense=None,
                  dense_coef=1.0, dense_clip=None, score_position="last", backend=None):
    """rewards[..., T]: at valid positions −kl_coef·KL_t + clip(dense_coef·dense_t, ±dense_clip), plus
    `score` at the row's last valid position ("last") or one past it ("eos+1", clamped to the row end);
    0 elsewhere. A row with no valid position gets no reward."""
    float_tensor("score", score)
    if not isinstance(mask, __import__("torch").Tensor) or mask.dim() < 1:
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
    backend_for(backend, device, "token_rewards", IMPLEMENTED)
    return reference.token_rewards(score, mask, logp, ref_logp, kl_coef, kl_estimator, dense, dense_coef,
                                   dense_clip, score_position)
