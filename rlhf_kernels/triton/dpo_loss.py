"""Triton kernels of rk.dpo_loss: elementwise over the pairs, one pass forward, one backward."""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute

BLOCK = 1024


@triton.jit
def _log_sigmoid(x):
    # x − log(1 + e^x) for x < 0, −log(1 + e^−x) otherwise: no overflow for either sign
    return tl.where(x < 0, x - tl.log(1.0 + tl.exp(tl.minimum(x, 0.0))), -tl.log(1.0 + tl.exp(-tl.maximum(x, 0.0))))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _load4(c_ptr, r_ptr, cr_ptr, rr_ptr, offs, ok):
    dc = tl.load(c_ptr + offs, mask=ok, other=0.0) - tl.load(cr_ptr + offs, mask=ok, other=0.0)
    dr = tl.load(r_ptr + offs, mask=ok, other=0.0) - tl.load(rr_ptr + offs, mask=ok, other=0.0)
    return dc, dr


@triton.jit
def _fwd_kernel(c_ptr, r_ptr, cr_ptr, rr_ptr, loss_ptr, cw_ptr, rw_ptr, n, beta, eps, LOSS: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dc, dr = _load4(c_ptr, r_ptr, cr_ptr, rr_ptr, offs, ok)
    h = dc - dr
    bh = beta * h
    # the same formulas as csrc/common.h dpo_loss_value
    if LOSS == 0:
        loss = -(1.0 - eps) * _log_sigmoid(bh) - eps * _log_sigmoid(-bh)
    elif LOSS == 1:
        d = h - 1.0 / (2.0 * beta)
        loss = d * d
    elif LOSS == 2:
        loss = tl.maximum(1.0 - bh, 0.0)
    else:
        loss = ((1.0 - eps) * -_log_sigmoid(bh) + eps * _log_sigmoid(-bh)) / (1.0 - 2.0 * eps)
    tl.store(loss_ptr + offs, loss, mask=ok)
    tl.store(cw_ptr + offs, beta * dc, mask=ok)
    tl.store(rw_ptr + offs, beta * dr, mask=ok)


@triton.jit
def _bwd_kernel(g_ptr, c_ptr, r_ptr, cr_ptr, rr_ptr, gc_ptr, gr_ptr, gcr_ptr, grr_ptr, n, beta, eps,
                LOSS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    dc, dr = _load4(c_ptr, r_ptr, cr_ptr, rr_ptr, offs, ok)
    h = dc - dr
    bh = beta * h
    # ∂loss/∂h as csrc/common.h dpo_loss_dh
    if LOSS == 0:
        dh = beta * (-(1.0 - eps) * _sigmoid(-bh) + eps * _sigmoid(bh))
    elif LOSS == 1:
        dh = 2.0 * (h - 1.0 / (2.0 * beta))
    elif LOSS == 2:
        dh = tl.where(bh < 1.0, -beta, 0.0)
    else:
        dh = beta * (-(1.0 - eps) * _sigmoid(-bh) - eps * _sigmoid(bh)) / (1.0 - 2.0 * eps)
    d = tl.load(g_ptr + offs, mask=ok, other=0.0) * dh
    tl.store(gc_ptr + offs, d, mask=ok)
    tl.store(gr_ptr + offs, -d, mask=ok)
    tl.store(gcr_ptr + offs, -d, mask=ok)
    tl.store(grr_ptr + offs, d, mask=ok)


def configs(dtype=None, arch=None):
    """The launch configurations the plans below can select (the same for every dtype and GPU)."""
    return [dict(kernel=k, BLOCK=BLOCK, num_warps=4) for k in ("_fwd_kernel", "_bwd_kernel")]


def plan_fwd(c, r, cr, rr, beta, loss_type, eps, arch=None):
    """([Launch], (losses, chosen rewards, rejected rewards)) for same-shaped contiguous inputs."""
    losses, c_rew, r_rew = torch.empty_like(c), torch.empty_like(c), torch.empty_like(c)
    n = c.numel()
    plan = [Launch(_fwd_kernel, (triton.cdiv(n, BLOCK),), (c, r, cr, rr, losses, c_rew, r_rew, n, beta, eps),
                   dict(LOSS=loss_type, BLOCK=BLOCK))] if n else []
    return plan, (losses, c_rew, r_rew)


def plan_bwd(grad, c, r, cr, rr, beta, loss_type, eps, arch=None):
    """([Launch], gradients of the four inputs)."""
    grads = tuple(torch.empty_like(c) for _ in range(4))
    n = c.numel()
    plan = [Launch(_bwd_kernel, (triton.cdiv(n, BLOCK),), (grad, c, r, cr, rr, *grads, n, beta, eps),
                   dict(LOSS=loss_type, BLOCK=BLOCK))] if n else []
    return plan, grads


def dpo_loss_fwd(c, r, cr, rr, beta, loss_type, eps):
    return execute(plan_fwd(c, r, cr, rr, beta, loss_type, eps), c.device)


def dpo_loss_bwd(grad, c, r, cr, rr, beta, loss_type, eps):
    return execute(plan_bwd(grad, c, r, cr, rr, beta, loss_type, eps), c.device)
