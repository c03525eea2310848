"""Triton kernels of rk.logprobs_from_logits: one program per row, looping over the vocabulary in tiles.

Forward keeps an online log-sum-exp state (max m, Σe^{z−m}, Σe^{z−m}(z−m)) per row, folding in one tile at a
time (the same state and merge rule as csrc/common.h LseState / lse_merge), and stores logp, entropy and lse.
Backward recomputes p = exp(z − lse) tile by tile and writes the gradient in the logits dtype.
Rows are addressed through two leading strides, so logits[:, :-1] of a [B, T, V] tensor needs no copy.
Batch-invariant in every mode (batch_invariant changes nothing here): one program per row, its tile width
set by V alone, so a row's order of operations never depends on the rest of the batch.
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute, powers_of_two

MAX_BLOCK = 4096


@triton.jit
def _row_base(x_ptr, row, inner, s_outer, s_inner):
    return x_ptr + (row // inner) * s_outer + (row % inner) * s_inner


@triton.jit
def tanh(x):
    """tanh from exp (no libdevice call, so it runs in the interpreter too): odd, exact to a few ulps of 1
    in absolute terms, which is what c·tanh(z/c) needs."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def row_inv_t(temps_ptr, row, inv_t, HAS_TEMPS: tl.constexpr):
    """1/temperature of a row: the per-row temperatures when given, else the scalar's inverse."""
    if HAS_TEMPS:
        return 1.0 / tl.load(temps_ptr + row)
    else:
        return inv_t


@triton.jit
def _narrow(g, out_ty: tl.constexpr):
    """fp32/fp64 gradient -> the logits dtype, rounding to nearest even. bf16 is rounded by hand: the Triton
    interpreter truncates fp32 -> bf16, and this gives the same bits as the CPU kernel everywhere."""
    if out_ty == tl.bfloat16:
        b = g.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(g != g, 0x7FC0, r)  # NaN stays NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return g.to(out_ty)


@triton.jit
def _logprobs_fwd_kernel(x_ptr, tok_ptr, logp_ptr, ent_ptr, lse_ptr, temps_ptr, thr_ptr, V, inner, s_outer, s_inner,
                         inv_t, softcap, ignore_index, ENT: tl.constexpr, HAS_TEMPS: tl.constexpr, CAP: tl.constexpr,
                         THR: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = lse_ptr.dtype.element_ty
    inv_t = row_inv_t(temps_ptr, row, inv_t, HAS_TEMPS)
    thr = float("-inf")
    if THR:  # the sampler replay: z below the row's threshold is out of the kept set
        thr = tl.load(thr_ptr + row)
    base = _row_base(x_ptr, row, inner, s_outer, s_inner)
    tok = tl.load(tok_ptr + row)
    ignored = tok == ignore_index
    n = tl.where(ignored, 0, V)  # an ignored row reads nothing
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    m = tl.full((), neg_inf, acc)
    s = tl.zeros((), acc)
    w = tl.zeros((), acc)
    for start in range(0, n, BLOCK):
        idx = start + offs
        z = tl.load(base + idx, mask=idx < V, other=neg_inf).to(acc)
        if CAP:  # the lanes past V stay −inf (the cap would make them −c)
            z = tl.where(idx < V, softcap * tanh(z / softcap), neg_inf)
        z = z * inv_t
        if THR:
            z = tl.where(z >= thr, z, neg_inf)
        m_new = tl.maximum(m, tl.max(z, 0))
        live = m_new != neg_inf  # all −inf so far: nothing to add
        m_ref = tl.where(live, m_new, 0.0)
        alpha = tl.where(m != neg_inf, tl.exp(m - m_ref), 0.0)
        dm = tl.where(m != neg_inf, m - m_ref, 0.0)
        d = tl.where(z != neg_inf, z - m_ref, 0.0)  # 0·log 0 = 0 for −inf logits
        e = tl.where(z != neg_inf, tl.exp(d), 0.0)
        ed = e * d
        w = tl.where(live, (w + s * dm) * alpha + tl.sum(ed, 0), w)
        s = tl.where(live, s * alpha + tl.sum(e, 0), s)
        m = m_new
    s = tl.where(ignored, 1.0, s)  # an ignored row has no sums; keep its (discarded) values finite
    lse = m + tl.log(s)
    in_range = (tok >= 0) & (tok < V)
    x_tok = tl.load(base + tl.where(in_range, tok, 0), mask=in_range & ~ignored, other=0.0).to(acc)
    if CAP:
        x_tok = softcap * tanh(x_tok / softcap)
    x_tok = x_tok * inv_t
    logp = x_tok - lse
    if THR:
        logp = tl.where(x_tok >= thr, logp, neg_inf)
    logp = tl.where(in_range, logp, float("nan"))
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
    tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse))
    if ENT:
        tl.store(ent_ptr + row, tl.where(ignored, 0.0, tl.log(s) - w / s))


