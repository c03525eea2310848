"""rk.gae: generalised advantage estimation over the valid positions of each row."""
from .. import reference
from ._common import backend_for, float_tensor, mask_tensor, number, same_device, same_shape

IMPLEMENTED = ("reference",)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, backend=None):
    """(advantages, returns), both [..., T]. The recursion links each valid position to the next valid
    one of its row (holes are skipped): δ_t = r_t + γV_next − V_t, A_t = δ_t + γλA_next, returns = A + V;
    0 at masked positions."""
    float_tensor("rewards", rewards, ndim_min=1)
    float_tensor("values", values)
    same_shape("rewards", rewards, values=values)
    mask = mask_tensor("mask", mask, rewards.shape)
    device = same_device(rewards=rewards, values=values, mask=mask)
    gamma = number("gamma", gamma, nonneg=True)
    lam = number("lam", lam, nonneg=True)
    backend_for(backend, device, "gae", IMPLEMENTED)
    return reference.gae(rewards, values, mask, gamma, lam)
