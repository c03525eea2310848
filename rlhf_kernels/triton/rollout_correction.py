"""Triton kernels of rk.rollout_correction. One program per row: at the sequence and geometric levels a
first pass sums the row's masked log-ratios (the ratio needs the whole row before any weight is
written), then one pass writes weights and mask_out and accumulates the row's stats partials. A single
program combines the partials in row order into the stats (no atomics: deterministic)."""
import torch
import triton
import triton.language as tl

from ._launch import Launch, run
from ._scalars import _scalar

MAX_BLOCK = 1024  # tokens per step of a row program
BLOCK_R = 1024    # rows per step of the combine program


@triton.jit
def _rows_kernel(old_ptr, roll_ptr, m_ptr, w_ptr, mo_ptr, sums_ptr, counts_ptr, T, low, high,
                 LEVEL: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    dt = w_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dt)
    lo = _scalar(low, dt)
    hi = _scalar(high, dt)
    row_lr = tl.sum(zero, 0)
    if LEVEL != 0:  # sequence (1), geometric (2): the row's masked sum (mean) of old − rollout
        acc = zero
        cnt = tl.zeros([BLOCK], tl.int32)
        for start in range(0, T, BLOCK):
            t = start + j
            m = tl.load(m_ptr + base + t, mask=t < T, other=0) != 0
            # masked positions are never read: garbage there cannot reach a sum
            d = tl.load(old_ptr + base + t, mask=m, other=0.0) - tl.load(roll_ptr + base + t, mask=m, other=0.0)
            acc += d
            cnt += m.to(tl.int32)
        row_lr = tl.sum(acc, 0)
        if LEVEL == 2:
            row_lr = row_lr / tl.maximum(tl.sum(cnt, 0), 1).to(dt)
    acc_k1 = zero
    acc_k3 = zero
    acc_w = zero
    acc_n = tl.zeros([BLOCK], tl.int32)
    acc_kept = tl.zeros([BLOCK], tl.int32)
    for start in range(0, T, BLOCK):
        t = start + j
        ok = t < T
        m = tl.load(m_ptr + base + t, mask=ok, other=0) != 0
        d = tl.load(old_ptr + base + t, mask=m, other=0.0) - tl.load(roll_ptr + base + t, mask=m, other=0.0)
        ratio = tl.exp(d if LEVEL == 0 else row_lr + zero)
        if MODE == 0:  # truncate
            keep = m
            w = tl.minimum(tl.maximum(ratio, lo), hi)
        else:  # mask
            keep = m & (ratio >= lo) & (ratio <= hi)
            w = ratio
        w = tl.where(keep, w, zero)
        tl.store(w_ptr + base + t, w, mask=ok)
        tl.store(mo_ptr + base + t, keep.to(tl.uint8), mask=ok)
        acc_k1 += d
        acc_k3 += tl.where(m, tl.exp(-d) - 1.0 + d, zero)  # token_kl k3 with log r = rollout − old = −d
        acc_w += w
        acc_n += m.to(tl.int32)
        acc_kept += keep.to(tl.int32)
    tl.store(sums_ptr + row * 3, tl.sum(acc_k1, 0))
    tl.store(sums_ptr + row * 3 + 1, tl.sum(acc_k3, 0))
    tl.store(sums_ptr + row * 3 + 2, tl.sum(acc_w, 0))
    tl.store(counts_ptr + row * 2, tl.sum(acc_n, 0))
    tl.store(counts_ptr + row * 2 + 1, tl.sum(acc_kept, 0))


@triton.jit
def _combine_kernel(sums_ptr, counts_ptr, stats_ptr, R, BLOCK_R: tl.constexpr):
    """Row partials → (k1 mean, k3 mean, masked fraction, weight mean), summed in fp64 in row order."""
    j = tl.arange(0, BLOCK_R)
    k1 = tl.zeros([BLOCK_R], tl.float64)
    k3 = tl.zeros([BLOCK_R], tl.float64)
    w = tl.zeros([BLOCK_R], tl.float64)
    n = tl.zeros([BLOCK_R], tl.int64)
    kept = tl.zeros([BLOCK_R], tl.int64)
    for start in range(0, R, BLOCK_R):
        r = (start + j).to(tl.int64)
        ok = r < R
        k1 += tl.load(sums_ptr + r * 3, mask=ok, other=0.0).to(tl.float64)
        k3 += tl.load(sums_ptr + r * 3 + 1, mask=ok, other=0.0).to(tl.float64)
        w += tl.load(sums_ptr + r * 3 + 2, mask=ok, other=0.0).to(tl.float64)
        n += tl.load(counts_ptr + r * 2, mask=ok, other=0).to(tl.int64)
        kept += tl.load(counts_ptr + r * 2 + 1, mask=ok, other=0).to(tl.int64)
    total = tl.sum(n, 0)
    denom = tl.maximum(total, 1).to(tl.float64)
    tl.store(stats_ptr, (tl.sum(k1, 0) / denom).to(tl.float32))
    tl.store(stats_ptr + 1, (tl.sum(k3, 0) / denom).to(tl.float32))
    tl.store(stats_ptr + 2, ((total - tl.sum(kept, 0)).to(tl.float64) / denom).to(tl.float32))
    tl.store(stats_ptr + 3, (tl.sum(w, 0) / denom).to(tl.float32))


def configs(dtype=None, arch=None):
    """The launch configurations the plan can select: the row tile is T rounded up to a power of two,
    capped at MAX_BLOCK."""
    return ([dict(kernel="_rows_kernel", BLOCK=1 << i, num_warps=4) for i in range(MAX_BLOCK.bit_length())]
            + [dict(kernel="_combine_kernel", BLOCK_R=BLOCK_R, num_warps=4)])


def plan_fwd(old_logp, rollout_logp, mask, level, mode, low, high, arch=None):
    """([Launch], (weights, mask_out, stats)) for contiguous [R, T] inputs (a bool mask)."""
    weights = torch.empty(old_logp.shape, dtype=old_logp.dtype, device=old_logp.device)
    mask_out = torch.empty(mask.shape, dtype=torch.bool, device=mask.device)
    stats = torch.zeros(4, dtype=torch.float32, device=old_logp.device)
    if old_logp.numel() == 0:
        return [], (weights, mask_out, stats)
    R, T = old_logp.shape
    sums = torch.empty(R, 3, dtype=old_logp.dtype, device=old_logp.device)
    counts = torch.empty(R, 2, dtype=torch.int32, device=old_logp.device)
    plan = [Launch(_rows_kernel, (R,), (old_logp, rollout_logp, mask.view(torch.uint8), weights,
                                        mask_out.view(torch.uint8), sums, counts, T, low, high),
                   dict(LEVEL=level, MODE=mode, BLOCK=min(MAX_BLOCK, triton.next_power_of_2(T)))),
            Launch(_combine_kernel, (1,), (sums, counts, stats, R), dict(BLOCK_R=BLOCK_R))]
    return plan, (weights, mask_out, stats)


def rollout_correction(old_logp, rollout_logp, mask, level, mode, low, high):
    plan, out = plan_fwd(old_logp, rollout_logp, mask, level, mode, low, high)
    run(plan, old_logp.device)
    return out
