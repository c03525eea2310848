"""Triton kernel of rk.group_advantages. A program owns ROWS groups as the rows of a [ROWS, BLOCK] tile and
walks their members in column tiles three times (sum, squared deviations, advantages), so each group is
reduced in a fixed order and no atomics are needed. Groups are consecutive blocks of G samples, or (with
labels) the runs order[offsets[k]:offsets[k + 1]] of a stable sort, read through `order`."""
import torch
import triton
import triton.language as tl

from ._launch import Launch, run
from ._scalars import _scalar

TILE = 1024          # elements of a program's tile
MAX_BLOCK = 256      # members per column tile, consecutive groups
LABELLED_BLOCK = 16  # members per column tile with labels: the group sizes are not known on the host


@triton.jit
def _group_advantages_kernel(s_ptr, order_ptr, off_ptr, out_ptr, slots, B, G, eps, LABELLED: tl.constexpr,
                             BASELINE: tl.constexpr, SCALE: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK: tl.constexpr):
    dt = out_ptr.dtype.element_ty
    k = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = k < slots
    if LABELLED:
        # clamped so that malformed offsets can never address outside [0, B)
        start = tl.minimum(tl.maximum(tl.load(off_ptr + k, mask=live, other=0), 0), B)
        end = tl.minimum(tl.maximum(tl.load(off_ptr + k + 1, mask=live, other=0), start), B)
    else:
        start = k * G
        end = tl.where(live, start + G, start)
    n = end - start
    longest = tl.max(n, 0)
    j = tl.arange(0, BLOCK)
    zero = tl.zeros([ROWS, BLOCK], dt)
    total = tl.sum(zero, 1)
    for c in range(0, longest, BLOCK):
        p = start[:, None] + c + j[None, :]
        ok = p < end[:, None]
        i = tl.load(order_ptr + p, mask=ok, other=0) if LABELLED else p
        total += tl.sum(tl.load(s_ptr + i, mask=ok, other=0.0), 1)
    nf = n.to(dt)
    mean = total / tl.maximum(nf, 1.0)
    one = tl.sum(zero, 1) + 1.0
    mult = one
    if SCALE == 0:  # "std": Bessel-corrected, a group of one has σ = 0
        m2 = tl.sum(zero, 1)
        for c in range(0, longest, BLOCK):
            p = start[:, None] + c + j[None, :]
            ok = p < end[:, None]
            i = tl.load(order_ptr + p, mask=ok, other=0) if LABELLED else p
            d = tl.where(ok, tl.load(s_ptr + i, mask=ok, other=0.0) - mean[:, None], zero)
            m2 += tl.sum(d * d, 1)
        mult = one / (tl.sqrt(m2 / tl.maximum(nf - 1.0, 1.0)) + _scalar(eps, dt))
    if BASELINE == 1:  # leave-one-out: r − (S − r)/(n − 1) = (r − μ)·n/(n − 1)
        mult = mult * nf / tl.maximum(nf - 1.0, 1.0)
    shift = mean if BASELINE != 2 else tl.sum(zero, 1)
    if BASELINE != 2:
        mult = tl.where(n > 1, mult, tl.sum(zero, 1))
    for c in range(0, longest, BLOCK):
        p = start[:, None] + c + j[None, :]
        ok = p < end[:, None]
        i = tl.load(order_ptr + p, mask=ok, other=0) if LABELLED else p
        x = tl.load(s_ptr + i, mask=ok, other=0.0)
        tl.store(out_ptr + i, (x - shift[:, None]) * mult[:, None], mask=ok)


def _tile(group_size):
    """(ROWS, BLOCK): consecutive groups get columns for all their members up to MAX_BLOCK."""
    block = LABELLED_BLOCK if group_size == 0 else min(MAX_BLOCK, triton.next_power_of_2(group_size))
    return TILE // block, block


def configs(dtype=None, arch=None):
    """The launch configurations the plan can select."""
    blocks = [1 << i for i in range(MAX_BLOCK.bit_length())]
    return [dict(kernel="_group_advantages_kernel", ROWS=TILE // b, BLOCK=b, num_warps=4) for b in blocks]


def plan_fwd(scores, order, offsets, group_size, baseline, scale, eps, arch=None):
    """([Launch], advantages) for contiguous scores[B]; group_size > 0 for consecutive groups, else
    order[B] and offsets[B + 1] (rlhf_kernels.ops.group_advantages.segments)."""
    out = torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)
    B = scores.shape[0]
    if B == 0:
        return [], out
    labelled = group_size == 0
    slots = B if labelled else B // group_size
    rows, block = _tile(group_size)
    o = order if labelled else scores  # unread without labels
    f = offsets if labelled else scores
    plan = [Launch(_group_advantages_kernel, (triton.cdiv(slots, rows),),
                   (scores, o, f, out, slots, B, group_size, eps),
                   dict(LABELLED=labelled, BASELINE=baseline, SCALE=scale, ROWS=rows, BLOCK=block))]
    return plan, out


def group_advantages(scores, order, offsets, group_size, baseline, scale, eps):
    plan, out = plan_fwd(scores, order, offsets, group_size, baseline, scale, eps)
    run(plan, scores.device)
    return out
