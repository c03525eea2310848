"""rk.masked_whiten: whitening with mean and variance over the valid positions of the whole tensor."""
from .. import reference
from ._common import backend_for, float_tensor, mask_tensor, number, same_device

IMPLEMENTED = ("reference",)


def masked_whiten(x, mask, *, shift_mean=True, unbiased=False, eps=1e-8, backend=None):
    """(x − μ)·rsqrt(var + eps) (+ μ when shift_mean=False), μ and var over valid positions;
    masked positions give 0. unbiased=True divides by n − 1 (by 1 when n = 1)."""
    float_tensor("x", x)
    mask = mask_tensor("mask", mask, x.shape)
    device = same_device(x=x, mask=mask)
    eps = number("eps", eps, nonneg=True)
    backend_for(backend, device, "masked_whiten", IMPLEMENTED)
    return reference.masked_whiten(x, mask, bool(shift_mean), bool(unbiased), eps)
