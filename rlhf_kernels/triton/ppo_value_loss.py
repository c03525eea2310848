"""Triton kernels of rk.ppo_value_loss: one program per row for the row sums and counts, then the
fixed-order combine of ppo_policy_loss (no atomics); backward is one elementwise pass."""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute
from .ppo_policy_loss import BLOCK, combine_configs, combine_plan


@triton.jit
def _value_token(v, vo, r, clip):
    # the same selects as csrc/common.h ppo_value_token; clip ≤ 0 means unclipped
    e1 = v - r
    dv = v - vo
    e2 = vo + tl.minimum(tl.maximum(dv, -clip), clip) - r
    clipped = (clip > 0) & (e2 * e2 > e1 * e1)
    inside = (dv >= -clip) & (dv <= clip)
    err = tl.where(clipped, e2, e1)
    loss = 0.5 * err * err
    dloss = tl.where(clipped & (~inside), 0.0, err)
    return loss, dloss, err, clipped


@triton.jit
def _fwd_rows_kernel(v_ptr, vo_ptr, r_ptr, m_ptr, sum_ptr, n_ptr, nc_ptr, L, clip, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * L
    acc_s = tl.zeros([BLOCK], dtype=v_ptr.dtype.element_ty)
    acc_n = tl.zeros([BLOCK], dtype=tl.int32)
    acc_c = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = tl.load(m_ptr + base + offs, mask=offs < L, other=0) != 0
        # masked positions are never read, so garbage there cannot reach the sums
        v = tl.load(v_ptr + base + offs, mask=valid, other=0.0)
        vo = tl.load(vo_ptr + base + offs, mask=valid, other=0.0)
        r = tl.load(r_ptr + base + offs, mask=valid, other=0.0)
        loss, _, _, clipped = _value_token(v, vo, r, clip)
        acc_s += tl.where(valid, loss, 0.0)
        acc_n += valid.to(tl.int32)
        acc_c += (valid & clipped).to(tl.int32)
    tl.store(sum_ptr + row, tl.sum(acc_s, axis=0))
    tl.store(n_ptr + row, tl.sum(acc_n, axis=0))
    tl.store(nc_ptr + row, tl.sum(acc_c, axis=0))


@triton.jit
def _bwd_kernel(g_ptr, v_ptr, vo_ptr, r_ptr, m_ptr, w_ptr, gv_ptr, go_ptr, gr_ptr, L, clip, NEED_DATA: tl.constexpr,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < L
    base = row * L
    scale = tl.load(g_ptr) * tl.load(w_ptr + row)
    valid = tl.load(m_ptr + base + offs, mask=inb, other=0) != 0
    v = tl.load(v_ptr + base + offs, mask=valid, other=0.0)
    vo = tl.load(vo_ptr + base + offs, mask=valid, other=0.0)
    r = tl.load(r_ptr + base + offs, mask=valid, other=0.0)
    _, dloss, err, _ = _value_token(v, vo, r, clip)
    tl.store(gv_ptr + base + offs, tl.where(valid, scale * dloss, 0.0), mask=inb)
    if NEED_DATA:
        tl.store(go_ptr + base + offs, tl.where(valid, scale * (err - dloss), 0.0), mask=inb)
        tl.store(gr_ptr + base + offs, tl.where(valid, -scale * err, 0.0), mask=inb)


def configs(dtype=None, arch=None):
    """The launch configurations the plans below can select (the same for every dtype and GPU)."""
    return [dict(kernel=k, BLOCK=BLOCK, num_warps=4) for k in ("_fwd_rows_kernel", "_bwd_kernel")] + combine_configs()


def plan_fwd(values, old_values, returns, mask, clip, aggregation, arch=None):
    """([Launch], (loss, clipfrac, row_weight)) for contiguous [R, L] inputs (bool mask)."""
    R, L = values.shape
    row_sum, row_zero = values.new_zeros(R), values.new_zeros(R)
    row_n = torch.zeros(R, dtype=torch.int32, device=values.device)
    row_clip = torch.zeros(R, dtype=torch.int32, device=values.device)
    # the shared combine also averages a per-row sum (the policy loss's KL): give it zeros, drop that output
    combine, (loss, _unused, clipfrac, row_weight) = combine_plan(row_sum, row_n, row_zero, row_clip, aggregation)
    plan = [Launch(_fwd_rows_kernel, (R,), (values, old_values, returns, mask.view(torch.uint8), row_sum, row_n,
                                            row_clip, L, clip), dict(BLOCK=BLOCK))] + combine
    return (plan if R else []), (loss, clipfrac, row_weight)


def plan_bwd(grad_loss, values, old_values, returns, mask, row_weight, clip, need_data_grads, arch=None):
    """([Launch], (d values, d old_values, d returns), the last two empty unless need_data_grads)."""
    R, L = values.shape
    g_v = torch.empty_like(values)
    g_old = torch.empty_like(old_values) if need_data_grads else old_values.new_empty((0,))
    g_ret = torch.empty_like(returns) if need_data_grads else returns.new_empty((0,))
    plan = [Launch(_bwd_kernel, (R, triton.cdiv(L, BLOCK)),
                   (grad_loss, values, old_values, returns, mask.view(torch.uint8), row_weight, g_v,
                    g_old if need_data_grads else g_v, g_ret if need_data_grads else g_v, L, clip),
                   dict(NEED_DATA=need_data_grads, BLOCK=BLOCK))] if R and L else []
    return plan, (g_v, g_old, g_ret)


def ppo_value_loss_fwd(values, old_values, returns, mask, clip, aggregation):
    return execute(plan_fwd(values, old_values, returns, mask, clip, aggregation), values.device)


def ppo_value_loss_bwd(grad_loss, values, old_values, returns, mask, row_weight, clip, need_data_grads):
    return execute(plan_bwd(grad_loss, values, old_values, returns, mask, row_weight, clip, need_data_grads),
                   values.device)
