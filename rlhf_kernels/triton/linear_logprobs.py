"""Triton kernels of rk.linear_logprobs and their launch plans; logit tiles live only on chip, and the one
[N, C] temporary of the backward is held to the RLHF_KERNELS_CHUNK_BYTES budget.

Forward, grid (row tiles × vocabulary splits): each program computes its logit tiles z = h·Wᵀ (+ b) with
tl.dot over H tiles and keeps an online log-sum-exp with the entropy accumulator (m, s = Σe^{z−m},
w = Σe^{z−m}(z−m), as csrc/common.h LseState) and the target logit of its part of the vocabulary; the
partial states go to a [4, splits, N] buffer that a small merge kernel folds in split order. The split
count fills about two waves of the GPU's SMs (N = 2048 in bf16 gives 32 row tiles: 9 splits on an H100).

Backward, per vocabulary chunk of C columns (sized from the memory budget, below):
  1. d(logits) kernel, grid (row tiles × vocabulary tiles of the chunk): recomputes each logit tile
     from the saved log-sum-exp and writes d(logits) of the chunk, in the dot dtype, to a [N, C] scratch.
  2. d(weight) kernel, grid (vocabulary tiles × H tiles): dW[chunk] = dZᵀ·h, its accumulator on chip over
     all N rows, stored once, in the weight's dtype (no fp32 [V, H] temporary); d(bias) = column sums of dZ.
  3. d(hidden) kernel, grid (row tiles × H tiles): dh += dZ·W[chunk], on chip over the chunk's C columns;
     one fp32 read-modify-write of dh per chunk (none when one chunk covers V), the last one storing the
     hidden's dtype.
Every reduction runs in a fixed order: deterministic, no atomics.

Batch invariance (batch_invariant=True): a row's log-prob, entropy and d(hidden) row must not depend on the
rest of the batch. The tile shapes and warps come from a fixed table per dtype and arch (no autotuning, no
choice by N), and no kernel splits H (no split-K): each logit is one program's tl.dot chain over H in
ascending BLOCK_H steps, an element's arithmetic the same wherever its row sits in the BLOCK_N tile. The one
N-dependent choice is the forward's split of the vocabulary (more splits when there are few row tiles),
which sets the order in which a row's partial states are merged: batch_invariant fixes it from V and the
arch alone (forward_splits). The backward needs no change: a row's d(logits) is elementwise from its own
logits and lse, and its d(hidden) is summed over the vocabulary in ascending BLOCK_V steps whatever the
chunk width C (C, which depends on N, is a multiple of BLOCK_V, and the accumulator carried between chunks
is the same fp32/fp64 value the on-chip loop would hold). The d(weight) sum over rows depends on N, as it
must; it is fixed for a given batch (run to run). Under the interpreter tl.dot is numpy's matmul of a
fixed-shape tile, which the tests check for the same property.

Why not the FlashAttention-2 split (one kernel per output, each recomputing its logit tiles)? In attention
the accumulated row is a head (64–128 wide) and fits on chip; here it is H = 4096 wide: a [64, 4096] fp32
d(hidden) accumulator is 1 MiB, four times the register file. Tiling the output over H forces every
H tile to recompute the full-H logit tile, so each output costs (1 + H/BH) GEMMs instead of 2: at
H = 4096 and BH = 256 the backward becomes 34 GEMMs (about 590 ms on an H100 at the shape below) where
this design needs 3. Staging d(logits) through a bounded scratch costs 3·N·V bytes of traffic instead.

Cost at V = 128256, H = 4096, N = 16384, bf16, computed (not measured). G = 2·N·V·H = 17.2 TFLOP is one
GEMM. The floor of the forward is 1 G and reading W and h once (1.2 GB); of a backward that recomputes the
logits, 3 G and reading W and h twice and writing dW and dh (2.5 GB). Every tile kernel below streams its
operand tiles from L2 as any tiled GEMM does, N·V·H·2·(1/BM + 1/BN) per G: 403 GB with the 64 × 128 and
128 × 64 tiles of bf16.
  forward   1 G; DRAM: W and h (1.2 GB, plus a W re-read per wave of row tiles that L2 cannot hold) and
            the partial states, 2·4·splits·N·4 bytes (kilobytes to megabytes).
  backward  3 G; DRAM beyond the GEMM floor: d(logits) written once and read by both gradient kernels,
            3·N·V·2 = 12.6 GB (more when a [N, C] chunk outgrows L2), and the fp32 dh read-modify-write,
            about 2·chunks·N·H·4 = 17 GB at C = 4096 (32 chunks, the default 256 MiB budget). About 31 GB
            for 52 TFLOP, ~1700 FLOP/B: compute-bound (an H100's ridge is ~300 FLOP/B), predicted ~55 ms
            at ~1000 TFLOP/s. The design it replaces did 4 G but moved 1.6 TB (fp32 dh and dW read and
            rewritten in every tile of its loops): memory-bound, ~0.5 s at 3.35 TB/s.

Extra memory of the backward (besides its outputs): the d(logits) chunk N·C·e (e = 2 for bf16/fp16,
4 for fp32 or mixed dtypes, 8 for fp64), plus N·H·a for the d(hidden) accumulator (a = 4, or 8 for fp64
math) when C < V and the hidden's dtype is not the accumulator's, plus up to 2·N·a when the incoming row
gradients need a converted copy. C is the largest multiple of the tile width whose total fits the budget,
but at least MIN_CHUNK columns on a GPU (below it the dh read-modify-write would make the chunk
memory-bound), so the budget is exceeded only when N·(MIN_CHUNK·e + H·a) exceeds it. The forward's extra
memory is the partial states, 4·splits·N·a.

Precision: bf16/fp16 operands go into tl.dot as they are, with fp32 accumulation (d(logits) is rounded
to the operand dtype for the gradient dots, as tensor-core kernels do); fp32 dots use TF32 exactly when
torch.backends.cuda.matmul.allow_tf32 is set (what cuBLAS does for the cuda backend), else IEEE fp32;
when hidden and weight differ in dtype, tiles are converted on chip (neither tensor is copied).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ._launch import Launch, run
from .logprobs_from_logits import tanh


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b. UPCAST (interpreter only) widens bf16 operands to fp32 first: the interpreter
    multiplies raw bf16 bit patterns (triton-lang/triton#11584); bf16 products are exact in fp32,
    so the result is what a bf16 dot with fp32 accumulation gives on a GPU."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _as_dot(x, IS_FP64: tl.constexpr, MIXED: tl.constexpr):
    """An operand tile in the dot dtype: fp64 math, or fp32 when hidden and weight differ in dtype."""
    if IS_FP64:
        x = x.to(tl.float64)
    elif MIXED:
        x = x.to(tl.float32)
    return x


@triton.jit
def _zeros(M: tl.constexpr, K: tl.constexpr, IS_FP64: tl.constexpr):
    if IS_FP64:
        z = tl.zeros((M, K), dtype=tl.float64)
    else:
        z = tl.zeros((M, K), dtype=tl.float32)
    return z


@triton.jit
def _row_inv_t(temps_ptr, rows, rmask, inv_t, HAS_TEMPS: tl.constexpr, IS_FP64: tl.constexpr):
    """1/temperature per row [BLOCK_N]: from the per-row temperatures when given, else the scalar's inverse."""
    if HAS_TEMPS:
        return 1.0 / tl.load(temps_ptr + rows, mask=rmask, other=1.0)
    else:
        if IS_FP64:
            return tl.full(rows.shape, 1.0, tl.float64) * inv_t
        else:
            return tl.full(rows.shape, 1.0, tl.float32) * inv_t


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, inv_t, softcap, HAS_BIAS: tl.constexpr,
                 CAP: tl.constexpr, IS_FP64: tl.constexpr, MIXED: tl.constexpr, DOT_PREC: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = cap(h[rows] · W[cols]ᵀ + b[cols]) · inv_t[rows], −inf outside the vocabulary,
    with cap(y) = c·tanh(y/c) when CAP."""
    acc = _zeros(BLOCK_N, BLOCK_V, IS_FP64)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        h = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _mma(_as_dot(h, IS_FP64, MIXED), _as_dot(w, IS_FP64, MIXED), acc, DOT_PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    if CAP:
        acc = softcap * tanh(acc / softcap)
    z = acc * inv_t[:, None]
    return tl.where(cmask[None, :], z, float("-inf"))


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, tok_ptr, part_ptr, temps_ptr, N, V, H, tiles_per_split, inv_t, softcap,
                ignore_index, HAS_BIAS: tl.constexpr, HAS_TEMPS: tl.constexpr, CAP: tl.constexpr,
                IS_FP64: tl.constexpr, MIXED: tl.constexpr, DOT_PREC: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    inv_t = _row_inv_t(temps_ptr, rows, rmask, inv_t, HAS_TEMPS, IS_FP64)
    split = tl.program_id(1).to(tl.int64)
    tok = tl.load(tok_ptr + rows, mask=rmask, other=ignore_index)
    if IS_FP64:
        m = tl.full((BLOCK_N,), float("-inf"), tl.float64)
    else:
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros_like(m)
    w = tl.zeros_like(m)
    tgt = tl.zeros_like(m)
    for t in range(0, tiles_per_split):
        cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, inv_t, softcap, HAS_BIAS, CAP, IS_FP64,
                         MIXED, DOT_PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
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
    out = part_ptr + split * N + rows
    stride = tl.num_programs(1).to(tl.int64) * N
    tl.store(out, m, mask=rmask)
    tl.store(out + stride, s, mask=rmask)
    tl.store(out + 2 * stride, w, mask=rmask)
    tl.store(out + 3 * stride, tgt, mask=rmask)


@triton.jit
def _fwd_merge_kernel(part_ptr, tok_ptr, logp_ptr, ent_ptr, lse_ptr, N, V, splits, ignore_index,
                      BLOCK: tl.constexpr):
    """Folds the splits' partial states, in split order, into log-prob, entropy and log-sum-exp."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    stride = splits * N
    m = tl.load(part_ptr + rows, mask=rmask, other=float("-inf"))
    s = tl.load(part_ptr + stride + rows, mask=rmask, other=0.0)
    w = tl.load(part_ptr + 2 * stride + rows, mask=rmask, other=0.0)
    tgt = tl.load(part_ptr + 3 * stride + rows, mask=rmask, other=0.0)
    for k in range(1, splits):
        p = part_ptr + k * N + rows
        m2 = tl.load(p, mask=rmask, other=float("-inf"))
        s2 = tl.load(p + stride, mask=rmask, other=0.0)
        w2 = tl.load(p + 2 * stride, mask=rmask, other=0.0)
        tgt += tl.load(p + 3 * stride, mask=rmask, other=0.0)  # 0 in every split but the target's
        m_new = tl.maximum(m, m2)
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        a1 = tl.exp(m - base)
        a2 = tl.exp(m2 - base)
        w = (w + s * tl.where(s > 0, m - base, 0.0)) * a1 + (w2 + s2 * tl.where(s2 > 0, m2 - base, 0.0)) * a2
        s = s * a1 + s2 * a2
        m = m_new
    tok = tl.load(tok_ptr + rows, mask=rmask, other=ignore_index)
    log_s = tl.log(s)
    lse = m + log_s
    valid = tok != ignore_index
    in_range = (tok >= 0) & (tok < V)
    tl.store(logp_ptr + rows, tl.where(valid, tl.where(in_range, tgt - lse, float("nan")), 0.0), mask=rmask)
    tl.store(ent_ptr + rows, tl.where(valid, log_s - w / s, 0.0), mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)


