"""rk.gae: generalised advantage estimation over the valid positions of each row."""
import torch

from .. import reference
from ._common import HAVE_C, HAVE_TRITON, backend_for, float_tensor, mask_tensor, number, same_device, same_shape
from ._nograd import raise_on_backward

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, backend=None):
    """(advantages, returns), both [..., T]. The recursion links each valid position to the next valid
    one of its row (holes are skipped): δ_t = r_t + γV_next − V_t, A_t = δ_t + γλA_next, returns = A + V;
    0 at masked positions. Float32 results (float64 for float64 inputs).

    Not differentiable: on the cpu, cuda and triton backends backpropagating into the results raises
    (the reference backend is plain torch and lets gradients through)."""
    float_tensor("rewards", rewards, ndim_min=1)
    float_tensor("values", values)
    same_shape("rewards", rewards, values=values)
    mask = mask_tensor("mask", mask, rewards.shape)
    device = same_device(rewards=rewards, values=values, mask=mask)
    gamma = number("gamma", gamma, nonneg=True)
    lam = number("lam", lam, nonneg=True)
    name = backend_for(backend, device, "gae", IMPLEMENTED)
    if name == "reference":
        return reference.gae(rewards, values, mask, gamma, lam)
    dt = reference.compute_dtype(rewards, values)
    r, v, m = rewards.to(dt).contiguous(), values.to(dt).contiguous(), mask.contiguous()
    op = torch.ops.rlhf_kernels.gae_triton if name == "triton" else torch.ops.rlhf_kernels.gae
    return op(r, v, m, gamma, lam)


def _fake(rewards, values, mask, gamma, lam):
    return rewards.new_empty(rewards.shape), rewards.new_empty(rewards.shape)


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::gae")(_fake)
    raise_on_backward("rlhf_kernels::gae", "gae")

if HAVE_TRITON:
    from ..triton import gae as _tg

    @torch.library.triton_op("rlhf_kernels::gae_triton", mutates_args=())
    def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                    lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _tg.gae(rewards, values, mask, gamma, lam)

    _gae_triton.register_fake(_fake)
    raise_on_backward(_gae_triton, "gae")
