"""Which backends this install has, and which one a call runs on."""
import functools
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

try:
    from . import _C  # registers the C++ kernels with torch.ops.rlhf_kernels
    _C_ERROR = None
except ImportError as e:  # no compiler at install time, or a build for another torch
    _C = None
    _C_ERROR = str(e)
    warnings.warn(
        "rlhf_kernels: the native extension rlhf_kernels._C is not built "
        f"({_C_ERROR}); every op runs on the 'reference' backend (and 'triton' where it can). "
        "Reinstall with a C++ compiler (`pip install --no-build-isolation -e .`) for the fast CPU kernels.",
        stacklevel=2)


def interpreting():
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(None)
def _triton_import_error():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        return None
    except Exception as e:  # ImportError, or a broken install
        return f"{type(e).__name__}: {e}"


def cuda_archs():
    return [a for a in (_C.cuda_archs if _C is not None else "").split(";") if a]


def cpu_isa():
    """The vector ISA the CPU kernels run with in this process: "baseline", "avx2" or "avx512" (the best
    this CPU supports, or the one RLHF_KERNELS_CPU_ISA forces; see docs/backends.md), or None when the
    native extension is not built."""
    return _C.cpu_isa() if _C is not None else None


def available_backends():
    """{backend: "available" or the reason it is not}."""
    out = {"reference": "available"}
    out["cpu"] = "available" if _C is not None else f"native extension not built ({_C_ERROR})"
    err = _triton_import_error()
    if err:
        out["triton"] = f"triton is not installed ({err}); pip install triton"
    elif torch.cuda.is_available():
        out["triton"] = "available"
    elif interpreting():
        out["triton"] = "available (TRITON_INTERPRET=1: interpreter on CPU tensors)"
    else:
        out["triton"] = "no GPU visible (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    if _C is None:
        out["cuda"] = f"native extension not built ({_C_ERROR})"
    elif not _C.with_cuda:
        out["cuda"] = "extension built without CUDA (no nvcc or a CPU-only torch at install time)"
    else:
        archs = ", ".join("sm_" + a.replace(".", "").replace("+PTX", "") for a in cuda_archs())
        out["cuda"] = "available" if torch.cuda.is_available() else f"built for {archs}; no GPU visible"
    return out


def _usable(name, device_type):
    if name == "reference":
        return True
    if name == "cpu":
        return _C is not None and device_type == "cpu"
    if name == "cuda":
        return _C is not None and bool(_C.with_cuda) and device_type == "cuda"
    if name == "triton":
        return _triton_import_error() is None and (device_type == "cuda" or (device_type == "cpu" and interpreting()))
    return False


# The backend `backend=None` runs an op's CUDA tensors on, first choice first; the reasons are in
# docs/backends.md ("Default backend on CUDA tensors"). The second entry is the fallback when the
# first is not usable here (an extension built without CUDA, or no triton). Every op has a row
# (tests/test_backend_choice.py): a new op's default is a decision, not a fallback.
CUDA_DEFAULTS = {
    "linear_logprobs": ("cuda", "triton"),
    "logprobs_from_logits": ("cuda", "triton"),
    "token_kl": ("cuda", "triton"),
    "token_rewards": ("cuda", "triton"),
    "gae": ("cuda", "triton"),
    "masked_whiten": ("cuda", "triton"),
    "ppo_policy_loss": ("cuda", "triton"),
    "ppo_value_loss": ("cuda", "triton"),
    "dpo_loss": ("cuda", "triton"),
    "group_advantages": ("cuda", "triton"),
    "rollout_correction": ("cuda", "triton"),
}


def preference(op, device_type):
    """The backends `backend=None` tries for `op` on `device_type` tensors, in order."""
    if device_type == "cuda":
        return CUDA_DEFAULTS[op] + ("reference",)
    return ("cpu", "reference") if device_type == "cpu" else ("reference",)


def choose(backend, device, op):
    """The backend `op` runs on for tensors on `device`: the explicit `backend`, else
    $RLHF_KERNELS_BACKEND, else the first usable entry of `preference(op, device.type)`."""
    if backend is None:
        backend = os.environ.get("RLHF_KERNELS_BACKEND") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if not _usable(backend, device.type):
            why = available_backends()[backend]
            raise ValueError(f"{op}: backend {backend!r} cannot run on {device.type} tensors here ({why})")
        return backend
    return next(b for b in preference(op, device.type) if _usable(b, device.type))
