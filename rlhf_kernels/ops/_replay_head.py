"""linear_logprobs with the sampler replay (top_k / top_p): the head in blocks of rows over the whole vocabulary.

A row's kept set needs its whole row of logits (the k-th largest value, the cumulative mass of the sorted
survivors), so instead of the plain head's rows × vocabulary tiles this path takes blocks of nc rows × all V
columns, nc chosen so that a block and its gradient fit the temporaries budget B (at least one row):

  forward   per block: Z = h·Wᵀ (+ b), one GEMM; then the backend's logprobs_from_logits threshold op
            (bisection over Z's row, which is in memory) and its forward cut at the threshold.
            One pass over the head, like the plain forward; saved per row: lse, entropy, threshold.
  backward  per block: Z recomputed by the same GEMM call (bitwise the same, so every logit is on the same
            side of its threshold), d(Z) from the backend's logprobs_from_logits backward, then
            d(hidden) = d(Z)·W and d(W) += d(Z)ᵀ·h, d(b) += Σ d(Z). One pass over the head, like the plain backward.

Extra memory: one block of logits and one of its gradient, 2·nc·V·a ≤ B (a = 4, 8 for float64), and for
bf16/fp16 inputs an fp32 copy of the weight (V·H·4) and of each block's hidden rows.

batch_invariant=True: the three products run in the backend's fixed_gemm (_fixed_gemm.py), whose order of
operations depends on H or V alone, instead of BLAS / cuBLAS, which choose their algorithm from the shapes (so
from the block's row count); the bias is added elementwise; the threshold and the cut are per row already, and
get batch_invariant=True for the backends whose logits kernels need it (cuda). d(W) then takes one more [V, H]
temporary per block and a transposed copy of the block's d(logits).
The threshold costs a few passes over each row in memory (CPU: a selection per cut; CUDA and Triton: a
bisection, ≤ 33 passes per cut in fp32, 65 in fp64); BENCHMARKS.md measures the whole (1.7–2.3× the plain head
on CPU).
"""
import torch

from ._fixed_gemm import fixed_gemm
from .logprobs_from_logits import threshold_op


def _ops(name):
    t = "_triton" if name == "triton" else ""
    ops = torch.ops.rlhf_kernels
    return (threshold_op(name), getattr(ops, "logprobs_from_logits_fwd" + t),
            getattr(ops, "logprobs_from_logits_bwd" + t))


def _block_rows(V, acc, budget):
    a = 8 if acc == torch.float64 else 4
    return max(1, budget // (2 * V * a))


def _logits(h, w, b, invariant, backend):
    if invariant:
        z = fixed_gemm(h, w, True, backend)
        return z if b is None else z.add_(b)
    return h @ w.T if b is None else torch.addmm(b, h, w.T)


def _take(x, i, j):
    return None if x is None else x[i:j]


class ReplayHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, ignore_index, temps, softcap, top_k, top_p,
                return_entropy, backend, budget, invariant):
        acc = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) or (
            bias is not None and bias.dtype == torch.float64) else torch.float32
        thresh, fwd, _ = _ops(backend)
        w = weight.to(acc)
        b = None if bias is None else bias.to(acc)
        N, V = hidden.shape[0], weight.shape[0]
        nc = _block_rows(V, acc, budget)
        logp, ent, lse, thr = (hidden.new_empty(N, dtype=acc) for _ in range(4))
        for i in range(0, N, nc):
            j = min(N, i + nc)
            z = _logits(hidden[i:j].to(acc), w, b, invariant, backend)
            tk, tp, tt = _take(top_k, i, j), _take(top_p, i, j), _take(temps, i, j)
            th = thresh(z, tokens[i:j], temperature, ignore_index, tt, softcap, tk, tp)
            lp, en, ls = fwd(z, tokens[i:j], temperature, ignore_index, True, tt, softcap, invariant, th)
            logp[i:j], ent[i:j], lse[i:j], thr[i:j] = lp, en, ls, th
        ctx.save_for_backward(hidden, weight, bias, tokens, temps, lse, ent, thr)
        ctx.args = (temperature, ignore_index, softcap, backend, nc, acc, invariant)
        ctx.mark_non_differentiable(thr)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, tokens, temps, lse, ent, thr = ctx.saved_tensors
        temperature, ignore_index, softcap, backend, nc, acc, invariant = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 11
        if g_logp is None and g_ent is None:
            return (None, None, None) + none
        _, _, bwd = _ops(backend)
        w = weight.to(acc)
        b = None if bias is None else bias.to(acc)
        N = hidden.shape[0]
        gh = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None else None
        for i in range(0, N, nc):
            j = min(N, i + nc)
            h = hidden[i:j].to(acc)
            z = _logits(h, w, b, invariant, backend)
            d = bwd(None if g_logp is None else g_logp[i:j].contiguous(),
                    None if g_ent is None else g_ent[i:j].contiguous(), z, tokens[i:j], lse[i:j], ent[i:j],
                    temperature, ignore_index, _take(temps, i, j), softcap, invariant, thr[i:j])
            if gh is not None:
                gh[i:j] = fixed_gemm(d, w, False, backend) if invariant else d @ w
            if gw is not None:
                if invariant:
                    gw += fixed_gemm(d.T, h, False, backend)
                else:
                    gw.addmm_(d.T, h)
            if gb is not None:
                gb += d.sum(0)
        return (None if gh is None else gh.to(hidden.dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype)) + none
