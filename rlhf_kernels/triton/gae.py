"""Triton kernel of rk.gae: one program per row, an associative scan of affine maps per tile.

Each position maps the state (A, V) of the next valid position to its own (csrc/common.h GaeMap):
valid t: A ← (r_t − v_t) + γλ·A + γ·V, V ← v_t; valid and done t: A ← r_t − v_t, V ← v_t (the
episode boundary forgets the state after it); masked t: identity. Compositions keep the form
A ← α·A + β·V + p, V ← κ·V + q, so a tile is one scan of 5-tuples, and the state carried from the
tiles after it enters through α, β, κ. Tiles are walked from the row end backwards.

The tile is loaded in reversed position order and scanned forward instead of using
`associative_scan(reverse=True)`: reverse scans with a non-commutative combine have had open
correctness reports on GPU (triton-lang/triton#4362), and the forward scan has one unambiguous
argument order that the interpreter and the GPU compiler share.
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute, powers_of_two
from ._scalars import _scalar

MAX_BLOCK = 1024


@triton.jit
def _then(a1, b1, p1, k1, q1, a2, b2, p2, k2, q2):
    # (1): the later positions already scanned; (2): the next earlier one. Apply (1), then (2).
    return a2 * a1, a2 * b1 + b2 * k1, a2 * p1 + b2 * q1 + p2, k2 * k1, k2 * q1 + q2


@triton.jit
def _gae_kernel(r_ptr, v_ptr, m_ptr, d_ptr, adv_ptr, ret_ptr, T, gamma, lam, DONES: tl.constexpr,
                BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * T
    dt = r_ptr.dtype.element_ty
    g = _scalar(gamma, dt)
    c = g * _scalar(lam, dt)  # γλ in the data's precision
    j = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dt)
    one = zero + 1.0
    carry_a = tl.sum(zero, 0)  # A and V of the first valid position after the current tile
    carry_v = tl.sum(zero, 0)
    for start in range(0, T, BLOCK):
        t = T - 1 - start - j  # positions of this tile, from its end backwards
        ok = t >= 0
        r = tl.load(r_ptr + base + t, mask=ok, other=0.0)
        v = tl.load(v_ptr + base + t, mask=ok, other=0.0)
        m = tl.load(m_ptr + base + t, mask=ok, other=0) != 0
        gt, ct = g + zero, c + zero  # γ and γλ of each position, 0 where an episode ends
        if DONES:
            done = tl.load(d_ptr + base + t, mask=ok, other=0) != 0
            gt, ct = tl.where(done, zero, gt), tl.where(done, zero, ct)
        alpha, beta, p, kappa, q = tl.associative_scan(
            (tl.where(m, ct, one), tl.where(m, gt, zero), tl.where(m, r - v, zero),
             tl.where(m, zero, one), tl.where(m, v, zero)), 0, _then)
        a = alpha * carry_a + beta * carry_v + p
        tl.store(adv_ptr + base + t, tl.where(m, a, zero), mask=ok)
        tl.store(ret_ptr + base + t, tl.where(m, a + v, zero), mask=ok)
        first = j == BLOCK - 1  # the tile's earliest position: its composite is the whole tile's
        carry_v = tl.sum(tl.where(first, kappa, zero), 0) * carry_v + tl.sum(tl.where(first, q, zero), 0)
        carry_a = tl.sum(tl.where(first, a, zero), 0)


def configs(dtype=None, arch=None):
    """The launch configurations the plan can select: the tile is the row length rounded up to a power of two,
    capped at MAX_BLOCK."""
    return [dict(kernel="_gae_kernel", BLOCK=b, num_warps=4) for b in powers_of_two(MAX_BLOCK)]


def plan_fwd(rewards, values, mask, dones, gamma, lam, arch=None):
    """([Launch], (advantages, returns)) for contiguous [..., T] inputs (bool masks)."""
    adv = torch.empty(rewards.shape, dtype=rewards.dtype, device=rewards.device)
    ret = torch.empty_like(adv)
    if rewards.numel() == 0:
        return [], (adv, ret)
    T = rewards.shape[-1]
    R = rewards.numel() // T
    m = mask.view(torch.uint8)
    d = m if dones is None else dones.view(torch.uint8)  # unread without dones
    plan = [Launch(_gae_kernel, (R,), (rewards, values, m, d, adv, ret, T, gamma, lam),
                   dict(DONES=dones is not None, BLOCK=min(MAX_BLOCK, triton.next_power_of_2(T))))]
    return plan, (adv, ret)


def gae(rewards, values, mask, dones, gamma, lam):
    return execute(plan_fwd(rewards, values, mask, dones, gamma, lam), rewards.device)
