"""Triton kernels of rk.ppo_policy_loss.

Forward: one program per row accumulates the row's loss sum, ½(logp − old)² sum, valid and clipped
counts; one single-program kernel then combines the rows in a fixed order into the loss, the stats and
the per-row token weight (no atomics, so the result does not depend on scheduling). Backward: one
elementwise pass, grad·row_weight·∂ℓ/∂logp at valid positions.
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute

BLOCK = 1024      # tokens per step of a row program
BLOCK_R = 1024    # rows per step of the combine program


@triton.jit
def _policy_token(lp, ol, a, clip_low, clip_high, dual_clip):
    # the same selects as csrc/common.h ppo_policy_token_ratio
    ratio = tl.exp(lp - ol)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    cr = tl.minimum(tl.maximum(ratio, lo), hi)
    l1 = -a * ratio
    l2 = -a * cr
    clipped = l2 > l1
    inside = (ratio >= lo) & (ratio <= hi)
    loss = tl.where(clipped, l2, l1)
    dloss = tl.where(clipped & (~inside), 0.0, -a * ratio)
    dadv = tl.where(clipped, -cr, -ratio)
    cap = -dual_clip * a
    dual = (dual_clip > 0) & (a < 0) & (loss > cap)
    loss = tl.where(dual, cap, loss)
    dloss = tl.where(dual, 0.0, dloss)
    dadv = tl.where(dual, -dual_clip, dadv)
    return loss, dloss, dadv, clipped


@triton.jit
def _fwd_rows_kernel(lp_ptr, ol_ptr, a_ptr, m_ptr, sum_ptr, kl_ptr, n_ptr, nc_ptr, L, clip_low, clip_high, dual_clip,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * L
    acc_s = tl.zeros([BLOCK], dtype=lp_ptr.dtype.element_ty)
    acc_k = tl.zeros([BLOCK], dtype=lp_ptr.dtype.element_ty)
    acc_n = tl.zeros([BLOCK], dtype=tl.int32)
    acc_c = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(m_ptr + base + offs, mask=offs < L, other=0) != 0
        # masked positions are never read, so garbage there cannot reach the sums
        lp = tl.load(lp_ptr + base + offs, mask=v, other=0.0)
        ol = tl.load(ol_ptr + base + offs, mask=v, other=0.0)
        a = tl.load(a_ptr + base + offs, mask=v, other=0.0)
        loss, _, _, clipped = _policy_token(lp, ol, a, clip_low, clip_high, dual_clip)
        d = lp - ol
        acc_s += tl.where(v, loss, 0.0)
        acc_k += tl.where(v, 0.5 * d * d, 0.0)
        acc_n += v.to(tl.int32)
        acc_c += (v & clipped).to(tl.int32)
    tl.store(sum_ptr + row, tl.sum(acc_s, axis=0))
    tl.store(kl_ptr + row, tl.sum(acc_k, axis=0))
    tl.store(n_ptr + row, tl.sum(acc_n, axis=0))
    tl.store(nc_ptr + row, tl.sum(acc_c, axis=0))


@triton.jit
def _combine_kernel(sum_ptr, n_ptr, w_ptr, loss_ptr, R, agg: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row sums → loss and per-row weights (csrc/common.h aggregation_weight), in a fixed order."""
    acc_tok = tl.zeros([BLOCK_R], dtype=tl.int64)
    acc_rows = tl.zeros([BLOCK_R], dtype=tl.int64)
    for start in range(0, R, BLOCK_R):
        offs = start + tl.arange(0, BLOCK_R)
        n = tl.load(n_ptr + offs, mask=offs < R, other=0).to(tl.int64)
        acc_tok += n
        acc_rows += (n > 0).to(tl.int64)
    tokens = tl.sum(acc_tok, axis=0).to(sum_ptr.dtype.element_ty)
    rows = tl.sum(acc_rows, axis=0).to(sum_ptr.dtype.element_ty)
    acc = tl.zeros([BLOCK_R], dtype=sum_ptr.dtype.element_ty)
    for start in range(0, R, BLOCK_R):
        offs = start + tl.arange(0, BLOCK_R)
        ok = offs < R
        n = tl.load(n_ptr + offs, mask=ok, other=0).to(sum_ptr.dtype.element_ty)
        s = tl.load(sum_ptr + offs, mask=ok, other=0.0)
        # denominators floored at 1 only matter for rows without valid tokens, which then weigh 0
        if agg == 0:
            w = 1.0 / (tl.zeros_like(n) + tl.maximum(tokens, 1.0))
        elif agg == 1:
            w = 1.0 / (tl.maximum(n, 1.0) * tl.maximum(rows, 1.0))
        elif agg == 2:
            w = 1.0 / (tl.zeros_like(n) + tl.maximum(rows, 1.0))
        else:
            w = tl.zeros_like(n) + 1.0
        w = tl.where(n > 0, w, 0.0)
        tl.store(w_ptr + offs, w, mask=ok)
        acc += tl.where(ok, w * s, 0.0)
    tl.store(loss_ptr, tl.sum(acc, axis=0))


