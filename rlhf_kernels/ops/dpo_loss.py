"""rk.dpo_loss: DPO-family losses on sequence log-probs (sigmoid/cDPO, IPO, hinge, robust).

Elementwise over the pairs: one pass forward (losses and the detached implicit rewards), one pass
backward giving the gradients of all four inputs (±grad·∂loss/∂h), as the reference does.
"""
import torch

from .. import reference
from ._common import DPO_CODES, HAVE_C, HAVE_TRITON, backend_for, choice, float_tensor, number, same_device, same_shape

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def _flat(x, dtype):
    x = x.reshape(-1) if x.dim() != 1 else x
    x = x if x.dtype == dtype else x.to(dtype)
    return x if x.is_contiguous() else x.contiguous()


def dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0, backend=None):
    """(losses, chosen_rewards, rejected_rewards), each of the inputs' shape, with
    h = (c − c_ref) − (r − r_ref); rewards are β(c − c_ref) and β(r − r_ref), detached."""
    args = dict(chosen_logp=chosen_logp, rejected_logp=rejected_logp, ref_chosen_logp=ref_chosen_logp,
                ref_rejected_logp=ref_rejected_logp)
    for n, t in args.items():
        float_tensor(n, t)
    same_shape("chosen_logp", chosen_logp, rejected_logp=rejected_logp, ref_chosen_logp=ref_chosen_logp,
               ref_rejected_logp=ref_rejected_logp)
    device = same_device(**args)
    beta = number("beta", beta, positive=True)
    choice("loss_type", loss_type, DPO_CODES)
    eps = number("label_smoothing", label_smoothing, nonneg=True)
    if eps >= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
    if eps and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing applies to the 'sigmoid' and 'robust' losses, not {loss_type!r}")
    name = backend_for(backend, device, "dpo_loss", IMPLEMENTED)
    if name == "reference":
        return reference.dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, loss_type,
                                  eps)
    dt = reference.compute_dtype(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    op = torch.ops.rlhf_kernels.dpo_loss_fwd_triton if name == "triton" else torch.ops.rlhf_kernels.dpo_loss_fwd
    losses, c_rew, r_rew = op(_flat(chosen_logp, dt), _flat(rejected_logp, dt), _flat(ref_chosen_logp, dt),
                              _flat(ref_rejected_logp, dt), beta, DPO_CODES[loss_type], eps)
    shape = chosen_logp.shape
    if losses.shape != shape:
        losses, c_rew, r_rew = losses.reshape(shape), c_rew.reshape(shape), r_rew.reshape(shape)
    return losses, c_rew, r_rew


def _fake_fwd(c, r, cr, rr, beta, loss_type, label_smoothing):
    return torch.empty_like(c), torch.empty_like(c), torch.empty_like(c)


def _fake_bwd(grad, c, r, cr, rr, beta, loss_type, label_smoothing):
    return torch.empty_like(c), torch.empty_like(r), torch.empty_like(cr), torch.empty_like(rr)


if HAVE_C:
    # autograd of the C++ op is registered in C++ (csrc/cpu/dpo_loss.cpp): far less per-call overhead
    torch.library.register_fake("rlhf_kernels::dpo_loss_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::dpo_loss_bwd")(_fake_bwd)

if HAVE_TRITON:
    from ..triton import dpo_loss as _tk

    @torch.library.triton_op("rlhf_kernels::dpo_loss_fwd_triton", mutates_args=())
    def _fwd_triton(c: torch.Tensor, r: torch.Tensor, cr: torch.Tensor, rr: torch.Tensor, beta: float,
                    loss_type: int, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.dpo_loss_fwd(c, r, cr, rr, beta, loss_type, label_smoothing)

    @torch.library.triton_op("rlhf_kernels::dpo_loss_bwd_triton", mutates_args=())
    def _bwd_triton(grad: torch.Tensor, c: torch.Tensor, r: torch.Tensor, cr: torch.Tensor, rr: torch.Tensor,
                    beta: float, loss_type: int,
                    label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.dpo_loss_bwd(grad, c, r, cr, rr, beta, loss_type, label_smoothing)

    def _setup_context(ctx, inputs, output):
        c, r, cr, rr, beta, loss_type, eps = inputs
        ctx.save_for_backward(c, r, cr, rr)
        ctx.args = (beta, loss_type, eps)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward(ctx, grad, *_rewards):
        grads = torch.ops.rlhf_kernels.dpo_loss_bwd_triton(grad.contiguous(), *ctx.saved_tensors, *ctx.args)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) + (None, None, None)

    _fwd_triton.register_fake(_fake_fwd)
    _bwd_triton.register_fake(_fake_bwd)
    _fwd_triton.register_autograd(_backward, setup_context=_setup_context)
