"""rk.gae: generalised advantage estimation over the valid positions of each row."""
import torch

from .. import reference
from ._common import HAVE_C, HAVE_TRITON, backend_for, float_tensor, mask_tensor, number, same_device, same_shape
from ._nograd import raise_on_backward

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, dones=None, backend=None):
    """(advantages, returns), both [..., T]. The recursion links each valid position to the next valid
    one of its row (holes are skipped): δ_t = r_t + γV_next − V_t, A_t = δ_t + γλA_next, returns = A + V;
    0 at masked positions. Float32 results (float64 for float64 inputs).

    `dones` (bool or 0/1, the shape of `rewards`) lets a row hold several episodes: a valid position
    with d_t = 1 is the last step of its episode, and the recursion is cut there,
    δ_t = r_t + γ(1−d_t)V_next − V_t, A_t = δ_t + γλ(1−d_t)A_next (so δ_t = r_t − V_t: nothing is
    bootstrapped across the boundary). A done at a masked position has no effect. Non-bool dones are
    checked to hold only 0 and 1 (one device sync, skipped for bool and under torch.compile).

    Not differentiable: on the cpu, cuda and triton backends backpropagating into the results raises
    (the reference backend is plain torch and lets gradients through)."""
    float_tensor("rewards", rewards, ndim_min=1)
    float_tensor("values", values)
    same_shape("rewards", rewards, values=values)
    mask = mask_tensor("mask", mask, rewards.shape)
    flags = None if dones is None else mask_tensor("dones", dones, rewards.shape)
    device = same_device(rewards=rewards, values=values, mask=mask, dones=dones)
    if dones is not None:
        _zero_one("dones", dones)
        dones = flags
    gamma = number("gamma", gamma, nonneg=True)
    lam = number("lam", lam, nonneg=True)
    name = backend_for(backend, device, "gae", IMPLEMENTED)
    if name == "reference":
        return reference.gae(rewards, values, mask, gamma, lam, dones)
    dt = reference.compute_dtype(rewards, values)
    r, v, m = rewards.to(dt).contiguous(), values.to(dt).contiguous(), mask.contiguous()
    d = None if dones is None else dones.contiguous()
    op = torch.ops.rlhf_kernels.gae_triton if name == "triton" else torch.ops.rlhf_kernels.gae
    return op(r, v, m, d, gamma, lam)


def _zero_one(name, x):
    # Reading the data is a graph break under torch.compile: compiled callers get the kernels' reading
    # (nonzero is done), as masks do.
    if x.dtype == torch.bool or torch.compiler.is_compiling():
        return
    if x.numel() and not ((x == 0) | (x == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (or be a bool tensor)")


def _fake(rewards, values, mask, dones, gamma, lam):
    return rewards.new_empty(rewards.shape), rewards.new_empty(rewards.shape)


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::gae")(_fake)
    raise_on_backward("rlhf_kernels::gae", "gae")

if HAVE_TRITON:
    from ..triton import gae as _tg

    @torch.library.triton_op("rlhf_kernels::gae_triton", mutates_args=())
    def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, dones: torch.Tensor | None,
                    gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _tg.gae(rewards, values, mask, dones, gamma, lam)

    _gae_triton.register_fake(_fake)
    raise_on_backward(_gae_triton, "gae")
