"""rk.masked_whiten: whitening with mean and variance over the valid positions of the whole tensor."""
import torch

from .. import reference
from ._common import HAVE_C, HAVE_TRITON, backend_for, float_tensor, mask_tensor, number, same_device
from ._nograd import raise_on_backward

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def masked_whiten(x, mask, *, shift_mean=True, unbiased=False, eps=1e-8, backend=None):
    """(x − μ)·rsqrt(var + eps) (+ μ when shift_mean=False), μ and var over valid positions;
    masked positions give 0 (all positions when none is valid). unbiased=True divides by n − 1
    (by 1 when n = 1). The reduction order is fixed, so the result is deterministic.

    Not differentiable: on the cpu, cuda and triton backends backpropagating into the result raises
    (the reference backend is plain torch and lets gradients through)."""
    float_tensor("x", x)
    mask = mask_tensor("mask", mask, x.shape)
    device = same_device(x=x, mask=mask)
    eps = number("eps", eps, nonneg=True)
    name = backend_for(backend, device, "masked_whiten", IMPLEMENTED)
    if name == "reference":
        return reference.masked_whiten(x, mask, bool(shift_mean), bool(unbiased), eps)
    xc, m = x.to(reference.compute_dtype(x)).contiguous(), mask.contiguous()
    op = torch.ops.rlhf_kernels.masked_whiten_triton if name == "triton" else torch.ops.rlhf_kernels.masked_whiten
    return op(xc, m, bool(shift_mean), bool(unbiased), eps)


def _fake(x, mask, shift_mean, unbiased, eps):
    return x.new_empty(x.shape)


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::masked_whiten")(_fake)
    raise_on_backward("rlhf_kernels::masked_whiten", "masked_whiten")

if HAVE_TRITON:
    from ..triton import masked_whiten as _tw

    @torch.library.triton_op("rlhf_kernels::masked_whiten_triton", mutates_args=())
    def _masked_whiten_triton(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool,
                              eps: float) -> torch.Tensor:
        return _tw.masked_whiten(x, mask, shift_mean, unbiased, eps)

    _masked_whiten_triton.register_fake(_fake)
    raise_on_backward(_masked_whiten_triton, "masked_whiten")
