"""rk.logprobs_from_logits: log-probs (and entropy) of given tokens from logits, temperature-scaled."""
import torch

from .. import reference
from . import vocab_parallel
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

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def check_tokens(tokens, V, ignore_index, validate):
    """Token ids must lie in [0, V) or equal ignore_index; this check syncs with the device,
    so hot loops pass validate=False (out-of-range ids then give NaN) and compiled code skips it."""
    if validate and tokens.numel() and not torch.compiler.is_compiling():
        bad = ((tokens < 0) | (tokens >= V)) & (tokens != ignore_index)
        if bool(bad.any()):
            first = tokens[bad][0].item()
            raise ValueError(f"tokens must lie in [0, {V}) or equal ignore_index={ignore_index}; found {first} "
                             "(pass validate=False to get NaN at such positions instead of this check)")


def logprobs_from_logits(logits, tokens, *, temperature=1.0, softcap=None, ignore_index=-100, return_entropy=False,
                         validate=True, backend=None, top_k=None, top_p=None, batch_invariant=False,
                         process_group=None, vocab_offset=None):
    """log_softmax(cap(logits) / temperature)[tokens] (and the entropy of that distribution).

    cap(z) = softcap·tanh(z/softcap) when softcap is given (Gemma-2), else z; temperature is a number or a
    tensor broadcastable to tokens.shape (one per token), > 0, and takes no gradient. Ignored rows are not
    read (forward) and get a zero gradient row without reading the logits (backward).

    logits[..., V], tokens[...] -> logp[...] float32 (float64 for float64 logits), and entropy[...]
    when return_entropy. Positions whose token is ignore_index give 0 and no gradient.
    With validate=False nothing syncs with the device: an id outside [0, V) gives logp = NaN (a constant,
    so no gradient flows through it, as in the reference) while its entropy and the entropy's gradient are
    those of the row. Backward recomputes the softmax from a saved per-row log-sum-exp; apart from the
    caller's own logits nothing of size [..., V] is kept.

    top_k, top_p (sampler replay): the log-prob and entropy under the distribution a vLLM-style sampler drew
    from: z = cap(logits)/temperature -> keep the top k (every z equal to the k-th largest is kept) -> softmax
    -> top-p over what is left (sorted ascending, the tokens whose cumulative probability is <= 1 − p are
    dropped; the most probable token and every token tied with a kept one are kept) -> renormalise. Each is
    a number or a tensor broadcastable to tokens.shape (top_k <= 0 or top_p = 1: off for that token). A token
    outside its kept set gets logp = −inf and no gradient; mask such positions before a loss, e.g.
    `mask & torch.isfinite(logp)` (a rollout's own tokens are always kept, so −inf there means the settings
    differ from the sampler's). The gradient treats the kept set as fixed. See docs/sampler_replay.md.

    batch_invariant=True: each position's log-prob, entropy and row of the logits gradient are bitwise the
    same whatever else is in the batch. Every backend reduces each row on its own in a fixed order that
    depends only on V (docs/batch_invariant.md); the flag makes the cuda backend also ignore the row's
    address alignment, which otherwise picks where its vector loads start.

    Vocabulary-parallel head: with process_group, logits hold this rank's columns [vocab_offset, vocab_offset + V_r)
    of the vocabulary (vocab_offset defaults to rank·V_r), tokens are global ids, every rank gets the outputs of the
    whole vocabulary (the same bits on every rank) and the gradient of its own logits shard; see
    rlhf_kernels/ops/vocab_parallel.py.
    """
    float_tensor("logits", logits, ndim_min=1)
    int_tensor("tokens", tokens)
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"tokens must have shape {tuple(logits.shape[:-1])} (logits without its last dim), "
                         f"got {tuple(tokens.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary (last) dimension")
    device = same_device(logits=logits, tokens=tokens)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    temperature, temps = temperature_arg(temperature, tokens, _acc_dtype(logits), validate)
    cap = softcap_arg(softcap)
    ks = top_k_arg(top_k, tokens, validate)
    ps = top_p_arg(top_p, tokens, _acc_dtype(logits), validate)
    invariant = bool_arg("batch_invariant", batch_invariant)
    if process_group is not None or vocab_offset is not None:
        if ks is not None or ps is not None:
            vocab_parallel.not_composable("top_k/top_p")
        if invariant:
            vocab_parallel.not_composable("batch_invariant")
        name = backend_for(backend, device, "logprobs_from_logits", IMPLEMENTED)
        return vocab_parallel.logprobs_from_logits(logits, tokens, temperature, temps, cap, ignore_index,
                                                   bool(return_entropy), validate, name, process_group, vocab_offset)
    check_tokens(tokens, logits.shape[-1], ignore_index, validate)
    name = backend_for(backend, device, "logprobs_from_logits", IMPLEMENTED)
    if name == "reference":
        return reference.logprobs_from_logits(logits, tokens, temperature if temps is None else temps, ignore_index,
                                              bool(return_entropy), softcap, ks, ps, invariant)
    # The kernels read logits in their own dtype and follow the leading strides; only the vocabulary dim
    # must be unit-stride (e.g. logits[:, :-1] is used as is, logits.mT is copied).
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    tok = tokens.to(torch.int64).contiguous()
    op = (torch.ops.rlhf_kernels.logprobs_from_logits_fwd_triton if name == "triton"
          else torch.ops.rlhf_kernels.logprobs_from_logits_fwd)
    thr = None
    if ks is not None or ps is not None:  # the sampler replay: one threshold per row, then the head cut there
        thr = threshold_op(name)(x.detach(), tok, temperature, ignore_index, temps, cap, ks, ps)
    logp, ent, _ = op(x, tok, temperature, ignore_index, bool(return_entropy), temps, cap, invariant, thr)
    return (logp, ent) if return_entropy else logp


