"""rk.ppo_value_loss: the clipped value loss ½·max((V − R)², (V_clip − R)²), aggregated."""
from .. import reference
from ._common import backend_for, number, same_device
from .ppo_policy_loss import check_loss_args

IMPLEMENTED = ("reference",)


def ppo_value_loss(values, old_values, returns, mask, *, clip=0.2, aggregation="token-mean", backend=None):
    """(loss, {"vf_clipfrac"}) with V_clip = V_old + clip(V − V_old, ±clip); unclipped when clip=None."""
    mask = check_loss_args("values", values, aggregation, old_values=old_values, returns=returns, mask=mask)
    device = same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    clip = number("clip", clip, positive=True, optional=True)
    backend_for(backend, device, "ppo_value_loss", IMPLEMENTED)
    return reference.ppo_value_loss(values, old_values, returns, mask, clip, aggregation)
