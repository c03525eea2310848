"""rk.logprobs_from_logits: log-probs (and entropy) of given tokens from logits, temperature-scaled."""
import torch

from .. import reference
from ._common import backend_for, float_tensor, int_tensor, number, same_device

IMPLEMENTED = ("reference",)


def check_tokens(tokens, V, ignore_index, validate):
    """Token ids must lie in [0, V) or equal ignore_index; this check syncs with the device,
    so hot loops pass validate=False (out-of-range ids then give NaN) and compiled code skips it."""
    if validate and tokens.numel() and not torch.compiler.is_compiling():
        bad = ((tokens < 0) | (tokens >= V)) & (tokens != ignore_index)
        if bool(bad.any()):
            first = tokens[bad][0].item()
            raise ValueError(f"tokens must lie in [0, {V}) or equal ignore_index={ignore_index}; found {first} "
                             "(pass validate=False to get NaN at such positions instead of this check)")


def logprobs_from_logits(logits, tokens, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                         validate=True, backend=None):
    """log_softmax(logits / temperature)[tokens] (and the entropy of that distribution).

    logits[..., V], tokens[...] -> logp[...] float32 (float64 for float64 logits), and entropy[...]
    when return_entropy. Positions whose token is ignore_index give 0 and no gradient.
    """
    float_tensor("logits", logits, ndim_min=1)
    int_tensor("tokens", tokens)
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"tokens must have shape {tuple(logits.shape[:-1])} (logits without its last dim), "
                         f"got {tuple(tokens.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty vocabulary (last) dimension")
    device = same_device(logits=logits, tokens=tokens)
    temperature = number("temperature", temperature, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_tokens(tokens, logits.shape[-1], ignore_index, validate)
    name = backend_for(backend, device, "logprobs_from_logits", IMPLEMENTED)
    return reference.logprobs_from_logits(logits, tokens, temperature, ignore_index, bool(return_entropy))
