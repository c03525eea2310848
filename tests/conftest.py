import importlib
import math
import os

# The Triton kernels run on CPU tensors through the interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rlhf_kernels as rk  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def cpu_backends(op):
    """Backends of an op (by name) that can execute here on CPU tensors."""
    avail = rk.available_backends()
    implemented = importlib.import_module(f"rlhf_kernels.ops.{op}").IMPLEMENTED
    return [b for b in implemented if b != "cuda" and avail[b].startswith("available")]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ragged_masks(B, T, generator=None):
    """Right-padded, left-padded, with holes, all-masked first row, and a full row: the masks
    RLHF batches actually contain."""
    g = generator
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    idx = torch.arange(T)
    right = idx < lengths[:, None]
    left = idx >= (T - lengths)[:, None]
    holes = right & (torch.rand(B, T, generator=g) > 0.3)
    masks = {"right": right, "left": left, "holes": holes}
    for m in masks.values():
        m[0] = False
        if B > 1:
            m[-1] = True
    return masks


def all_masks(shape, seed):
    """Every mask kind for `shape` [..., T] (right, left, holes, random, full, none); ragged_masks'
    rows are the flattened leading dims."""
    T, R = (shape[-1], math.prod(shape[:-1])) if shape else (1, 1)
    g = torch.Generator().manual_seed(seed)
    ms = {k: m.reshape(shape) for k, m in ragged_masks(R, T, g).items()}
    ms["random"] = torch.rand(shape, generator=g) > 0.5
    ms["full"] = torch.ones(shape, dtype=torch.bool)
    ms["none"] = torch.zeros(shape, dtype=torch.bool)
    return ms