@triton.jit
def _logprobs_bwd_kernel(glp_ptr, gent_ptr, x_ptr, tok_ptr, lse_ptr, ent_ptr, grad_ptr, temps_ptr, thr_ptr, V, inner,
                         s_outer, s_inner, inv_t, softcap, ignore_index, HAS_GLP: tl.constexpr,
                         HAS_GENT: tl.constexpr, HAS_TEMPS: tl.constexpr, CAP: tl.constexpr, THR: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = lse_ptr.dtype.element_ty
    inv_t = row_inv_t(temps_ptr, row, inv_t, HAS_TEMPS)
    base = _row_base(x_ptr, row, inner, s_outer, s_inner)
    gbase = grad_ptr + row * V
    tok = tl.load(tok_ptr + row)
    ignored = tok == ignore_index
    in_range = (tok >= 0) & (tok < V)
    lse = tl.load(lse_ptr + row)
    # an out-of-range id has logp = NaN (a constant): no gradient flows through it, as in the reference
    g_lp = tl.zeros((), acc)
    if HAS_GLP:
        g_lp = tl.where(in_range & ~ignored, tl.load(glp_ptr + row), 0.0)
    thr = float("-inf")
    if THR:  # a token outside its kept set has logp = −inf, a constant: no gradient through it either
        thr = tl.load(thr_ptr + row)
        x_tok = tl.load(base + tl.where(in_range, tok, 0), mask=in_range & ~ignored, other=0.0).to(acc)
        if CAP:
            x_tok = softcap * tanh(x_tok / softcap)
        g_lp = tl.where(x_tok * inv_t >= thr, g_lp, 0.0)
    g_h = tl.zeros((), acc)
    H = tl.zeros((), acc)
    if HAS_GENT:
        g_h = tl.where(ignored, 0.0, tl.load(gent_ptr + row))
        H = tl.load(ent_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        ok = idx < V
        z = tl.load(base + idx, mask=ok & ~ignored, other=float("-inf")).to(acc)
        if CAP:
            z = softcap * tanh(z / softcap)
        lp = z * inv_t - lse
        if THR:
            lp = tl.where(z * inv_t >= thr, lp, float("-inf"))
        p = tl.exp(lp)
        ent = p * (tl.where(p > 0, lp, 0.0) + H)  # p·log p → 0 for −inf logits
        g = (g_lp * (tl.where(idx == tok, 1.0, 0.0) - p) - g_h * ent) * inv_t
        if CAP:  # d c·tanh(x/c)/dx = 1 − tanh²
            u = z / softcap
            g = g * (1.0 - u * u)
        g = tl.where(ignored, 0.0, g)
        tl.store(gbase + idx, _narrow(g, grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _order_key(z):
    """An integer key with the order of the float z (its bits, negatives reflected; −0 counts as +0)."""
    z = z + 0.0
    if z.dtype == tl.float64:
        b = z.to(tl.int64, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFFFFFFFFFF)
    else:
        b = z.to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _key_value(k, acc: tl.constexpr):
    if acc == tl.float64:
        return tl.where(k >= 0, k, k ^ 0x7FFFFFFFFFFFFFFF).to(tl.float64, bitcast=True)
    else:
        return tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _scaled(base, idx, V, inv_t, softcap, CAP: tl.constexpr, acc: tl.constexpr):
    """z = cap(x)·(1/t) of one tile, −inf past V: the expression the forward and backward kernels use."""
    z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(acc)
    if CAP:
        z = tl.where(idx < V, softcap * tanh(z / softcap), float("-inf"))
    return z * inv_t


@triton.jit
def _replay_threshold_kernel(x_ptr, tok_ptr, thr_ptr, temps_ptr, k_ptr, p_ptr, V, inner, s_outer, s_inner, inv_t,
                             softcap, ignore_index, HAS_TEMPS: tl.constexpr, CAP: tl.constexpr, HAS_K: tl.constexpr,
                             HAS_P: tl.constexpr, BLOCK: tl.constexpr):
    """One row's threshold by bisection over the order keys of z (the algorithm of csrc/replay.h): the k-th
    largest z, then the lowest z whose ascending cumulative mass over the top-k survivors exceeds (1 − p)·Z.
    Each bisection step reads the row once (<= 33 steps for fp32, 65 for fp64, per cut)."""
    row = tl.program_id(0).to(tl.int64)
    acc = thr_ptr.dtype.element_ty
    inv_t = row_inv_t(temps_ptr, row, inv_t, HAS_TEMPS)
    base = _row_base(x_ptr, row, inner, s_outer, s_inner)
    tok = tl.load(tok_ptr + row)
    k = tl.zeros((), tl.int64)
    if HAS_K:
        k = tl.load(k_ptr + row)
    p = tl.full((), 1.0, acc)
    if HAS_P:
        p = tl.load(p_ptr + row).to(acc)
    use_k = (k > 0) & (k < V)
    use_p = p < 1.0
    n = tl.where((tok == ignore_index) | ~(use_k | use_p), 0, V)  # nothing to cut: read nothing
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), acc)
    for start in range(0, n, BLOCK):
        m = tl.maximum(m, tl.max(_scaled(base, start + offs, V, inv_t, softcap, CAP, acc), 0))
    all_key = _order_key(tl.full((), float("-inf"), acc))
    lo = all_key
    hi = _order_key(m) + 1
    live = m > float("-inf")
    # top-k: the largest key t with #{key >= t} >= k
    while use_k & live & (lo + 1 < hi):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        c = tl.zeros((), tl.int64)
        for start in range(0, n, BLOCK):
            kz = _order_key(_scaled(base, start + offs, V, inv_t, softcap, CAP, acc))
            c += tl.sum(tl.where(kz >= mid, 1, 0).to(tl.int64), 0)
        if c >= k:
            lo = mid
        else:
            hi = mid
    if use_p & live:
        zsum = tl.zeros((), acc)
        for start in range(0, n, BLOCK):
            z = _scaled(base, start + offs, V, inv_t, softcap, CAP, acc)
            zsum += tl.sum(tl.where(_order_key(z) >= lo, tl.exp(z - m), 0.0), 0)
        target = (1.0 - p) * zsum
        a = lo - 1
        b = _order_key(m)
        while a + 1 < b:
            mid = (a >> 1) + (b >> 1) + (a & b & 1)
            s = tl.zeros((), acc)
            for start in range(0, n, BLOCK):
                z = _scaled(base, start + offs, V, inv_t, softcap, CAP, acc)
                kz = _order_key(z)
                s += tl.sum(tl.where((kz >= lo) & (kz <= mid), tl.exp(z - m), 0.0), 0)
            if s > target:
                b = mid
            else:
                a = mid
        lo = b
    thr = tl.where(lo == all_key, float("-inf"), _key_value(lo, acc))
    tl.store(thr_ptr + row, thr)


def _row_layout(x):
    """(inner, s_outer, s_inner, x') with row r of x' at (r // inner)·s_outer + (r % inner)·s_inner: at most two
    groups of leading dims after merging contiguous neighbours; anything else is made contiguous."""
    sizes, strides = [], []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if sizes and strides[-1] == stride * size:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    if len(sizes) > 2:
        x = x.contiguous()
        return _row_layout(x)
    if len(sizes) == 2:
        return sizes[1], strides[0], strides[1], x
    if len(sizes) == 1:
        return sizes[0], 0, strides[0], x
    return 1, 0, 0, x


def _block(V):
    return min(triton.next_power_of_2(V), MAX_BLOCK)


def configs(dtype=None, arch=None):
    """The launch configurations the plans can select: the vocabulary tile is V rounded up to a power of two,
    capped at MAX_BLOCK."""
    return [dict(kernel=k, BLOCK=b, num_warps=4)
            for k in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_replay_threshold_kernel")
            for b in powers_of_two(MAX_BLOCK)]


def _fp64_temperatures(temperatures, temperature, N, acc, device):
    """A float kernel argument reaches the kernel as fp32 (on a GPU, and through a nested call under the
    interpreter): fp64 logits get their temperature as an fp64 per-row array instead, so 1/T is not rounded
    to fp32 (a 2e-8 relative error at T = 0.7)."""
    if temperatures is None and acc == torch.float64 and temperature != 1.0:
        return torch.full((N,), float(temperature), dtype=acc, device=device), 1.0
    return temperatures, temperature


def plan_fwd(logits, tokens, temperature, ignore_index, return_entropy, temperatures=None, softcap=0.0,
             thresholds=None, arch=None):
    """([Launch], (logp, entropy or an empty tensor, lse)) for logits [..., V] (rows strided as _row_layout
    allows) and contiguous tokens [...]."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(tokens.shape, dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty(tokens.shape if return_entropy else (0,), dtype=acc, device=logits.device)
    N, V = tokens.numel(), logits.shape[-1]
    if N == 0:
        return [], (logp, ent, lse)
    inner, s_outer, s_inner, x = _row_layout(logits)
    temperatures, temperature = _fp64_temperatures(temperatures, temperature, N, acc, logits.device)
    args = (x, tokens, logp, ent if return_entropy else lse, lse, lse if temperatures is None else temperatures,
            lse if thresholds is None else thresholds, V, inner, s_outer, s_inner, 1.0 / temperature, softcap or 1.0,
            ignore_index)
    plan = [Launch(_logprobs_fwd_kernel, (N,), args, dict(ENT=bool(return_entropy), HAS_TEMPS=temperatures is not None,
                                                          CAP=bool(softcap), THR=thresholds is not None,
                                                          BLOCK=_block(V)))]
    return plan, (logp, ent, lse)


def plan_bwd(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index, temperatures=None,
             softcap=0.0, thresholds=None, arch=None):
    """([Launch], d logits) in the logits dtype; either upstream gradient may be None."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    N, V = tokens.numel(), logits.shape[-1]
    if N == 0:
        return [], grad
    inner, s_outer, s_inner, x = _row_layout(logits)
    temperatures, temperature = _fp64_temperatures(temperatures, temperature, N, lse.dtype, logits.device)
    args = (grad_logp if grad_logp is not None else lse, grad_entropy if grad_entropy is not None else lse, x, tokens,
            lse, entropy if grad_entropy is not None else lse, grad, lse if temperatures is None else temperatures,
            lse if thresholds is None else thresholds, V, inner, s_outer, s_inner, 1.0 / temperature, softcap or 1.0,
            ignore_index)
    plan = [Launch(_logprobs_bwd_kernel, (N,), args,
                   dict(HAS_GLP=grad_logp is not None, HAS_GENT=grad_entropy is not None,
                        HAS_TEMPS=temperatures is not None, CAP=bool(softcap), THR=thresholds is not None,
                        BLOCK=_block(V)))]
    return plan, grad


def logprobs_fwd(logits, tokens, temperature, ignore_index, return_entropy, temperatures=None, softcap=0.0,
                 thresholds=None):
    return execute(plan_fwd(logits, tokens, temperature, ignore_index, return_entropy, temperatures, softcap,
                            thresholds), logits.device)


def logprobs_bwd(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index, temperatures=None,
                 softcap=0.0, thresholds=None):
    return execute(plan_bwd(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index,
                            temperatures, softcap, thresholds), logits.device)


def plan_threshold(logits, tokens, temperature, ignore_index, temperatures, softcap, top_k, top_p, arch=None):
    """([Launch], thresholds [...]) of the sampler replay, one per row (−inf: nothing cut); top_k int64 and top_p
    (accumulation dtype) of tokens.shape, either None."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    thr = torch.empty(tokens.shape, dtype=acc, device=logits.device)
    N, V = tokens.numel(), logits.shape[-1]
    if N == 0:
        return [], thr
    inner, s_outer, s_inner, x = _row_layout(logits)
    temperatures, temperature = _fp64_temperatures(temperatures, temperature, N, acc, logits.device)
    args = (x, tokens, thr, thr if temperatures is None else temperatures, tokens if top_k is None else top_k,
            thr if top_p is None else top_p, V, inner, s_outer, s_inner, 1.0 / temperature, softcap or 1.0,
            ignore_index)
    plan = [Launch(_replay_threshold_kernel, (N,), args,
                   dict(HAS_TEMPS=temperatures is not None, CAP=bool(softcap), HAS_K=top_k is not None,
                        HAS_P=top_p is not None, BLOCK=_block(V)))]
    return plan, thr


def replay_threshold(logits, tokens, temperature, ignore_index, temperatures, softcap, top_k, top_p):
    return execute(plan_threshold(logits, tokens, temperature, ignore_index, temperatures, softcap, top_k, top_p),
                   logits.device)
