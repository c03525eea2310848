"""Triton kernel of rlhf_kernels::fixed_gemm_triton: c = a·bᵀ or a·b, every element in an order of operations that
depends on K alone (the batch-invariant sampler replay's products, rlhf_kernels/ops/_replay_head.py).

One program per [BLOCK_M, BLOCK_N] tile of c, the K loop ascending in BLOCK_K steps, no split-K, the tile sizes
from a fixed per-dtype/arch table (never from M or N): a row of c meets the same instructions in the same order
whatever tile it lands in and whatever the other rows hold. The tiles are the linear head's logit tiles
(rlhf_kernels/triton/linear_logprobs.py), which the GPU report already compiles for every target.
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, execute
from .linear_logprobs import _INTERP_TILES, _TILES, _arch, _big_smem, _mma, _precisions, _zeros


@triton.jit
def _fixed_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_bk, s_bn, IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c[rows, cols] = Σ_k a[rows, k]·b(k, cols), b(k, j) = b_ptr[k·s_bk + j·s_bn]; a and c row-major."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    acc = _zeros(BLOCK_M, BLOCK_N, IS_FP64)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < K
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * s_bk + cols[None, :] * s_bn, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        acc = _mma(a, b, acc, DOT_PREC, False)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


def _tiles(dtype, arch):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the logit tile of the linear head for this dtype and arch."""
    return _INTERP_TILES[0] if arch is None else _TILES[dtype.itemsize, _big_smem(arch)][0]


def configs(dtype, arch):
    """The launch configurations the plan can select for fp32 (IEEE and TF32) or fp64 operands on `arch`."""
    bm, bn, bk, warps, stages = _tiles(dtype, arch)
    return [dict(kernel="_fixed_gemm_kernel", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PREC=prec, num_warps=warps,
                 **({} if stages is None else {"num_stages": stages}))
            for prec in _precisions(dtype.itemsize, None)]


def plan_fwd(a, b, trans_b, *, arch=None, allow_tf32=None):
    """([Launch], c) for a [M, K] and b ([N, K] when trans_b, else [K, N]), contiguous, fp32 or fp64.
    fp32 dots use TF32 exactly when torch.backends.cuda.matmul.allow_tf32 is set (as the linear head does)."""
    M, K = a.shape
    N = b.shape[0] if trans_b else b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return [], c
    if K == 0:
        return [], c.zero_()
    arch = _arch(a, arch)
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    prec = _precisions(a.dtype.itemsize, allow_tf32)[0]
    bm, bn, bk, warps, stages = _tiles(a.dtype, arch)
    s_bk, s_bn = (1, K) if trans_b else (N, 1)
    return [Launch(_fixed_gemm_kernel, (triton.cdiv(M, bm), triton.cdiv(N, bn)), (a, b, c, M, N, K, s_bk, s_bn),
                   dict(IS_FP64=a.dtype == torch.float64, DOT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk),
                   warps, stages)], c


def fixed_gemm(a, b, trans_b):
    return execute(plan_fwd(a, b, trans_b), a.device)
