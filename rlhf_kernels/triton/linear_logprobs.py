"""Triton kernels of rk.linear_logprobs: logit tiles live only on chip.

forward  (grid: row tiles): for each vocabulary tile, z = h·Wᵀ (+ b) over H tiles with tl.dot, then an
         online log-sum-exp with the entropy accumulator (m, s = Σe^{z−m}, w = Σe^{z−m}(z−m), as
         csrc/common.h LseState) and the target logit picked in the tile.
backward, two kernels, both recomputing the logit tiles and turning them into d(logits):
  d(hidden) (grid: row tiles): loops over the vocabulary; d(hidden) of its rows += dZ·W_tile.
  d(weight), d(bias) (grid: vocabulary tiles): loops over all row tiles; d(W_tile) += dZᵀ·h_tile.
Each program owns the rows (or vocabulary entries) it writes and adds in a fixed order, so the
gradients are deterministic without atomics, at the price of one more recompute than an atomic
scatter. bf16/fp16 operands go into tl.dot as they are with fp32 accumulation (d(logits) is cast
to the operand dtype for the gradient dots); fp32 operands use exact ("ieee") dots, not TF32.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._backend import interpreting


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b. UPCAST (interpreter only) widens bf16 operands to fp32 first: the interpreter
    multiplies raw bf16 bit patterns (triton-lang/triton#11584); bf16 products are exact in fp32,
    so the result is what a bf16 dot with fp32 accumulation gives on a GPU."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, inv_t, HAS_BIAS: tl.constexpr,
                 IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = (h[rows] · W[cols]ᵀ + b[cols]) / T, −inf outside the vocabulary."""
    if IS_FP64:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        h = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _mma(h, w, acc, DOT_PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    z = acc * inv_t
    return tl.where(cmask[None, :], z, float("-inf"))


@triton.jit
def _dlogits_tile(z, cols, tok, lse, ent, g1, g2, inv_t):
    """d(g1·logp + g2·H)/d(logits), as csrc/common.h logprob_entropy_grad, divided by T."""
    lp = z - lse[:, None]
    p = tl.exp(lp)
    pe = p * tl.where(p > 0, lp + ent[:, None], 0.0)  # p·log p → 0 for −inf logits
    is_tok = cols[None, :] == tok[:, None]
    return (g1[:, None] * (tl.where(is_tok, 1.0, 0.0) - p) - g2[:, None] * pe) * inv_t


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, tok_ptr, logp_ptr, ent_ptr, lse_ptr, N, V, H, inv_t, ignore_index,
                HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tok = tl.load(tok_ptr + rows, mask=rmask, other=ignore_index)
    if IS_FP64:
        m = tl.full((BLOCK_N,), float("-inf"), tl.float64)
    else:
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros_like(m)
    w = tl.zeros_like(m)
    tgt = tl.zeros_like(m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, inv_t, HAS_BIAS, IS_FP64, DOT_PREC, UPCAST,
                         BLOCK_N, BLOCK_V, BLOCK_H)
        tgt += tl.sum(tl.where(cols[None, :] == tok[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(z, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of −inf so far: keep the sums at 0
        d = z - base[:, None]
        e = tl.exp(d)
        alpha = tl.exp(m - base)
        # rescale the running sums to the new max: w' = (w + s(m − m'))·e^{m−m'}
        w = (w + s * tl.where(s > 0, m - base, 0.0)) * alpha + tl.sum(e * tl.where(e > 0, d, 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    valid = tok != ignore_index
    in_range = (tok >= 0) & (tok < V)
    logp = tl.where(valid, tl.where(in_range, tgt - lse, float("nan")), 0.0)
    ent = tl.where(valid, log_s - w / s, 0.0)
    tl.store(logp_ptr + rows, logp, mask=rmask)
    tl.store(ent_ptr + rows, ent, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _row_grads(tok_ptr, glp_ptr, gent_ptr, lse_ptr, ent_ptr, rows, rmask, V, ignore_index, HAS_GENT: tl.constexpr):
    """Per-row (token, lse, entropy, g_logp, g_entropy), the gradients zeroed on ignored rows and the
    logp gradient on out-of-range tokens (whose logp is NaN, as in the reference)."""
    tok = tl.load(tok_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (tok != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
    g1 = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
    g1 = tl.where(valid & (tok >= 0) & (tok < V), g1, 0.0)
    if HAS_GENT:
        g2 = tl.where(valid, tl.load(gent_ptr + rows, mask=rmask, other=0.0), 0.0)
    else:
        g2 = tl.zeros_like(g1)
    return tok, lse, ent, g1, g2


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, b_ptr, tok_ptr, glp_ptr, gent_ptr, lse_ptr, ent_ptr, dh_ptr, N, V, H, inv_t,
                   ignore_index, HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, IS_FP64: tl.constexpr,
                   DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tok, lse, ent, g1, g2 = _row_grads(tok_ptr, glp_ptr, gent_ptr, lse_ptr, ent_ptr, rows, rmask, V, ignore_index,
                                       HAS_GENT)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, inv_t, HAS_BIAS, IS_FP64, DOT_PREC, UPCAST,
                         BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _dlogits_tile(z, cols, tok, lse, ent, g1, g2, inv_t).to(w_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            kmask = ks < H
            w = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            ptrs = dh_ptr + rows[:, None] * H + ks[None, :]
            omask = rmask[:, None] & kmask[None, :]
            acc = tl.load(ptrs, mask=omask, other=0.0)
            acc = _mma(dz, w, acc, DOT_PREC, UPCAST)
            tl.store(ptrs, acc, mask=omask)


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, b_ptr, tok_ptr, glp_ptr, gent_ptr, lse_ptr, ent_ptr, dw_ptr, db_ptr, N, V, H,
                   inv_t, ignore_index, HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr, NEED_W: tl.constexpr,
                   NEED_B: tl.constexpr, IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < V
    if IS_FP64:
        db = tl.zeros((BLOCK_V,), dtype=tl.float64)
    else:
        db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
        tok, lse, ent, g1, g2 = _row_grads(tok_ptr, glp_ptr, gent_ptr, lse_ptr, ent_ptr, rows, rmask, V,
                                           ignore_index, HAS_GENT)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, inv_t, HAS_BIAS, IS_FP64, DOT_PREC, UPCAST,
                         BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _dlogits_tile(z, cols, tok, lse, ent, g1, g2, inv_t)
        if NEED_B:
            db += tl.sum(dz, 0)
        if NEED_W:
            dzt = tl.trans(dz.to(w_ptr.dtype.element_ty))
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                kmask = ks < H
                h = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                ptrs = dw_ptr + cols[:, None] * H + ks[None, :]
                omask = cmask[:, None] & kmask[None, :]
                acc = tl.load(ptrs, mask=omask, other=0.0)
                acc = _mma(dzt, h, acc, DOT_PREC, UPCAST)
                tl.store(ptrs, acc, mask=omask)
    if NEED_B:
        tl.store(db_ptr + cols, db, mask=cmask)


def _config(dtype):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, dot precision, upcast bf16 dots). The interpreter gets the smallest tiles
    tl.dot accepts (16) to stay quick on tiny test shapes."""
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    if interpreting():
        return 16, 32, 16, 4, prec, dtype == torch.bfloat16
    if dtype == torch.float64:
        return 32, 64, 32, 4, prec, False
    return 64, 128, 64, 8, prec, False


def linear_logprobs_fwd(hidden, weight, bias, tokens, temperature, ignore_index):
    N, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp, ent, lse = (torch.empty(N, dtype=acc, device=hidden.device) for _ in range(3))
    if N == 0:
        return logp, ent, lse
    bn, bv, bh, warps, prec, upcast = _config(hidden.dtype)
    wrap_triton(_fwd_kernel)[(triton.cdiv(N, bn),)](
        hidden, weight, bias if bias is not None else lse, tokens, logp, ent, lse, N, V, H, 1.0 / temperature,
        ignore_index, HAS_BIAS=bias is not None, IS_FP64=acc == torch.float64, DOT_PREC=prec, UPCAST=upcast, BLOCK_N=bn,
        BLOCK_V=bv, BLOCK_H=bh, num_warps=warps)
    return logp, ent, lse


def linear_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature,
                        ignore_index, need_hidden, need_weight, need_bias):
    N, H = hidden.shape
    V = weight.shape[0]
    acc = lse.dtype
    bn, bv, bh, warps, prec, upcast = _config(hidden.dtype)
    glp = grad_logp.to(acc).contiguous()
    gent = grad_entropy.to(acc).contiguous() if grad_entropy is not None else glp
    common = dict(HAS_BIAS=bias is not None, HAS_GENT=grad_entropy is not None, IS_FP64=acc == torch.float64,
                  DOT_PREC=prec, UPCAST=upcast, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps)
    b = bias if bias is not None else lse
    gh = torch.empty(0, dtype=hidden.dtype, device=hidden.device)
    gw = torch.empty(0, dtype=weight.dtype, device=weight.device)
    gb = torch.empty(0, dtype=acc, device=hidden.device)
    if need_hidden:
        dh = torch.zeros(N, H, dtype=acc, device=hidden.device)
        if N:
            wrap_triton(_bwd_dh_kernel)[(triton.cdiv(N, bn),)](
                hidden, weight, b, tokens, glp, gent, lse, entropy, dh, N, V, H, 1.0 / temperature, ignore_index,
                **common)
        gh = dh.to(hidden.dtype)
    if need_weight or need_bias:
        dw = torch.zeros(V, H, dtype=acc, device=weight.device) if need_weight else lse
        db = torch.zeros(V, dtype=acc, device=hidden.device) if need_bias else lse
        if N:
            wrap_triton(_bwd_dw_kernel)[(triton.cdiv(V, bv),)](
                hidden, weight, b, tokens, glp, gent, lse, entropy, dw, db, N, V, H, 1.0 / temperature, ignore_index,
                NEED_W=need_weight, NEED_B=need_bias, **common)
        if need_weight:
            gw = dw.to(weight.dtype)
        if need_bias:
            gb = db
    return gh, gw, gb
