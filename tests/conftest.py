import importlib
import importlib.util
import math
import os

import torch


def triton_interpret_setting(explicit, gpu_visible):
    """The TRITON_INTERPRET of a test session. An explicit setting wins (bench/gpu_check.py passes 0); otherwise
    the interpreter runs only where no CUDA GPU is visible, so that on a GPU every triton test runs the compiled
    kernels on CUDA tensors, and the CPU-tensor triton tests (which only the interpreter can run) are left out."""
    if explicit is not None:
        return explicit
    return "0" if gpu_visible else "1"


# Set before triton is imported (importing torch and asking for a GPU does not import it): triton.jit reads it
# when the kernels are defined.
os.environ["TRITON_INTERPRET"] = triton_interpret_setting(os.environ.get("TRITON_INTERPRET"),
                                                          torch.cuda.is_available())

import pytest  # noqa: E402

import rlhf_kernels as rk  # noqa: E402
from rlhf_kernels import _backend  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def required_cpu_backends(triton_installed, in_ci, gpu_visible):
    """Backends that must run on CPU tensors in this session, or the suite fails rather than shrinks: the native
    `cpu` in CI (which builds it), and `triton` (interpreted) wherever it is installed or in CI, unless a GPU
    is visible (then triton runs compiled, in the GPU tests)."""
    need = {"cpu"} if in_ci else set()
    if (triton_installed or in_ci) and not gpu_visible:
        need.add("triton")
    return need


def missing_backends(implemented, usable, required):
    """The required backends that this op cannot run here, in the order of `required`."""
    return [b for b in sorted(required) if b not in implemented or b not in usable]


def cpu_backends(op, reference=False):
    """The backends of an op (by name) that execute here on CPU tensors: the fast ones, and the reference
    itself only when asked (for tests whose oracle is not the reference: comparing the reference with
    itself cannot fail). A backend this session must have and lacks fails the test module."""
    implemented = importlib.import_module(f"rlhf_kernels.ops.{op}").IMPLEMENTED
    usable = [b for b in implemented if b != "cuda" and _backend._usable(b, "cpu")]
    required = required_cpu_backends(importlib.util.find_spec("triton") is not None, bool(os.environ.get("CI")),
                                     torch.cuda.is_available())
    missing = missing_backends(implemented, usable, required)
    if missing:
        why = rk.available_backends()
        raise RuntimeError(f"{op}: backend(s) {missing} must run on CPU tensors here and cannot: "
                           + "; ".join(f"{b}: {why[b]}" for b in missing))
    return [b for b in usable if reference or b != "reference"]


def pytest_report_header(config):
    if _backend.interpreting():
        return "triton: the interpreter, on CPU tensors (TRITON_INTERPRET=1)"
    return ("triton: compiled, on CUDA tensors only (TRITON_INTERPRET=0); the CPU-tensor triton tests are left "
            "out (run them without a visible GPU, e.g. CUDA_VISIBLE_DEVICES=)")


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
