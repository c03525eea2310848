"""rk.linear_logprobs: log-probs (and entropy) of given tokens straight from hidden states and the
LM head, equal to logprobs_from_logits(hidden @ weight.T + bias, tokens, ...), without ever holding
a [..., V] tensor, forward or backward.

The fast backends save only hidden, weight, bias, tokens and three floats per row (log-prob,
entropy, log-sum-exp); backward recomputes the logits tile by tile. Environment:
  RLHF_KERNELS_CHUNK_BYTES   B, the bound on the temporaries of the cpu, cuda and triton backends (default 256 MiB)

Extra memory of the cpu and cuda backends, exactly: the bytes a forward or a backward pass allocates
beyond its inputs and outputs (logp, entropy, lse; the gradients), not counting the BLAS library's
own workspace. With a = 4 (8 for float64 inputs), s = 2 for bf16/fp16 inputs (low) and a otherwise,
[c] = 1 if c holds else 0, h/w/b = a gradient of hidden/weight/bias is computed, and the chunk plan
nc × vc (rows × vocabulary entries of a logits chunk) and G (CPU groups running in parallel) that
csrc/linear_logprobs_plan.h picks:

  cpu  forward   5·N·a + 3·(G−1)·N·a + G·a·(nc·vc + [low]·(nc + vc)·H)
  cpu  backward  N·a + [low∧h]·N·H·a + (G−1)·[h]·N·H·a + G·a·(nc·vc + [low]·(nc + vc)·H + [low∧w]·vc·H)
  cuda forward   5·N·a + nc·vc·a
  cuda backward  N·a + [low∧h]·4·N·H + nc·vc·(a + [low]·s) + [low∧w]·4·vc·H·(1 + [N > nc])
                 + [low∧h]·4·nc·H + [b ∧ N > nc]·vc·a

The plan keeps all of it within B except the per-row terms, which are not chunked and come on
top: 4·N·a forward (the first group's log-sum-exp state and target logits), N·a in both passes (one
inverse temperature per row) and, for bf16/fp16 with a hidden gradient, the fp32 d(hidden) accumulator
4·N·H backward (twice the size of d(hidden) itself).
A budget too small for even a 1 × 1 chunk gets a 1 × 1 chunk. Contiguous inputs of one dtype reach
the kernels without a copy.

Two terms come on top of these, outside the kernels: with ignored rows, the compaction's copy of the
valid rows of hidden (n·H elements for n valid rows) and, backward, the scatter of d(hidden) back to all
N rows (autograd's index_select backward, N·H); the kernels' inverse temperature per row is in the formulas above.

The triton backend's extra memory (its d(logits) chunk and d(hidden) accumulator, with the floor
that keeps GPU chunks from becoming memory-bound) is stated in rlhf_kernels/triton/linear_logprobs.py.
"""

import torch

from .. import reference
from . import _head, vocab_parallel
from ._common import (
    HAVE_C,
    HAVE_TRITON,
    backend_for,
    bool_arg,
    float_tensor,
    int_tensor,
    same_device,
    softcap_arg,
    temperature_arg,
    top_k_arg,
    top_p_arg,
)
from ._head import DEFAULT_CHUNK_BYTES, chunk_bytes  # noqa: F401  (the budget's home before _head.py)
from ._replay_head import ReplayHead
from .logprobs_from_logits import check_tokens

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())

