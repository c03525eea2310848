"""rk.ppo_value_loss: the clipped value loss ½·max((V − R)², (V_clip − R)²), aggregated.

One fused pass forward (per-token loss, the clipped choice, per-row sums and counts, vf_clipfrac)
with a fixed-order combine over rows, one pass backward. Gradients match the reference for all
three float inputs: values, and old_values and returns when they require grad.
"""
import torch

from .. import reference
from ._common import AGG_CODES, HAVE_C, HAVE_TRITON, backend_for, number, same_device
from .ppo_policy_loss import check_loss_args, rows2d

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, aggregation="token-mean", backend=None):
    """(loss, {"vf_clipfrac"}) with V_clip = V_old + clip(V − V_old, ±clip); unclipped when clip=None."""
    mask = check_loss_args("values", values, aggregation, old_values=old_values, returns=returns, mask=mask)
    device = same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    clip = number("clip", clip, positive=True, optional=True)
    name = backend_for(backend, device, "ppo_value_loss", IMPLEMENTED)
    if name == "reference":
        return reference.ppo_value_loss(values, old_values, returns, mask, clip, aggregation)
    dt = reference.compute_dtype(values, old_values, returns)
    op = (torch.ops.rlhf_kernels.ppo_value_loss_fwd_triton if name == "triton"
          else torch.ops.rlhf_kernels.ppo_value_loss_fwd)
    loss, clipfrac, _ = op(rows2d(values, dt), rows2d(old_values, dt), rows2d(returns, dt), rows2d(mask),
                           0.0 if clip is None else clip, AGG_CODES[aggregation])
    return loss, {"vf_clipfrac": clipfrac}


def _fake_fwd(values, old_values, returns, mask, clip, aggregation):
    return values.new_empty(()), values.new_empty((), dtype=torch.float32), values.new_empty(values.shape[:1])


def _fake_bwd(grad_loss, values, old_values, returns, mask, row_weight, clip, need_data_grads):
    if need_data_grads:
        return torch.empty_like(values), torch.empty_like(old_values), torch.empty_like(returns)
    return torch.empty_like(values), old_values.new_empty((0,)), returns.new_empty((0,))


if HAVE_C:
    # autograd of the C++ op is registered in C++ (csrc/cpu/ppo_value_loss.cpp): far less per-call overhead
    torch.library.register_fake("rlhf_kernels::ppo_value_loss_fwd")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::ppo_value_loss_bwd")(_fake_bwd)

if HAVE_TRITON:
    from ..triton import ppo_value_loss as _tk

    @torch.library.triton_op("rlhf_kernels::ppo_value_loss_fwd_triton", mutates_args=())
    def _fwd_triton(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                    clip: float, aggregation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.ppo_value_loss_fwd(values, old_values, returns, mask, clip, aggregation)

    @torch.library.triton_op("rlhf_kernels::ppo_value_loss_bwd_triton", mutates_args=())
    def _bwd_triton(grad_loss: torch.Tensor, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                    mask: torch.Tensor, row_weight: torch.Tensor, clip: float,
                    need_data_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.ppo_value_loss_bwd(grad_loss, values, old_values, returns, mask, row_weight, clip, need_data_grads)

    def _setup_context(ctx, inputs, output):
        values, old_values, returns, mask, clip, _ = inputs
        ctx.save_for_backward(values, old_values, returns, mask, output[2])
        ctx.clip = clip
        ctx.mark_non_differentiable(*output[1:])

    def _backward(ctx, grad_loss, *_stats):
        values, old_values, returns, mask, row_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_v, g_old, g_ret = torch.ops.rlhf_kernels.ppo_value_loss_bwd_triton(
            grad_loss, values, old_values, returns, mask, row_weight, ctx.clip, need[1] or need[2])
        return g_v if need[0] else None, g_old if need[1] else None, g_ret if need[2] else None, None, None, None

    _fwd_triton.register_fake(_fake_fwd)
    _bwd_triton.register_fake(_fake_bwd)
    _fwd_triton.register_autograd(_backward, setup_context=_setup_context)