def threshold_op(name):
    """The backend's replay threshold op: (logits, tokens, temperature, ignore_index, temperatures, softcap,
    top_k, top_p) -> one threshold per row (−inf: nothing cut)."""
    return (torch.ops.rlhf_kernels.logprobs_from_logits_threshold_triton if name == "triton"
            else torch.ops.rlhf_kernels.logprobs_from_logits_threshold)


def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _fake_fwd(logits, tokens, temperature, ignore_index, return_entropy, temperatures=None, softcap=0.0,
              batch_invariant=False, thresholds=None):
    acc = _acc_dtype(logits)
    out = tokens.new_empty(tokens.shape, dtype=acc)
    ent = tokens.new_empty(tokens.shape if return_entropy else (0,), dtype=acc)
    return out, ent, tokens.new_empty(tokens.shape, dtype=acc)


def _fake_bwd(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index, temperatures=None,
              softcap=0.0, batch_invariant=False, thresholds=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _fake_threshold(logits, tokens, temperature, ignore_index, temperatures, softcap, top_k, top_p):
    return tokens.new_empty(tokens.shape, dtype=_acc_dtype(logits))


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, ignore_index, return_entropy = inputs[:5]
    ctx.extra = tuple(inputs[5:])  # the per-token temperatures, softcap, batch_invariant, replay thresholds
    _, ent, lse = output
    # logits is the caller's tensor (no copy); lse and entropy are [N]: nothing new of size [N, V] is kept
    ctx.save_for_backward(logits, tokens, lse, ent)
    ctx.temperature, ctx.ignore_index, ctx.return_entropy = temperature, ignore_index, return_entropy
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward_with(bwd_op):
    def backward(ctx, g_logp, g_ent, g_lse):
        logits, tokens, lse, ent = ctx.saved_tensors
        if not ctx.return_entropy:
            g_ent = None
        if g_logp is None and g_ent is None:
            return (None,) * (5 + len(ctx.extra))
        g_logp = None if g_logp is None else g_logp.contiguous()
        g_ent = None if g_ent is None else g_ent.contiguous()
        grad = bwd_op(g_logp, g_ent, logits, tokens, lse, ent, ctx.temperature, ctx.ignore_index, *ctx.extra)
        return (grad,) + (None,) * (4 + len(ctx.extra))
    return backward


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::logprobs_from_logits_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::logprobs_from_logits_bwd")(_fake_bwd)
    torch.library.register_fake("rlhf_kernels::logprobs_from_logits_threshold")(_fake_threshold)
    torch.library.register_autograd("rlhf_kernels::logprobs_from_logits_fwd",
                                    _backward_with(torch.ops.rlhf_kernels.logprobs_from_logits_bwd),
                                    setup_context=_setup_context)

if HAVE_TRITON:
    from ..triton import logprobs_from_logits as _tl

    @torch.library.triton_op("rlhf_kernels::logprobs_from_logits_fwd_triton", mutates_args=())
    def _fwd_triton(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, ignore_index: int,
                    return_entropy: bool, temperatures: torch.Tensor | None = None,
                    softcap: float = 0.0,
                    batch_invariant: bool = False,
                    thresholds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tl.logprobs_fwd(logits, tokens, temperature, ignore_index, return_entropy, temperatures, softcap,
                                thresholds)

    @torch.library.triton_op("rlhf_kernels::logprobs_from_logits_bwd_triton", mutates_args=())
    def _bwd_triton(grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, logits: torch.Tensor,
                    tokens: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor, temperature: float,
                    ignore_index: int, temperatures: torch.Tensor | None = None, softcap: float = 0.0,
                    batch_invariant: bool = False,
                    thresholds: torch.Tensor | None = None) -> torch.Tensor:
        return _tl.logprobs_bwd(grad_logp, grad_entropy, logits, tokens, lse, entropy, temperature, ignore_index,
                                temperatures, softcap, thresholds)

    @torch.library.triton_op("rlhf_kernels::logprobs_from_logits_threshold_triton", mutates_args=())
    def _threshold_triton(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, ignore_index: int,
                          temperatures: torch.Tensor | None, softcap: float, top_k: torch.Tensor | None,
                          top_p: torch.Tensor | None) -> torch.Tensor:
        return _tl.replay_threshold(logits, tokens, temperature, ignore_index, temperatures, softcap, top_k, top_p)

    _fwd_triton.register_fake(_fake_fwd)
    _bwd_triton.register_fake(_fake_bwd)
    _threshold_triton.register_fake(_fake_threshold)
    _fwd_triton.register_autograd(_backward_with(torch.ops.rlhf_kernels.logprobs_from_logits_bwd_triton),
                                  setup_context=_setup_context)