@triton.jit
def _masked_means_kernel(n_ptr, x_ptr, cnt_ptr, out_x_ptr, out_cnt_ptr, R, BLOCK_R: tl.constexpr):
    """Σx / max(Σn, 1) and Σcnt / max(Σn, 1) over rows, in a fixed order, as float32."""
    acc_n = tl.zeros([BLOCK_R], dtype=tl.int64)
    acc_c = tl.zeros([BLOCK_R], dtype=tl.int64)
    acc_x = tl.zeros([BLOCK_R], dtype=x_ptr.dtype.element_ty)
    for start in range(0, R, BLOCK_R):
        offs = start + tl.arange(0, BLOCK_R)
        ok = offs < R
        acc_n += tl.load(n_ptr + offs, mask=ok, other=0).to(tl.int64)
        acc_c += tl.load(cnt_ptr + offs, mask=ok, other=0).to(tl.int64)
        acc_x += tl.load(x_ptr + offs, mask=ok, other=0.0)
    denom = tl.maximum(tl.sum(acc_n, axis=0), 1).to(x_ptr.dtype.element_ty)
    tl.store(out_x_ptr, (tl.sum(acc_x, axis=0) / denom).to(tl.float32))
    tl.store(out_cnt_ptr, (tl.sum(acc_c, axis=0).to(x_ptr.dtype.element_ty) / denom).to(tl.float32))


@triton.jit
def _bwd_kernel(g_ptr, lp_ptr, ol_ptr, a_ptr, m_ptr, w_ptr, glp_ptr, gadv_ptr, L, clip_low, clip_high, dual_clip,
                NEED_ADV: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < L
    base = row * L
    scale = tl.load(g_ptr) * tl.load(w_ptr + row)
    v = tl.load(m_ptr + base + offs, mask=inb, other=0) != 0
    lp = tl.load(lp_ptr + base + offs, mask=v, other=0.0)
    ol = tl.load(ol_ptr + base + offs, mask=v, other=0.0)
    a = tl.load(a_ptr + base + offs, mask=v, other=0.0)
    _, dloss, dadv, _ = _policy_token(lp, ol, a, clip_low, clip_high, dual_clip)
    tl.store(glp_ptr + base + offs, tl.where(v, scale * dloss, 0.0), mask=inb)
    if NEED_ADV:
        tl.store(gadv_ptr + base + offs, tl.where(v, scale * dadv, 0.0), mask=inb)


def combine_configs():
    """The configurations of the two fixed-order combine kernels (shared with ppo_value_loss)."""
    return [dict(kernel=k, BLOCK_R=BLOCK_R, num_warps=4) for k in ("_combine_kernel", "_masked_means_kernel")]


def configs(dtype=None, arch=None):
    """The launch configurations the plans below can select (the same for every dtype and GPU)."""
    return [dict(kernel=k, BLOCK=BLOCK, num_warps=4) for k in ("_fwd_rows_kernel", "_bwd_kernel")] + combine_configs()


def combine_plan(row_sum, row_n, row_kl, row_clip, aggregation):
    """([Launch], (loss, mean of row_kl per valid token as float32, clipped fraction, row weights)) from the
    per-row sums and counts: the fixed-order second pass of both PPO losses."""
    R = row_sum.shape[0]
    loss = row_sum.new_zeros(())
    kl = torch.zeros((), dtype=torch.float32, device=row_sum.device)
    clipfrac = torch.zeros((), dtype=torch.float32, device=row_sum.device)
    row_weight = row_sum.new_zeros(R)
    plan = [Launch(_combine_kernel, (1,), (row_sum, row_n, row_weight, loss, R),
                   dict(agg=aggregation, BLOCK_R=BLOCK_R)),
            Launch(_masked_means_kernel, (1,), (row_n, row_kl, row_clip, kl, clipfrac, R), dict(BLOCK_R=BLOCK_R))]
    return plan, (loss, kl, clipfrac, row_weight)


def plan_fwd(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, aggregation, arch=None):
    """([Launch], (loss, clipfrac, approx_kl, row_weight)) for contiguous [R, L] inputs (bool mask)."""
    R, L = logp.shape
    row_sum, row_kl = logp.new_zeros(R), logp.new_zeros(R)
    row_n = torch.zeros(R, dtype=torch.int32, device=logp.device)
    row_clip = torch.zeros(R, dtype=torch.int32, device=logp.device)
    combine, (loss, approx_kl, clipfrac, row_weight) = combine_plan(row_sum, row_n, row_kl, row_clip, aggregation)
    plan = [Launch(_fwd_rows_kernel, (R,), (logp, old_logp, advantages, mask.view(torch.uint8), row_sum, row_kl, row_n,
                                            row_clip, L, clip_low, clip_high, dual_clip), dict(BLOCK=BLOCK))] + combine
    return (plan if R else []), (loss, clipfrac, approx_kl, row_weight)


def plan_bwd(grad_loss, logp, old_logp, advantages, mask, row_weight, clip_low, clip_high, dual_clip, need_adv_grad,
             arch=None):
    """([Launch], (d logp, d advantages or an empty tensor))."""
    R, L = logp.shape
    g_logp = torch.empty_like(logp)
    g_adv = torch.empty_like(advantages) if need_adv_grad else advantages.new_empty((0,))
    plan = [Launch(_bwd_kernel, (R, triton.cdiv(L, BLOCK)),
                   (grad_loss, logp, old_logp, advantages, mask.view(torch.uint8), row_weight, g_logp,
                    g_adv if need_adv_grad else g_logp, L, clip_low, clip_high, dual_clip),
                   dict(NEED_ADV=need_adv_grad, BLOCK=BLOCK))] if R and L else []
    return plan, (g_logp, g_adv)


def ppo_policy_loss_fwd(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, aggregation):
    return execute(plan_fwd(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, aggregation), logp.device)


def ppo_policy_loss_bwd(grad_loss, logp, old_logp, advantages, mask, row_weight, clip_low, clip_high, dual_clip,
                        need_adv_grad):
    return execute(plan_bwd(grad_loss, logp, old_logp, advantages, mask, row_weight, clip_low, clip_high, dual_clip,
                            need_adv_grad), logp.device)
