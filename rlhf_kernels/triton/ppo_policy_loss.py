"""Triton kernels of rk.ppo_policy_loss.

Forward: one program per row accumulates the row's loss sum, ½(logp − old)², ratio, KL and weight sums,
the ratio max, valid and clipped counts (GSPO's row ratio first: a loop over the row's blocks sums its
masked log-ratios before the token loop, in the same program); one single-program kernel then combines
the rows in a fixed order into the loss and the per-row token weight, another into the stats (no atomics,
so the result does not depend on scheduling). Backward: plain PPO is one elementwise pass,
grad·row_weight·∂ℓ/∂logp at valid positions; the GRPO-family arguments take one program per row (GSPO's
row gradient and per-row advantages need a row reduction before or after the token pass).
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute
from .token_kl import _expm1, _kl

BLOCK = 1024      # tokens per step of a row program
BLOCK_R = 1024    # rows per step of the combine program


@triton.jit
def _policy_token(lp, ol, a, clip_low, clip_high, dual_clip):
    """Plain PPO's token: the clipped surrogate of _token_ext on the token's own ratio."""
    return _token_ext(lp, ol, a, tl.exp(lp - ol), clip_low, clip_high, dual_clip, False)


@triton.jit
def _token_ext(lp, ol, a, ratio, clip_low, clip_high, dual_clip, CISPO: tl.constexpr):
    """csrc/common.h policy_token: PPO's clipped surrogate on a given ratio (its dloss is ∂ℓ/∂log ρ), or
    CISPO's −sg(min(ρ, 1 + clip_high))·A·logp (its dloss is ∂ℓ/∂logp with ρ constant)."""
    if CISPO:
        hi = 1.0 + clip_high
        w = tl.minimum(ratio, hi)
        return -w * a * lp, -w * a, -w * lp, ratio > hi
    else:
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
        return tl.where(dual, cap, loss), tl.where(dual, 0.0, dloss), tl.where(dual, -dual_clip, dadv), clipped


@triton.jit
def _row_log_ratio(lp_ptr, ol_ptr, m_ptr, base, L, BLOCK: tl.constexpr):
    """(masked mean of logp − old over the row, valid count): GSPO's log row ratio."""
    acc = tl.zeros([BLOCK], dtype=lp_ptr.dtype.element_ty)
    acc_n = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(m_ptr + base + offs, mask=offs < L, other=0) != 0
        lp = tl.load(lp_ptr + base + offs, mask=v, other=0.0)
        ol = tl.load(ol_ptr + base + offs, mask=v, other=0.0)
        acc += tl.where(v, lp - ol, 0.0)
        acc_n += v.to(tl.int32)
    n = tl.sum(acc_n, axis=0)
    return tl.sum(acc, axis=0) / tl.maximum(n, 1).to(lp_ptr.dtype.element_ty), n


@triton.jit
def _load_token(lp_ptr, ol_ptr, a_ptr, w_ptr, m_ptr, row, base, offs, L, log_s, clip_low, clip_high, dual_clip,
                SEQ: tl.constexpr, CISPO: tl.constexpr, HAS_W: tl.constexpr, ADV_ROW: tl.constexpr):
    """A block of one row's tokens with the optional inputs resolved: (valid, logp, old, ratio, weight, token)."""
    v = tl.load(m_ptr + base + offs, mask=offs < L, other=0) != 0
    # masked positions are never read, so garbage there cannot reach the sums
    lp = tl.load(lp_ptr + base + offs, mask=v, other=0.0)
    ol = tl.load(ol_ptr + base + offs, mask=v, other=0.0)
    if ADV_ROW:
        a = tl.load(a_ptr + row) + tl.zeros_like(lp)
    else:
        a = tl.load(a_ptr + base + offs, mask=v, other=0.0)
    if SEQ:
        ratio = tl.exp(log_s + tl.zeros_like(lp))
    else:
        ratio = tl.exp(lp - ol)
    if HAS_W:
        w = tl.load(w_ptr + base + offs, mask=v, other=0.0)
    else:
        w = tl.zeros_like(lp) + 1.0
    loss, dloss, dadv, clipped = _token_ext(lp, ol, a, ratio, clip_low, clip_high, dual_clip, CISPO)
    return v, lp, ol, ratio, w, loss, dloss, dadv, clipped