@triton.jit
def _bwd_dlogits_kernel(h_ptr, w_ptr, b_ptr, tok_ptr, glp_ptr, gent_ptr, lse_ptr, ent_ptr, dz_ptr, temps_ptr, N, V, H,
                        c0, C, inv_t, softcap, ignore_index, HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr,
                        HAS_TEMPS: tl.constexpr, CAP: tl.constexpr, IS_FP64: tl.constexpr,
                        MIXED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """dz[:, c] = d(g1·logp + g2·entropy)/d(logits[:, c0 + c]) (csrc/common.h logprob_entropy_grad, / T, times
    the softcap's 1 − (cap/c)²)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    inv_t = _row_inv_t(temps_ptr, rows, rmask, inv_t, HAS_TEMPS, IS_FP64)
    cc = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = c0 + cc
    cmask = cols < V
    tok = tl.load(tok_ptr + rows, mask=rmask, other=ignore_index)
    live = rmask & (tok != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
    g1 = tl.where(live & (tok >= 0) & (tok < V), tl.load(glp_ptr + rows, mask=rmask, other=0.0), 0.0)
    if HAS_GENT:
        g2 = tl.where(live, tl.load(gent_ptr + rows, mask=rmask, other=0.0), 0.0)
    else:
        g2 = tl.zeros_like(g1)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, H, inv_t, softcap, HAS_BIAS, CAP, IS_FP64, MIXED,
                     DOT_PREC, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
    # rows past N and ignored rows get p = 0 before any product: their logits (b / T from a zero hidden
    # row) can overflow exp, and 0·inf would be NaN
    lp = tl.where(live[:, None], z - lse[:, None], float("-inf"))
    p = tl.exp(lp)
    pe = p * tl.where(p > 0, lp + ent[:, None], 0.0)  # p·log p → 0 for −inf logits
    is_tok = cols[None, :] == tok[:, None]
    dz = (g1[:, None] * (tl.where(is_tok, 1.0, 0.0) - p) - g2[:, None] * pe) * inv_t[:, None]
    if CAP:  # z = cap·inv_t, so cap/c = z/(inv_t·c); −inf columns past V get 0
        u = tl.where(cmask[None, :], z / (inv_t[:, None] * softcap), 0.0)
        dz = dz * (1.0 - u * u)
    tl.store(dz_ptr + rows[:, None] * C + cc[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=rmask[:, None] & (cc < C)[None, :])


@triton.jit
def _bwd_dw_kernel(dz_ptr, h_ptr, dw_ptr, db_ptr, N, V, H, c0, C, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                   IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """dW[c0 + c] = Σ_rows dz[row, c]·h[row] and db[c0 + c] = Σ_rows dz[row, c], summed on chip in row order."""
    cc = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = c0 + cc
    cmask = (cols < V) & (cc < C)
    ks = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    kmask = ks < H
    acc = _zeros(BLOCK_V, BLOCK_H, IS_FP64)
    if IS_FP64:
        db = tl.zeros((BLOCK_V,), dtype=tl.float64)
    else:
        db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
        dzt = tl.load(dz_ptr + rows[None, :] * C + cc[:, None], mask=cmask[:, None] & rmask[None, :], other=0.0)
        if NEED_B:
            db += tl.sum(dzt.to(db.dtype), 1)
        if NEED_W:
            h = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc = _mma(dzt, h.to(dzt.dtype), acc, DOT_PREC, UPCAST)
    if NEED_W:
        tl.store(dw_ptr + cols[:, None] * H + ks[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=cmask[:, None] & kmask[None, :])
    if NEED_B:
        if tl.program_id(1) == 0:
            tl.store(db_ptr + cols, db, mask=cmask)


@triton.jit
def _bwd_dh_kernel(dz_ptr, w_ptr, acc_ptr, dh_ptr, N, V, H, c0, C, width, ACCUMULATE: tl.constexpr,
                   IS_FP64: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr):
    """dh[rows] = (acc[rows] if ACCUMULATE) + Σ_c dz[rows, c]·W[c0 + c], summed on chip in column order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ks = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    kmask = ks < H
    omask = rmask[:, None] & kmask[None, :]
    if ACCUMULATE:
        acc = tl.load(acc_ptr + rows[:, None] * H + ks[None, :], mask=omask, other=0.0)  # fp32 (fp64)
    else:
        acc = _zeros(BLOCK_N, BLOCK_H, IS_FP64)
    for v0 in range(0, width, BLOCK_V):  # the chunk's columns: C but in the last chunk
        cc = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cols = c0 + cc
        cmask = (cols < V) & (cc < C)
        dz = tl.load(dz_ptr + rows[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = _mma(dz, w.to(dz.dtype), acc, DOT_PREC, UPCAST)
    tl.store(dh_ptr + rows[:, None] * H + ks[None, :], acc.to(dh_ptr.dtype.element_ty), mask=omask)


# ---- launch plans --------------------------------------------------------------------------------------

class Config(NamedTuple):
    """One selectable compile configuration of a kernel: its tile constexprs (and dot precision), warps, stages."""
    kernel: str
    tiles: tuple          # ((constexpr name, value), ...), sorted by name
    num_warps: int
    num_stages: int | None


def _cfg(kernel, warps, stages, **tiles):
    return Config(kernel.__name__, tuple(sorted(tiles.items())), warps, stages)


# Shared memory per block (KB) is 163 on sm_80/87, 99 on sm_86/89/120, 227 on sm_90/100: "big" arches get
# larger tiles. Pipelined operand buffers take stages·(BM + BN)·BK·e bytes; the GPU report (make gpu-report)
# compiles every config below for sm_80/86/89/90 and checks it fits. Register pressure, not shared memory,
# bounds the logit-tile kernels: their [BN, BV] fp32 tile and its softmax terms live in registers, so 16-bit
# operands use 64 × 128 (128 × 64) tiles over 8 warps: 128 × 128 spilled hundreds of bytes per thread on sm_80.
def _big_smem(arch):
    return arch in (80, 87) or 90 <= arch < 120


# (logit tile BN, BV, BH, warps, stages), (dW tile BV, BH, BN-step, warps, stages), (dh tile BN, BH, BV-step, ...)
_TILES = {
    (2, True): ((64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 64, 64, 8, 3)),
    (2, False): ((64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 64, 64, 8, 3)),
    (4, True): ((64, 128, 32, 8, 3), (128, 128, 32, 8, 3), (128, 128, 32, 8, 3)),
    (4, False): ((64, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 64, 32, 4, 3)),
    (8, True): ((32, 64, 32, 4, 2), (64, 64, 16, 4, 2), (64, 64, 16, 4, 2)),
    (8, False): ((32, 64, 32, 4, 2), (64, 64, 16, 4, 2), (64, 64, 16, 4, 2)),
}
_INTERP_TILES = ((16, 32, 16, 4, None), (32, 16, 16, 4, None), (16, 16, 32, 4, None))
_MERGE_BLOCK = 256
MIN_CHUNK = 4096  # vocabulary columns per backward chunk on a GPU (see the module docstring)
# SMs per arch (A100, A6000/3090, L40S/4090, H100, B200, RTX 5090) for the forward's split count; a table,
# not the device's own count, so that results on one arch do not depend on the SKU
_SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 170}


def _precisions(dot_bytes, allow_tf32):
    if dot_bytes != 4:
        return ("ieee",)
    if allow_tf32 is None:
        return ("ieee", "tf32")
    return ("tf32",) if allow_tf32 else ("ieee",)


def _kernel_configs(dot_bytes, arch, prec):
    """(logits, dW, dh, merge) Configs for one dot element size, arch (None: the interpreter), precision."""
    zt, wt, ht = _INTERP_TILES if arch is None else _TILES[dot_bytes, _big_smem(arch)]
    logits = dict(BLOCK_N=zt[0], BLOCK_V=zt[1], BLOCK_H=zt[2], DOT_PREC=prec)
    return (
        (_cfg(_fwd_kernel, zt[3], zt[4], **logits), _cfg(_bwd_dlogits_kernel, zt[3], zt[4], **logits)),
        _cfg(_bwd_dw_kernel, wt[3], wt[4], BLOCK_V=wt[0], BLOCK_H=wt[1], BLOCK_N=wt[2], DOT_PREC=prec),
        _cfg(_bwd_dh_kernel, ht[3], ht[4], BLOCK_N=ht[0], BLOCK_H=ht[1], BLOCK_V=ht[2], DOT_PREC=prec),
        _cfg(_fwd_merge_kernel, 4, None, BLOCK=_MERGE_BLOCK),
    )


def configs(dtype, arch):
    """Every configuration the launchers can select for operands of `dtype` (the dot dtype: torch.float32
    also covers mixed hidden/weight dtypes) on compute capability `arch` (80, 90, ...; None: the
    interpreter), as _launch.uses reads them. fp32 lists both its IEEE and TF32 variants."""
    out = []
    for prec in _precisions(dtype.itemsize, None):
        (fwd, dlog), dw, dh, merge = _kernel_configs(dtype.itemsize, arch, prec)
        out += [fwd, dlog, dw, dh, merge]
    return [dict(kernel=c.kernel, **dict(c.tiles), num_warps=c.num_warps,
                 **({} if c.num_stages is None else {"num_stages": c.num_stages}))
            for c in dict.fromkeys(out)]


def _arch(tensor, arch):
    """Compute capability as an int (80, 90, ...) or None for the interpreter."""
    if arch is not None:
        return int(arch)
    if tensor.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(tensor.device)
        return major * 10 + minor
    if tensor.device.type == "cpu" and interpreting():
        return None
    raise ValueError(f"arch is required to plan launches for tensors on {tensor.device} (e.g. arch=90)")


def _setup(hidden, weight, acc_dtype, arch, allow_tf32):
    """(N, H, V, arch, dot dtype, mixed dtypes?, constexprs common to the kernels, Configs) for these operands;
    arch resolved as _arch does."""
    arch = _arch(hidden, arch)
    fp64 = acc_dtype == torch.float64
    mixed = hidden.dtype != weight.dtype
    dot = torch.float64 if fp64 else (torch.float32 if mixed else hidden.dtype)
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    prec = _precisions(dot.itemsize, allow_tf32)[0]
    common = dict(IS_FP64=fp64, DOT_PREC=prec, UPCAST=arch is None and dot == torch.bfloat16)
    return (*hidden.shape, weight.shape[0], arch, dot, mixed, common, _kernel_configs(dot.itemsize, arch, prec))


def _launch(cfg, kernel, grid, args, **flags):
    return Launch(kernel, grid, args, {**dict(cfg.tiles), **flags}, cfg.num_warps, cfg.num_stages)


def forward_splits(N, V, block_n, block_v, arch, batch_invariant=False):
    """(splits, vocabulary tiles per split) of the forward: about two waves of the arch's SMs (the
    interpreter pretends to have 2 SMs, so small test shapes take the multi-split path). batch_invariant:
    one wave's worth whatever N is (a row's fold over the splits must not depend on the row count)."""
    sms = 2 if arch is None else _SM_COUNT.get(arch, 132)
    v_tiles = triton.cdiv(V, block_v)
    if batch_invariant:
        splits = min(v_tiles, sms)
    else:
        splits = min(v_tiles, max(1, triton.cdiv(2 * sms, triton.cdiv(N, block_n))))
    per = triton.cdiv(v_tiles, splits)
    return triton.cdiv(v_tiles, per), per


def plan_fwd(hidden, weight, bias, tokens, logp, entropy, lse, temperature=1.0, ignore_index=-100, temperatures=None,
             softcap=0.0, batch_invariant=False, *, arch=None, allow_tf32=None):
    """The launches of the forward for these (possibly meta) tensors: hidden [N, H], weight [V, H], bias [V]
    or None, tokens [N] int64, and the outputs logp, entropy, lse [N] (float32, or float64 for fp64 math).
    Allocates the [4, splits, N] partial-state buffer on hidden's device. `arch`: compute capability
    (None: from hidden's device); `allow_tf32` (None: torch.backends.cuda.matmul.allow_tf32);
    batch_invariant: a split count that does not depend on N (forward_splits)."""
    N, H, V, arch, _, mixed, common, ((cfg, _), _, _, merge) = _setup(hidden, weight, lse.dtype, arch, allow_tf32)
    if N == 0:
        return []
    tiles = dict(cfg.tiles)
    splits, per = forward_splits(N, V, tiles["BLOCK_N"], tiles["BLOCK_V"], arch, batch_invariant)
    part = torch.empty((4, splits, N), dtype=lse.dtype, device=hidden.device)
    return [
        _launch(cfg, _fwd_kernel, (triton.cdiv(N, tiles["BLOCK_N"]), splits),
                (hidden, weight, bias if bias is not None else lse, tokens, part,
                 lse if temperatures is None else temperatures, N, V, H, per, 1.0 / temperature, softcap or 1.0,
                 ignore_index), HAS_BIAS=bias is not None, HAS_TEMPS=temperatures is not None, CAP=bool(softcap),
                MIXED=mixed, **common),
        _launch(merge, _fwd_merge_kernel, (triton.cdiv(N, _MERGE_BLOCK),),
                (part, tokens, logp, entropy, lse, N, V, splits, ignore_index)),
    ]


def chunk_columns(N, V, H, dot_bytes, accumulator_bytes, budget, granule, min_cols):
    """Vocabulary columns per backward chunk: all of V (rounded up to `granule`) when its [N, V] d(logits)
    fits `budget` bytes, else the largest multiple of `granule` that fits next to the [N, H] d(hidden)
    accumulator (`accumulator_bytes` per element, 0 when none is needed), but at least `min_cols`."""
    v_pad = triton.cdiv(V, granule) * granule
    if N * v_pad * dot_bytes <= budget:
        return v_pad
    room = budget - N * H * accumulator_bytes
    cols = max(room, 0) // max(N * dot_bytes, 1) // granule * granule
    return min(v_pad, max(min_cols, granule, cols))


def plan_bwd(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, grad_hidden, grad_weight,
             grad_bias, temperature=1.0, ignore_index=-100, budget=256 << 20, temperatures=None, softcap=0.0, *,
             arch=None, allow_tf32=None):
    """The launches of the backward for these (possibly meta) tensors. grad_logp, grad_entropy (or None):
    [N] in lse's dtype; grad_hidden [N, H] / grad_weight [V, H] / grad_bias [V] are the outputs to fill, or
    None when not wanted (no work is planned for them). Allocates the d(logits) chunk and, when needed, the
    fp32 d(hidden) accumulator on hidden's device, within `budget` bytes as the module docstring says."""
    N, H, V, arch, dot, mixed, common, ((_, zcfg), wcfg, hcfg, _) = _setup(hidden, weight, lse.dtype, arch,
                                                                           allow_tf32)
    if N == 0:
        return []
    zt, wt, ht = dict(zcfg.tiles), dict(wcfg.tiles), dict(hcfg.tiles)
    granule = max(zt["BLOCK_V"], wt["BLOCK_V"], ht["BLOCK_V"])
    need_acc = grad_hidden is not None and grad_hidden.dtype != lse.dtype
    C = chunk_columns(N, V, H, dot.itemsize, lse.element_size() if need_acc else 0, budget, granule,
                      granule if arch is None else MIN_CHUNK)
    dz = torch.empty((N, C), dtype=dot, device=hidden.device)
    chunks = range(0, V, C)
    dh_acc = grad_hidden
    if need_acc and len(chunks) > 1:
        dh_acc = torch.empty((N, H), dtype=lse.dtype, device=hidden.device)
    inv_t = 1.0 / temperature
    plan = []
    for i, c0 in enumerate(chunks):
        width = min(C, V - c0)
        plan.append(_launch(
            zcfg, _bwd_dlogits_kernel, (triton.cdiv(N, zt["BLOCK_N"]), triton.cdiv(width, zt["BLOCK_V"])),
            (hidden, weight, bias if bias is not None else lse, tokens, grad_logp,
             grad_entropy if grad_entropy is not None else grad_logp, lse, entropy, dz,
             lse if temperatures is None else temperatures, N, V, H, c0, C, inv_t, softcap or 1.0, ignore_index),
            HAS_BIAS=bias is not None, HAS_GENT=grad_entropy is not None, HAS_TEMPS=temperatures is not None,
            CAP=bool(softcap), MIXED=mixed, **common))
        if grad_weight is not None or grad_bias is not None:
            h_tiles = triton.cdiv(H, wt["BLOCK_H"]) if grad_weight is not None else 1
            plan.append(_launch(
                wcfg, _bwd_dw_kernel, (triton.cdiv(width, wt["BLOCK_V"]), h_tiles),
                (dz, hidden, grad_weight if grad_weight is not None else dz,
                 grad_bias if grad_bias is not None else lse, N, V, H, c0, C),
                NEED_W=grad_weight is not None, NEED_B=grad_bias is not None, IS_FP64=common["IS_FP64"],
                UPCAST=common["UPCAST"]))
        if grad_hidden is not None:
            last = i == len(chunks) - 1
            plan.append(_launch(
                hcfg, _bwd_dh_kernel, (triton.cdiv(N, ht["BLOCK_N"]), triton.cdiv(H, ht["BLOCK_H"])),
                (dz, weight, dh_acc, grad_hidden if last else dh_acc, N, V, H, c0, C, width),
                ACCUMULATE=i > 0, IS_FP64=common["IS_FP64"], UPCAST=common["UPCAST"]))
    return plan


# ---- launchers -------------------------------------------------------------------------------------------

def acc_dtype(hidden, weight, bias):
    """float64 when any operand is float64, else float32: the dtype of the per-row outputs."""
    return torch.float64 if torch.float64 in {t.dtype for t in (hidden, weight, bias) if t is not None} \
        else torch.float32


def linear_logprobs_fwd(hidden, weight, bias, tokens, temperature, ignore_index, temperatures=None, softcap=0.0,
                        batch_invariant=False):
    N = hidden.shape[0]
    acc = acc_dtype(hidden, weight, bias)
    logp, ent, lse = (torch.empty(N, dtype=acc, device=hidden.device) for _ in range(3))
    run(plan_fwd(hidden, weight, bias, tokens, logp, ent, lse, temperature, ignore_index, temperatures, softcap,
                 batch_invariant), hidden.device)
    return logp, ent, lse


def linear_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature,
                        ignore_index, need_hidden, need_weight, need_bias, budget, temperatures=None, softcap=0.0,
                        batch_invariant=False):
    # batch_invariant needs nothing here: the backward is batch-invariant in every mode (module docstring)
    N, H = hidden.shape
    V = weight.shape[0]
    acc = lse.dtype
    new = torch.zeros if N == 0 else torch.empty  # no rows: zero weight and bias gradients
    gh = torch.empty(hidden.shape if need_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    gw = new(weight.shape if need_weight else (0,), dtype=weight.dtype, device=weight.device)
    gb = new((V,) if need_bias else (0,), dtype=acc, device=hidden.device)
    glp = grad_logp.to(acc).contiguous()
    gent = grad_entropy.to(acc).contiguous() if grad_entropy is not None else None
    plan = plan_bwd(glp, gent, hidden, weight, bias, tokens, lse, entropy, gh if need_hidden else None,
                    gw if need_weight else None, gb if need_bias else None, temperature, ignore_index, budget,
                    temperatures, softcap)
    run(plan, hidden.device)
    return gh, gw, gb
