"""Triton kernel of rk.token_rewards: one program per row; a first sweep over the row's mask finds
its last valid position, a second writes the rewards."""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute, powers_of_two
from ._scalars import _scalar
from .token_kl import _kl

MAX_BLOCK = 2048


@triton.jit
def _token_rewards_kernel(score_ptr, m_ptr, logp_ptr, ref_ptr, dense_ptr, out_ptr, T, kl_coef, dense_coef,
                          dense_clip, EST: tl.constexpr, DENSE: tl.constexpr, AFTER_EOS: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    j = tl.arange(0, BLOCK)
    last = tl.max(tl.full([BLOCK], -1, tl.int32), 0)
    for start in range(0, T, BLOCK):
        t = start + j
        m = tl.load(m_ptr + base + t, mask=t < T, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(m, t, -1), 0))
    pos = last  # −1 for a row with no valid position: matches nothing
    if AFTER_EOS:
        pos = tl.where(last < 0, -1, tl.minimum(last + 1, T - 1))
    dt = out_ptr.dtype.element_ty
    score = tl.load(score_ptr + row)
    kc = _scalar(kl_coef, dt)
    dc = _scalar(dense_coef, dt)
    clip = _scalar(dense_clip, dt)
    for start in range(0, T, BLOCK):
        t = start + j
        ok = t < T
        m = tl.load(m_ptr + base + t, mask=ok, other=0) != 0
        val = tl.zeros([BLOCK], dt)
        if EST >= 0:
            d = tl.load(logp_ptr + base + t, mask=ok, other=0.0) - tl.load(ref_ptr + base + t, mask=ok, other=0.0)
            val = -(kc * _kl(d, EST))
        if DENSE:
            x = dc * tl.load(dense_ptr + base + t, mask=ok, other=0.0)
            if dense_clip > 0:
                x = tl.minimum(tl.maximum(x, -clip), clip)
            val = val + x
        out = tl.where(m, val, 0.0) + tl.where(t == pos, score, 0.0)
        tl.store(out_ptr + base + t, out.to(dt), mask=ok)


def configs(dtype=None, arch=None):
    """The launch configurations the plan can select: the tile is the row length rounded up to a power of two,
    capped at MAX_BLOCK."""
    return [dict(kernel="_token_rewards_kernel", BLOCK=b, num_warps=4) for b in powers_of_two(MAX_BLOCK)]


def plan_fwd(score, mask, logp, ref_logp, kl_coef, kl_estimator, dense, dense_coef, dense_clip, score_after_eos,
             arch=None):
    """([Launch], rewards) for a contiguous [..., T] bool mask and same-shaped float inputs."""
    out = torch.empty(mask.shape, dtype=score.dtype, device=mask.device)
    if mask.numel() == 0:
        return [], out
    T = mask.shape[-1]
    R = mask.numel() // T
    est = kl_estimator if kl_coef != 0.0 else -1
    # absent inputs are never read (EST/DENSE); any pointer of the right dtype stands in
    args = (score, mask.view(torch.uint8), logp if est >= 0 else out, ref_logp if est >= 0 else out,
            dense if dense is not None else out, out, T, kl_coef, dense_coef, dense_clip)
    plan = [Launch(_token_rewards_kernel, (R,), args,
                   dict(EST=est, DENSE=dense is not None, AFTER_EOS=bool(score_after_eos),
                        BLOCK=min(MAX_BLOCK, triton.next_power_of_2(T))))]
    return plan, out


def token_rewards(score, mask, logp, ref_logp, kl_coef, kl_estimator, dense, dense_coef, dense_clip,
                  score_after_eos):
    return execute(plan_fwd(score, mask, logp, ref_logp, kl_coef, kl_estimator, dense, dense_coef, dense_clip,
                            score_after_eos), mask.device)
