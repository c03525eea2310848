"""Triton kernels of rk.token_kl: one elementwise pass forward, one backward."""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute

BLOCK = 1024


@triton.jit
def _exp_tail(xs):
    # Σ_{n≥2} xs^(n−2)/n! for |xs| ≤ 1, to float64 precision (terms to n = 18), nested as
    # ½(1 + xs/3·(1 + xs/4·(…))) so every coefficient is an exact small integer in xs's dtype
    p = xs * 0.0 + 1.0
    for n in tl.static_range(18, 2, -1):
        p = 1.0 + xs / n * p
    return 0.5 * p


@triton.jit
def _expm1(x):
    # e^x − 1 without the cancellation of the direct form near 0 (csrc/common.h r_expm1)
    small = tl.abs(x) <= 1.0
    xs = tl.where(small, x, 0.0)
    return tl.where(small, xs * (1.0 + xs * _exp_tail(xs)), tl.exp(x) - 1.0)


@triton.jit
def _expm1_minus(x):
    # e^x − 1 − x, k3's shape, likewise (csrc/common.h r_expm1_minus)
    small = tl.abs(x) <= 1.0
    xs = tl.where(small, x, 0.0)
    return tl.where(small, xs * xs * _exp_tail(xs), (tl.exp(x) - 1.0) - x)


@triton.jit
def _kl(d, estimator: tl.constexpr):
    # d = logp − ref; the same formulas as csrc/common.h kl_value
    if estimator == 0:
        return d
    elif estimator == 1:
        return 0.5 * d * d
    else:
        return _expm1_minus(-d)  # e^{−d} − 1 + d


@triton.jit
def _token_kl_fwd_kernel(logp_ptr, ref_ptr, out_ptr, n, clamp, estimator: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    d = tl.load(logp_ptr + offs, mask=ok, other=0.0) - tl.load(ref_ptr + offs, mask=ok, other=0.0)
    kl = _kl(d, estimator)
    if clamp > 0:
        kl = tl.minimum(tl.maximum(kl, -clamp), clamp)
    tl.store(out_ptr + offs, kl, mask=ok)


@triton.jit
def _token_kl_bwd_kernel(grad_ptr, logp_ptr, ref_ptr, glogp_ptr, gref_ptr, n, clamp, estimator: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    d = tl.load(logp_ptr + offs, mask=ok, other=0.0) - tl.load(ref_ptr + offs, mask=ok, other=0.0)
    g = tl.load(grad_ptr + offs, mask=ok, other=0.0)
    if estimator == 0:
        dk = tl.full(d.shape, 1.0, d.dtype)
    elif estimator == 1:
        dk = d
    else:
        dk = -_expm1(-d)  # 1 − e^{−d}
    if clamp > 0:
        kl = _kl(d, estimator)
        dk = tl.where((kl >= -clamp) & (kl <= clamp), dk, 0.0)
    gl = g * dk
    tl.store(glogp_ptr + offs, gl, mask=ok)
    tl.store(gref_ptr + offs, -gl, mask=ok)


def configs(dtype=None, arch=None):
    """The launch configurations the plans below can select (the same for every dtype and GPU)."""
    return [dict(kernel=k, BLOCK=BLOCK, num_warps=4) for k in ("_token_kl_fwd_kernel", "_token_kl_bwd_kernel")]


def plan_fwd(logp, ref_logp, estimator, clamp, arch=None):
    """([Launch], kl) for the forward of same-shaped contiguous logp, ref_logp."""
    out = torch.empty_like(logp)
    n = logp.numel()
    plan = [Launch(_token_kl_fwd_kernel, (triton.cdiv(n, BLOCK),), (logp, ref_logp, out, n, clamp),
                   dict(estimator=estimator, BLOCK=BLOCK))] if n else []
    return plan, out


def plan_bwd(grad, logp, ref_logp, estimator, clamp, arch=None):
    """([Launch], (d logp, d ref_logp))."""
    g_logp, g_ref = torch.empty_like(logp), torch.empty_like(ref_logp)
    n = logp.numel()
    plan = [Launch(_token_kl_bwd_kernel, (triton.cdiv(n, BLOCK),), (grad, logp, ref_logp, g_logp, g_ref, n, clamp),
                   dict(estimator=estimator, BLOCK=BLOCK))] if n else []
    return plan, (g_logp, g_ref)


def token_kl_fwd(logp, ref_logp, estimator, clamp):
    return execute(plan_fwd(logp, ref_logp, estimator, clamp), logp.device)


def token_kl_bwd(grad, logp, ref_logp, estimator, clamp):
    return execute(plan_bwd(grad, logp, ref_logp, estimator, clamp), logp.device)