@triton.jit
def _fwd_ext_kernel(lp_ptr, ol_ptr, a_ptr, w_ptr, ref_ptr, m_ptr, sum_ptr, kl_ptr, n_ptr, nc_ptr, rs_ptr, rm_ptr,
                    tk_ptr, ws_ptr, L, clip_low, clip_high, dual_clip, kl_coef, SEQ: tl.constexpr,
                    CISPO: tl.constexpr, HAS_W: tl.constexpr, HAS_REF: tl.constexpr, ADV_ROW: tl.constexpr,
                    KL_EST: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * L
    log_s = 0.0
    if SEQ:
        # not `log_s, _ =`: the loop below reuses `_`, and compiled Triton keeps a loop-carried name's type
        log_s = _row_log_ratio(lp_ptr, ol_ptr, m_ptr, base, L, BLOCK)[0]
    dt = lp_ptr.dtype.element_ty
    acc_s = tl.zeros([BLOCK], dtype=dt)
    acc_k = tl.zeros([BLOCK], dtype=dt)
    acc_rs = tl.zeros([BLOCK], dtype=dt)
    acc_rm = tl.zeros([BLOCK], dtype=dt)
    acc_tk = tl.zeros([BLOCK], dtype=dt)
    acc_ws = tl.zeros([BLOCK], dtype=dt)
    acc_n = tl.zeros([BLOCK], dtype=tl.int32)
    acc_c = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v, lp, ol, ratio, w, loss, _, _, clipped = _load_token(lp_ptr, ol_ptr, a_ptr, w_ptr, m_ptr, row, base, offs,
                                                               L, log_s, clip_low, clip_high, dual_clip, SEQ, CISPO,
                                                               HAS_W, ADV_ROW)
        loss = w * loss
        if HAS_REF:
            ref = tl.load(ref_ptr + base + offs, mask=v, other=0.0)
            kl = _kl(lp - ref, KL_EST)
            loss += kl_coef * kl
            acc_tk += tl.where(v, kl, 0.0)
        d = lp - ol
        acc_s += tl.where(v, loss, 0.0)
        acc_k += tl.where(v, 0.5 * d * d, 0.0)
        acc_rs += tl.where(v, ratio, 0.0)
        acc_rm = tl.maximum(acc_rm, tl.where(v, ratio, 0.0))
        acc_ws += tl.where(v, w, 0.0)
        acc_n += v.to(tl.int32)
        acc_c += (v & clipped).to(tl.int32)
    tl.store(sum_ptr + row, tl.sum(acc_s, axis=0))
    tl.store(kl_ptr + row, tl.sum(acc_k, axis=0))
    tl.store(n_ptr + row, tl.sum(acc_n, axis=0))
    tl.store(nc_ptr + row, tl.sum(acc_c, axis=0))
    tl.store(rs_ptr + row, tl.sum(acc_rs, axis=0))
    tl.store(rm_ptr + row, tl.max(acc_rm, axis=0))
    tl.store(tk_ptr + row, tl.sum(acc_tk, axis=0))
    tl.store(ws_ptr + row, tl.sum(acc_ws, axis=0))


@triton.jit
def _policy_stats_kernel(n_ptr, kl_ptr, nc_ptr, rs_ptr, rm_ptr, tk_ptr, ws_ptr, out_ptr, R, BLOCK_R: tl.constexpr):
    """stats[6] float32 from the rows, in a fixed order: clipfrac, approx_kl, ratio_mean, ratio_max, kl,
    weight_mean (masked means over the valid tokens; 0 when there is none)."""
    dt = kl_ptr.dtype.element_ty
    acc_n = tl.zeros([BLOCK_R], dtype=tl.int64)
    acc_c = tl.zeros([BLOCK_R], dtype=tl.int64)
    acc_k = tl.zeros([BLOCK_R], dtype=dt)
    acc_rs = tl.zeros([BLOCK_R], dtype=dt)
    acc_rm = tl.zeros([BLOCK_R], dtype=dt)
    acc_tk = tl.zeros([BLOCK_R], dtype=dt)
    acc_ws = tl.zeros([BLOCK_R], dtype=dt)
    for start in range(0, R, BLOCK_R):
        offs = start + tl.arange(0, BLOCK_R)
        ok = offs < R
        acc_n += tl.load(n_ptr + offs, mask=ok, other=0).to(tl.int64)
        acc_c += tl.load(nc_ptr + offs, mask=ok, other=0).to(tl.int64)
        acc_k += tl.load(kl_ptr + offs, mask=ok, other=0.0)
        acc_rs += tl.load(rs_ptr + offs, mask=ok, other=0.0)
        acc_rm = tl.maximum(acc_rm, tl.load(rm_ptr + offs, mask=ok, other=0.0))
        acc_tk += tl.load(tk_ptr + offs, mask=ok, other=0.0)
        acc_ws += tl.load(ws_ptr + offs, mask=ok, other=0.0)
    denom = tl.maximum(tl.sum(acc_n, axis=0), 1).to(dt)
    tl.store(out_ptr + 0, (tl.sum(acc_c, axis=0).to(dt) / denom).to(tl.float32))
    tl.store(out_ptr + 1, (tl.sum(acc_k, axis=0) / denom).to(tl.float32))
    tl.store(out_ptr + 2, (tl.sum(acc_rs, axis=0) / denom).to(tl.float32))
    rs = tl.sum(acc_rs, axis=0)
    # a NaN ratio makes the sum NaN (ratios are ≥ 0, so nothing else can); max comparisons would drop it
    tl.store(out_ptr + 3, tl.where(rs != rs, rs, tl.max(acc_rm, axis=0)).to(tl.float32))
    tl.store(out_ptr + 4, (tl.sum(acc_tk, axis=0) / denom).to(tl.float32))
    tl.store(out_ptr + 5, (tl.sum(acc_ws, axis=0) / denom).to(tl.float32))


@triton.jit
def _bwd_ext_kernel(g_ptr, lp_ptr, ol_ptr, a_ptr, w_ptr, ref_ptr, m_ptr, rw_ptr, glp_ptr, gold_ptr, gadv_ptr, L,
                    clip_low, clip_high, dual_clip, kl_coef, SEQ: tl.constexpr, CISPO: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_REF: tl.constexpr, ADV_ROW: tl.constexpr, KL_EST: tl.constexpr,
                    NEED_OLD: tl.constexpr, NEED_ADV: tl.constexpr, BLOCK: tl.constexpr):
    # GSPO: ∂log s/∂logp_t = m_t / n, so every valid token gets Σ_u w_u·∂ℓ_u/∂log s / n (a first loop sums it)
    row = tl.program_id(0).to(tl.int64)
    base = row * L
    dt = lp_ptr.dtype.element_ty
    scale = tl.load(g_ptr) * tl.load(rw_ptr + row)
    log_s = 0.0
    row_g = 0.0
    if SEQ:
        log_s, n = _row_log_ratio(lp_ptr, ol_ptr, m_ptr, base, L, BLOCK)
        if not CISPO:
            acc = tl.zeros([BLOCK], dtype=dt)
            for start in range(0, L, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                v, _, _, _, w, _, dloss, _, _ = _load_token(lp_ptr, ol_ptr, a_ptr, w_ptr, m_ptr, row, base, offs, L,
                                                            log_s, clip_low, clip_high, dual_clip, SEQ, CISPO, HAS_W,
                                                            ADV_ROW)
                acc += tl.where(v, w * dloss, 0.0)
            row_g = tl.sum(acc, axis=0) / tl.maximum(n, 1).to(dt)
    acc_adv = tl.zeros([BLOCK], dtype=dt)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < L
        v, lp, _, _, w, _, dloss, dadv, _ = _load_token(lp_ptr, ol_ptr, a_ptr, w_ptr, m_ptr, row, base, offs, L, log_s,
                                                        clip_low, clip_high, dual_clip, SEQ, CISPO, HAS_W, ADV_ROW)
        if SEQ and not CISPO:
            pol = row_g + tl.zeros_like(lp)
        else:
            pol = w * dloss
        g = pol
        if HAS_REF:
            ref = tl.load(ref_ptr + base + offs, mask=v, other=0.0)
            if KL_EST == 0:
                dk = tl.zeros_like(lp) + 1.0
            elif KL_EST == 1:
                dk = lp - ref
            else:
                dk = -_expm1(ref - lp)  # 1 − e^{−d}
            g += kl_coef * dk
        tl.store(glp_ptr + base + offs, tl.where(v, scale * g, 0.0), mask=inb)
        if NEED_OLD:
            if CISPO:
                tl.store(gold_ptr + base + offs, tl.zeros_like(lp), mask=inb)
            else:
                tl.store(gold_ptr + base + offs, tl.where(v, -scale * pol, 0.0), mask=inb)
        ga = tl.where(v, scale * w * dadv, 0.0)
        if NEED_ADV:
            if ADV_ROW:
                acc_adv += ga
            else:
                tl.store(gadv_ptr + base + offs, ga, mask=inb)
    if NEED_ADV:
        if ADV_ROW:
            tl.store(gadv_ptr + row, tl.sum(acc_adv, axis=0))


@triton.jit
def _combine_kernel(sum_ptr, n_ptr, w_ptr, loss_ptr, R, denominator, agg: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row sums → loss and per-row weights (csrc/common.h aggregation_weight), in a fixed order;
    denominator > 0 replaces the divisor (the valid tokens, or the rows with one)."""
    acc_tok = tl.zeros([BLOCK_R], dtype=tl.int64)
    acc_rows = tl.zeros([BLOCK_R], dtype=tl.int64)
    for start in range(0, R, BLOCK_R):
        offs = start + tl.arange(0, BLOCK_R)
        n = tl.load(n_ptr + offs, mask=offs < R, other=0).to(tl.int64)
        acc_tok += n
        acc_rows += (n > 0).to(tl.int64)
    tokens = tl.sum(acc_tok, axis=0).to(sum_ptr.dtype.element_ty)
    rows = tl.sum(acc_rows, axis=0).to(sum_ptr.dtype.element_ty)
    if denominator > 0:
        tokens = tokens * 0.0 + denominator
        rows = tokens
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
    return ([dict(kernel=k, BLOCK=BLOCK, num_warps=4)
             for k in ("_fwd_ext_kernel", "_bwd_kernel", "_bwd_ext_kernel")]
            + combine_configs() + [dict(kernel="_policy_stats_kernel", BLOCK_R=BLOCK_R, num_warps=4)])


def combine_plan(row_sum, row_n, row_kl, row_clip, aggregation, denominator=0.0):
    """([Launch], (loss, mean of row_kl per valid token as float32, clipped fraction, row weights)) from the
    per-row sums and counts: the fixed-order second pass of both PPO losses."""
    R = row_sum.shape[0]
    loss = row_sum.new_zeros(())
    kl = torch.zeros((), dtype=torch.float32, device=row_sum.device)
    clipfrac = torch.zeros((), dtype=torch.float32, device=row_sum.device)
    row_weight = row_sum.new_zeros(R)
    plan = [Launch(_combine_kernel, (1,), (row_sum, row_n, row_weight, loss, R, denominator),
                   dict(agg=aggregation, BLOCK_R=BLOCK_R)),
            Launch(_masked_means_kernel, (1,), (row_n, row_kl, row_clip, kl, clipfrac, R), dict(BLOCK_R=BLOCK_R))]
    return plan, (loss, kl, clipfrac, row_weight)


def _flags(advantages, weights, ref_logp, ratio_level, loss_type, kl_estimator):
    return dict(SEQ=ratio_level == 1, CISPO=loss_type == 1, HAS_W=weights is not None, HAS_REF=ref_logp is not None,
                ADV_ROW=advantages.dim() == 1, KL_EST=kl_estimator)


def _extended(flags):
    return any(flags[k] for k in ("SEQ", "CISPO", "HAS_W", "HAS_REF", "ADV_ROW"))


def plan_fwd(logp, old_logp, advantages, mask, weights, ref_logp, clip_low, clip_high, dual_clip, aggregation,
             ratio_level, loss_type, kl_coef, kl_estimator, denominator, arch=None):
    """([Launch], (loss, stats[6] float32, row_weight)) for contiguous [R, L] inputs (bool mask; advantages
    [R, L] or [R]; weights and ref_logp [R, L] or None)."""
    R, L = logp.shape
    f = _flags(advantages, weights, ref_logp, ratio_level, loss_type, kl_estimator)
    row_sum, row_kl = logp.new_zeros(R), logp.new_zeros(R)
    row_n = torch.zeros(R, dtype=torch.int32, device=logp.device)
    row_clip = torch.zeros(R, dtype=torch.int32, device=logp.device)
    row_rs, row_rm, row_tk, row_ws = (logp.new_zeros(R) for _ in range(4))
    loss, row_weight = logp.new_zeros(()), logp.new_zeros(R)
    stats = torch.zeros(6, dtype=torch.float32, device=logp.device)
    m = mask.view(torch.uint8)
    # absent optional inputs are passed as logp: their constexpr flag keeps the kernel from reading them;
    # with every flag off the kernel is plain PPO's
    rows = Launch(_fwd_ext_kernel, (R,), (logp, old_logp, advantages, logp if weights is None else weights,
                                          logp if ref_logp is None else ref_logp, m, row_sum, row_kl, row_n, row_clip,
                                          row_rs, row_rm, row_tk, row_ws, L, clip_low, clip_high, dual_clip, kl_coef),
                  dict(f, BLOCK=BLOCK))
    plan = [rows,
            Launch(_combine_kernel, (1,), (row_sum, row_n, row_weight, loss, R, denominator),
                   dict(agg=aggregation, BLOCK_R=BLOCK_R)),
            Launch(_policy_stats_kernel, (1,), (row_n, row_kl, row_clip, row_rs, row_rm, row_tk, row_ws, stats, R),
                   dict(BLOCK_R=BLOCK_R))]
    return (plan if R else []), (loss, stats, row_weight)


def plan_bwd(grad_loss, logp, old_logp, advantages, mask, weights, ref_logp, row_weight, clip_low, clip_high,
             dual_clip, ratio_level, loss_type, kl_coef, kl_estimator, need_old_grad, need_adv_grad, arch=None):
    """([Launch], (d logp, d old_logp, d advantages; the last two empty tensors unless asked for)). Plain
    PPO's d old_logp is −d logp, formed by the caller when the plan has no kernel writing it."""
    R, L = logp.shape
    f = _flags(advantages, weights, ref_logp, ratio_level, loss_type, kl_estimator)
    g_logp = torch.empty_like(logp)
    g_adv = torch.empty_like(advantages) if need_adv_grad else advantages.new_empty((0,))
    m = mask.view(torch.uint8)
    if _extended(f):
        g_old = torch.empty_like(logp) if need_old_grad else logp.new_empty((0,))
        plan = [Launch(_bwd_ext_kernel, (R,),
                       (grad_loss, logp, old_logp, advantages, logp if weights is None else weights,
                        logp if ref_logp is None else ref_logp, m, row_weight, g_logp,
                        g_old if need_old_grad else g_logp, g_adv if need_adv_grad else g_logp, L, clip_low,
                        clip_high, dual_clip, kl_coef),
                       dict(f, NEED_OLD=need_old_grad, NEED_ADV=need_adv_grad, BLOCK=BLOCK))] if R and L else []
        return plan, (g_logp, g_old, g_adv)
    plan = [Launch(_bwd_kernel, (R, triton.cdiv(L, BLOCK)),
                   (grad_loss, logp, old_logp, advantages, m, row_weight, g_logp,
                    g_adv if need_adv_grad else g_logp, L, clip_low, clip_high, dual_clip),
                   dict(NEED_ADV=need_adv_grad, BLOCK=BLOCK))] if R and L else []
    return plan, (g_logp, None, g_adv)


def ppo_policy_loss_fwd(logp, old_logp, advantages, mask, weights, ref_logp, clip_low, clip_high, dual_clip,
                        aggregation, ratio_level, loss_type, kl_coef, kl_estimator, denominator):
    return execute(plan_fwd(logp, old_logp, advantages, mask, weights, ref_logp, clip_low, clip_high, dual_clip,
                            aggregation, ratio_level, loss_type, kl_coef, kl_estimator, denominator), logp.device)


def ppo_policy_loss_bwd(grad_loss, logp, old_logp, advantages, mask, weights, ref_logp, row_weight, clip_low,
                        clip_high, dual_clip, ratio_level, loss_type, kl_coef, kl_estimator, need_old_grad,
                        need_adv_grad):
    g_logp, g_old, g_adv = execute(plan_bwd(grad_loss, logp, old_logp, advantages, mask, weights, ref_logp, row_weight,
                                            clip_low, clip_high, dual_clip, ratio_level, loss_type, kl_coef,
                                            kl_estimator, need_old_grad, need_adv_grad), logp.device)
    if g_old is None:
        g_old = -g_logp if need_old_grad else logp.new_empty((0,))
    return g_logp, g_old, g_adv