def linear_logprobs(hidden, weight, tokens, *, bias=None, temperature=1.0, softcap=None, ignore_index=-100,
                    return_entropy=False, validate=True, backend=None, top_k=None, top_p=None, batch_invariant=False,
                    process_group=None, vocab_offset=None):
    """hidden[..., H], weight[V, H], tokens[...], bias[V] -> logp[...] (and entropy[...]).

    log_softmax(cap(hidden @ weight.T + bias) / temperature)[tokens], float32 (float64 for float64
    inputs), with cap(z) = softcap·tanh(z/softcap) when softcap is given (Gemma-2), else z. temperature is
    a number or a tensor broadcastable to tokens.shape (one per token), > 0, and takes no gradient.
    Positions whose token is ignore_index give 0 and no gradient, and cost nothing: their rows are left out
    of every GEMM (compacted away first; on CUDA tensors only when validate=True, since counting them syncs
    with the device). Differentiable in hidden, weight and bias (and through the entropy); a weight with
    requires_grad=False gets no gradient GEMM. bf16/fp16 inputs accumulate in fp32.

    top_k, top_p: the sampler replay, exactly as in rk.logprobs_from_logits (a token outside its kept set gets
    −inf and no gradient; mask it before a loss). It runs the head in blocks of rows over the whole vocabulary
    (one pass forward, one backward; rlhf_kernels/ops/_replay_head.py states the passes and the memory).
    They compose with batch_invariant=True (the replay's products then run in fixed-order GEMMs).

    batch_invariant=True: each position's log-prob, entropy and row of the hidden gradient are bitwise the
    same whatever else is in the batch (its position, the batch size, the other rows' contents, ignored
    rows); the weight and bias gradients stay deterministic run to run. Every backend gets it by
    construction, not by luck: no reduction whose order depends on the number of rows (docs/batch_invariant.md
    says how each backend does it, and what it costs).

    Vocabulary-parallel head: with process_group, weight (and bias) hold this rank's rows [vocab_offset,
    vocab_offset + V_r) of the vocabulary (vocab_offset defaults to rank·V_r, the even split), tokens are global
    ids, and every rank gets the outputs of the whole vocabulary (the same bits on every rank); backward gives each
    rank its own weight and bias shard's gradient and the whole hidden gradient (summed over the group). The
    communication per call and what composes are in rlhf_kernels/ops/vocab_parallel.py.
    """
    float_tensor("hidden", hidden, ndim_min=1)
    float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    int_tensor("tokens", tokens)
    if tuple(tokens.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"tokens must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {tuple(tokens.shape)}")
    if bias is not None:
        float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    device = same_device(hidden=hidden, weight=weight, tokens=tokens, bias=bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    dt = reference.compute_dtype(hidden, weight, bias)
    temperature, temps = temperature_arg(temperature, tokens, dt, validate)
    cap = softcap_arg(softcap)
    ks = top_k_arg(top_k, tokens, validate)
    ps = top_p_arg(top_p, tokens, dt, validate)
    invariant = bool_arg("batch_invariant", batch_invariant)
    if process_group is not None or vocab_offset is not None:
        if ks is not None or ps is not None:
            vocab_parallel.not_composable("top_k/top_p")
        if invariant:
            vocab_parallel.not_composable("batch_invariant")
        name = backend_for(backend, device, "linear_logprobs", IMPLEMENTED)
        return vocab_parallel.linear_logprobs(hidden, weight, tokens, bias, temperature, temps, cap, ignore_index,
                                              bool(return_entropy), validate, name, process_group, vocab_offset)
    check_tokens(tokens, weight.shape[0], ignore_index, validate)
    name = backend_for(backend, device, "linear_logprobs", IMPLEMENTED)
    if name == "reference":
        return reference.linear_logprobs(hidden, weight, tokens, bias, temperature if temps is None else temps,
                                         ignore_index, bool(return_entropy), softcap, ks, ps, invariant)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    w = weight
    b = None if bias is None else bias.to(dt).contiguous()
    tok = tokens.reshape(-1).to(torch.int64).contiguous()
    temps = None if temps is None else temps.reshape(-1)
    ks = None if ks is None else ks.reshape(-1)
    ps = None if ps is None else ps.reshape(-1)
    # only the valid rows enter the GEMMs; the others are scattered back as zeros
    keep, tok, h, temps, ks, ps = _head.compact(tok, ignore_index, validate, h, temps, ks, ps)
    if ks is not None or ps is not None:
        logp, ent = ReplayHead.apply(h.contiguous(), w.contiguous(), b, tok, temperature, ignore_index, temps, cap,
                                     ks, ps, bool(return_entropy), name, chunk_bytes(), invariant)
    elif name == "triton":
        # hidden and weight go in as they are: the kernels convert tiles on chip when their dtypes differ
        logp, ent, _ = torch.ops.rlhf_kernels.linear_logprobs_fwd_triton(
            h.contiguous(), w.contiguous(), b, tok, temperature, ignore_index, chunk_bytes(), temps, cap, invariant)
    else:
        store = _head.storage_dtype(dt, hidden, weight)
        h = h.to(store).contiguous()
        w = w.to(store).contiguous()
        logp, ent, _ = torch.ops.rlhf_kernels.linear_logprobs_fwd(h, w, b, tok, temperature, ignore_index,
                                                                  chunk_bytes(), temps, cap, invariant)
    logp, ent = _head.expand(keep, tokens.numel(), logp, ent)
    logp = logp.view(tokens.shape)
    return (logp, ent.view(tokens.shape)) if return_entropy else logp


def _fake_fwd(hidden, weight, bias, tokens, temperature, ignore_index, *rest):
    dt = reference.compute_dtype(hidden, weight, bias)
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=dt) for _ in range(3))


