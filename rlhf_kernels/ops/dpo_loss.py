"""rk.dpo_loss: DPO-family losses on sequence log-probs (sigmoid/cDPO, IPO, hinge, robust)."""
from .. import reference
from ._common import DPO_CODES, backend_for, choice, float_tensor, number, same_device, same_shape


IMPLEMENTED = ("reference",)


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
    backend_for(backend, device, "dpo_loss", IMPLEMENTED)
    return reference.dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, loss_type, eps)
