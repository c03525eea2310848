"""rk.linear_logprobs: log-probs (and entropy) of given tokens straight from hidden states and the
LM head, equal to logprobs_from_logits(hidden @ weight.T + bias, tokens, ...)."""
from .. import reference
from ._common import backend_for, float_tensor, int_tensor, number, same_device
from .logprobs_from_logits import check_tokens

IMPLEMENTED = ("reference",)


def linear_logprobs(hidden, weight, tokens, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, validate=True, backend=None):
    """hidden[..., H], weight[V, H], tokens[...], bias[V] -> logp[...] (and entropy[...])."""
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
    temperature = number("temperature", temperature, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_tokens(tokens, weight.shape[0], ignore_index, validate)
    backend_for(backend, device, "linear_logprobs", IMPLEMENTED)
    return reference.linear_logprobs(hidden, weight, tokens, bias, temperature, ignore_index, bool(return_entropy))
