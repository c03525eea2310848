"""rk.token_kl: per-token KL estimate between the policy and the reference (k1, k2, k3)."""
import torch

from .. import reference
from ._common import HAVE_C, HAVE_TRITON, KL_CODES, backend_for, choice, float_tensor, number, same_device, same_shape

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def token_kl(logp, ref_logp, *, estimator="k1", clamp=None, backend=None):
    """KL estimate per token from log-probs of the sampled tokens under the policy and the reference.

    k1 = logp − ref, k2 = ½(logp − ref)², k3 = exp(ref − logp) − 1 − (ref − logp); with `clamp=c`
    the result is clamped to [−c, c] (zero gradient where the clamp is active). Differentiable in
    both inputs. Returns float32 (float64 for float64 inputs) of the inputs' shape.
    """
    float_tensor("logp", logp)
    float_tensor("ref_logp", ref_logp)
    same_shape("logp", logp, ref_logp=ref_logp)
    device = same_device(logp=logp, ref_logp=ref_logp)
    choice("estimator", estimator, KL_CODES)
    clamp = number("clamp", clamp, positive=True, optional=True)
    name = backend_for(backend, device, "token_kl", IMPLEMENTED)
    if name == "reference":
        return reference.token_kl(logp, ref_logp, estimator, clamp)
    dt = reference.compute_dtype(logp, ref_logp)
    a, b = logp.to(dt).contiguous(), ref_logp.to(dt).contiguous()
    op = torch.ops.rlhf_kernels.token_kl_fwd_triton if name == "triton" else torch.ops.rlhf_kernels.token_kl_fwd
    return op(a, b, KL_CODES[estimator], 0.0 if clamp is None else clamp)


def _setup_context(ctx, inputs, output):
    logp, ref_logp, estimator, clamp = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.estimator, ctx.clamp = estimator, clamp


def _backward_with(bwd_op):
    def backward(ctx, grad):
        logp, ref_logp = ctx.saved_tensors
        g_logp, g_ref = bwd_op(grad.contiguous(), logp, ref_logp, ctx.estimator, ctx.clamp)
        return g_logp, g_ref, None, None
    return backward


def _fake_fwd(logp, ref_logp, estimator, clamp):
    return torch.empty_like(logp)


def _fake_bwd(grad, logp, ref_logp, estimator, clamp):
    return torch.empty_like(logp), torch.empty_like(ref_logp)


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::token_kl_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::token_kl_bwd")(_fake_bwd)
    torch.library.register_autograd("rlhf_kernels::token_kl_fwd", _backward_with(torch.ops.rlhf_kernels.token_kl_bwd),
                                    setup_context=_setup_context)

if HAVE_TRITON:
    from ..triton import token_kl as _tk

    @torch.library.triton_op("rlhf_kernels::token_kl_fwd_triton", mutates_args=())
    def _token_kl_fwd_triton(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: int, clamp: float) -> torch.Tensor:
        return _tk.token_kl_fwd(logp, ref_logp, estimator, clamp)

    @torch.library.triton_op("rlhf_kernels::token_kl_bwd_triton", mutates_args=())
    def _token_kl_bwd_triton(grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, estimator: int,
                             clamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.token_kl_bwd(grad, logp, ref_logp, estimator, clamp)

    _token_kl_fwd_triton.register_fake(_fake_fwd)
    _token_kl_bwd_triton.register_fake(_fake_bwd)
    _token_kl_fwd_triton.register_autograd(_backward_with(torch.ops.rlhf_kernels.token_kl_bwd_triton),
                                           setup_context=_setup_context)
