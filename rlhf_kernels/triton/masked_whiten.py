"""Triton kernels of rk.masked_whiten. Deterministic: (1) one program per fixed chunk writes its
count, mean and squared deviations; (2) one program merges the partials in chunk order; (3) the
elementwise pass reads the merged mean and 1/std. No atomics."""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute
from ._scalars import _scalar

CHUNK = 4096  # elements per partial, fixed so the reduction order depends only on the size
MERGE_BLOCK = 1024
BLOCK = 1024


@triton.jit
def _moments_kernel(x_ptr, m_ptr, cnt_ptr, mean_ptr, m2_ptr, n, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    ok = offs < n
    m = tl.load(m_ptr + offs, mask=ok, other=0) != 0
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    zero = tl.zeros([CHUNK], x.dtype)
    cnt = tl.sum(m.to(tl.int32), 0)
    mean = tl.sum(tl.where(m, x, zero), 0) / tl.maximum(cnt, 1).to(x.dtype)
    d = tl.where(m, x - mean, zero)
    tl.store(cnt_ptr + pid, cnt)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, tl.sum(d * d, 0))


@triton.jit
def _merge_kernel(cnt_ptr, mean_ptr, m2_ptr, stats_ptr, parts, eps, UNBIASED: tl.constexpr, BLOCK: tl.constexpr):
    dt = mean_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dt)
    total_n = tl.sum(tl.zeros([BLOCK], tl.int64), 0)
    total_mean = tl.sum(zero, 0)
    total_m2 = tl.sum(zero, 0)
    for start in range(0, parts, BLOCK):
        i = start + j
        ok = i < parts
        c = tl.load(cnt_ptr + i, mask=ok, other=0)
        cf = c.to(dt)
        mu = tl.load(mean_ptr + i, mask=ok, other=0.0)
        tile_n = tl.sum(c.to(tl.int64), 0)
        tile_mean = tl.sum(cf * mu, 0) / tl.maximum(tile_n, 1).to(dt)
        dev = tl.where(c > 0, mu - tile_mean, zero)
        tile_m2 = tl.sum(tl.load(m2_ptr + i, mask=ok, other=0.0) + cf * dev * dev, 0)
        # Chan's merge of the running total with this tile (a no-op for an empty tile)
        n = total_n + tile_n
        d = tile_mean - total_mean
        fb = tile_n.to(dt) / tl.maximum(n, 1).to(dt)
        total_mean = total_mean + d * fb
        total_m2 = total_m2 + tile_m2 + d * d * total_n.to(dt) * fb
        total_n = n
    denom = tl.maximum(total_n - 1, 1) if UNBIASED else tl.maximum(total_n, 1)
    # with no valid element the stats are unused: every output position is masked
    tl.store(stats_ptr, total_mean)
    tl.store(stats_ptr + 1, 1.0 / tl.sqrt(total_m2 / denom.to(dt) + _scalar(eps, dt)))


@triton.jit
def _normalize_kernel(x_ptr, m_ptr, stats_ptr, out_ptr, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    m = tl.load(m_ptr + offs, mask=ok, other=0) != 0
    mean = tl.load(stats_ptr)
    y = (x - mean) * tl.load(stats_ptr + 1)
    if not SHIFT:
        y = y + mean
    tl.store(out_ptr + offs, tl.where(m, y, 0.0).to(x.dtype), mask=ok)


def configs(dtype=None, arch=None):
    """The launch configurations the plan can select (the same for every dtype and GPU)."""
    return [dict(kernel="_moments_kernel", CHUNK=CHUNK, num_warps=4),
            dict(kernel="_merge_kernel", BLOCK=MERGE_BLOCK, num_warps=4),
            dict(kernel="_normalize_kernel", BLOCK=BLOCK, num_warps=4)]


def plan_fwd(x, mask, shift_mean, unbiased, eps, arch=None):
    """([Launch], whitened x) for contiguous x and a same-shaped bool mask; the plan's kernels run in order."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return [], out
    m = mask.view(torch.uint8)
    parts = triton.cdiv(n, CHUNK)
    cnt = torch.empty(parts, dtype=torch.int32, device=x.device)
    mean = torch.empty(parts, dtype=x.dtype, device=x.device)
    m2 = torch.empty(parts, dtype=x.dtype, device=x.device)
    stats = torch.empty(2, dtype=x.dtype, device=x.device)
    plan = [Launch(_moments_kernel, (parts,), (x, m, cnt, mean, m2, n), dict(CHUNK=CHUNK)),
            Launch(_merge_kernel, (1,), (cnt, mean, m2, stats, parts, eps),
                   dict(UNBIASED=bool(unbiased), BLOCK=MERGE_BLOCK)),
            Launch(_normalize_kernel, (triton.cdiv(n, BLOCK),), (x, m, stats, out, n),
                   dict(SHIFT=bool(shift_mean), BLOCK=BLOCK))]
    return plan, out


def masked_whiten(x, mask, shift_mean, unbiased, eps):
    return execute(plan_fwd(x, mask, shift_mean, unbiased, eps), x.device)
