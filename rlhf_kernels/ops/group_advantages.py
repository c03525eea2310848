"""rk.group_advantages: group-relative advantages (GRPO, RLOO, Dr. GRPO) from one score per sample."""
import operator

import torch

from .. import reference
from ._common import BASELINE_CODES, HAVE_C, HAVE_TRITON, SCALE_CODES, backend_for, choice, float_tensor, number, same_device
from ._nograd import raise_on_backward

IMPLEMENTED = ("reference",) + (("cpu", "cuda") if HAVE_C else ()) + (("triton",) if HAVE_TRITON else ())
ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def group_advantages(scores, group_size=None, *, group_ids=None, baseline="mean", scale="std", eps=1e-6,
                     backend=None):
    """Advantages[B] of scores[B] relative to their group.

    Groups are consecutive blocks of `group_size` samples (which must divide B), or the samples sharing
    a label of `group_ids[B]` (integer labels, any order, any group sizes); give exactly one of the two.
    With n members, mean μ and standard deviation σ = sqrt(Σ(r − μ)² / (n − 1)) of its group, sample r gets
      baseline="mean":          r − μ                         (GRPO)
      baseline="leave_one_out": r − (mean of the other n − 1)  (RLOO)
      baseline="none":          r
    then with scale="std" that divided by σ + eps (GRPO), with scale="none" left as is (Dr. GRPO).
    A group of one member gets 0 with the "mean" and "leave_one_out" baselines (its σ counts as 0, so
    baseline="none" with scale="std" gives r / eps there). eps=0 makes a group of equal scores 0/0 = NaN.
    Float32 result (float64 for float64 scores). Each group is reduced in a fixed order: deterministic.

    Host syncs: none on the fast backends. `group_ids` are stably sorted on the device to list the
    members group by group (a sort of B labels; no count of the groups is read back). The reference
    backend finds the groups with torch.unique, which syncs.

    Not differentiable: on the cpu, cuda and triton backends backpropagating into the result raises
    (the reference backend is plain torch and lets gradients through)."""
    float_tensor("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B] (one score per sample), got shape {tuple(scores.shape)}")
    B = scores.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (consecutive blocks) and group_ids (labels), "
                         f"got group_size={group_size!r} and group_ids={'None' if group_ids is None else 'a tensor'}")
    if group_ids is None:
        group_size = _group_size(group_size, B)
    else:
        _group_ids(group_ids, B)
    device = same_device(scores=scores, group_ids=group_ids)
    choice("baseline", baseline, BASELINE_CODES)
    choice("scale", scale, SCALE_CODES)
    eps = number("eps", eps, nonneg=True)
    name = backend_for(backend, device, "group_advantages", IMPLEMENTED)
    if name == "reference":
        return reference.group_advantages(scores, group_size, group_ids, baseline, scale, eps)
    r = scores.to(reference.compute_dtype(scores)).contiguous()
    order, offsets = (None, None) if group_ids is None else segments(group_ids)
    op = (torch.ops.rlhf_kernels.group_advantages_triton if name == "triton"
          else torch.ops.rlhf_kernels.group_advantages)
    return op(r, order, offsets, 0 if group_size is None else group_size, BASELINE_CODES[baseline],
              SCALE_CODES[scale], eps)


def _group_size(group_size, B):
    if isinstance(group_size, bool):
        raise TypeError("group_size must be an int, got bool")
    try:
        g = operator.index(group_size)
    except TypeError:
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}") from None
    if g < 1:
        raise ValueError(f"group_size must be >= 1, got {g}")
    if B % g:
        raise ValueError(f"group_size must divide the number of scores: {B} scores, group_size={g}")
    return g


def _group_ids(group_ids, B):
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor of integer labels, got {type(group_ids).__name__}")
    if group_ids.dtype not in ID_DTYPES:
        raise TypeError(f"group_ids must be an integer tensor (int8/16/32/64 or uint8), got {group_ids.dtype}")
    if tuple(group_ids.shape) != (B,):
        raise ValueError(f"group_ids must have shape ({B},) like scores, got {tuple(group_ids.shape)}")


def segments(group_ids):
    """(order, offsets) listing the members of each group, computed on the device without a sync.
    A stable sort of the labels gives `order` (each group's members in ascending index order) and
    group k is order[offsets[k]:offsets[k + 1]]; offsets has B + 1 entries, those after the last
    group equal B (so the kernels launch one slot per sample and the empty slots do nothing)."""
    B = group_ids.shape[0]
    if B == 0:
        return group_ids.new_zeros(0, dtype=torch.int64), group_ids.new_zeros(1, dtype=torch.int64)
    labels, order = torch.sort(group_ids, stable=True)
    first = torch.cat([torch.ones(1, dtype=torch.bool, device=labels.device), labels[1:] != labels[:-1]])
    group = torch.cumsum(first, 0) - 1  # dense group index of each sorted member, non-decreasing
    offsets = torch.searchsorted(group, torch.arange(B + 1, device=group.device))
    return order, offsets


def _fake(scores, order, offsets, group_size, baseline, scale, eps):
    return scores.new_empty(scores.shape)


if HAVE_C:
    torch.library.register_fake("rlhf_kernels::group_advantages")(_fake)
    raise_on_backward("rlhf_kernels::group_advantages", "group_advantages")

if HAVE_TRITON:
    from ..triton import group_advantages as _tg

    @torch.library.triton_op("rlhf_kernels::group_advantages_triton", mutates_args=())
    def _group_advantages_triton(scores: torch.Tensor, order: torch.Tensor | None, offsets: torch.Tensor | None,
                                 group_size: int, baseline: int, scale: int, eps: float) -> torch.Tensor:
        return _tg.group_advantages(scores, order, offsets, group_size, baseline, scale, eps)

    _group_advantages_triton.register_fake(_fake)
    raise_on_backward(_group_advantages_triton, "group_advantages")