def _fake_bwd(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy, temperature, ignore_index,
              need_hidden, need_weight, need_bias, *rest):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            lse.new_empty(bias.shape if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, ignore_index = inputs[:6]
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.extra = tuple(inputs[6:])  # the chunk budget, the per-row temperatures, the softcap, batch_invariant
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zero tensor


def _backward_with(bwd_op):
    def backward(ctx, grad_logp, grad_entropy, grad_lse):
        hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:  # only the log-sum-exp was used: it has no gradient
            return (None,) * (6 + len(ctx.extra))
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        gh, gw, gb = bwd_op(grad_logp.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
                            hidden, weight, bias, tokens, lse, entropy, ctx.temperature, ctx.ignore_index,
                            need_h, need_w, need_b and bias is not None, *ctx.extra)
        grads = (gh if need_h else None, gw if need_w else None, gb if need_b and bias is not None else None)
        return grads + (None,) * (3 + len(ctx.extra))
    return backward


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::linear_logprobs_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::linear_logprobs_bwd")(_fake_bwd)
    torch.library.register_autograd("rlhf_kernels::linear_logprobs_fwd",
                                    _backward_with(torch.ops.rlhf_kernels.linear_logprobs_bwd),
                                    setup_context=_setup_context)

if HAVE_TRITON:
    from ..triton import linear_logprobs as _tl

    @torch.library.triton_op("rlhf_kernels::linear_logprobs_fwd_triton", mutates_args=())
    def _linear_logprobs_fwd_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                    tokens: torch.Tensor, temperature: float, ignore_index: int,
                                    budget: int, temperatures: torch.Tensor | None = None,
                                    softcap: float = 0.0,
                                    batch_invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tl.linear_logprobs_fwd(hidden, weight, bias, tokens, temperature, ignore_index, temperatures, softcap,
                                       batch_invariant)

    @torch.library.triton_op("rlhf_kernels::linear_logprobs_bwd_triton", mutates_args=())
    def _linear_logprobs_bwd_triton(grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, hidden: torch.Tensor,
                                    weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                                    lse: torch.Tensor, entropy: torch.Tensor, temperature: float, ignore_index: int,
                                    need_hidden: bool, need_weight: bool, need_bias: bool,
                                    budget: int, temperatures: torch.Tensor | None = None,
                                    softcap: float = 0.0,
                                    batch_invariant: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tl.linear_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, tokens, lse, entropy,
                                       temperature, ignore_index, need_hidden, need_weight, need_bias, budget,
                                       temperatures, softcap, batch_invariant)

    _linear_logprobs_fwd_triton.register_fake(_fake_fwd)
    _linear_logprobs_bwd_triton.register_fake(_fake_bwd)
    _linear_logprobs_fwd_triton.register_autograd(
        _backward_with(torch.ops.rlhf_kernels.linear_logprobs_bwd_triton), setup_context=_setup_context)
