"""The per-op default backend on CUDA tensors (rlhf_kernels._backend.CUDA_DEFAULTS), checked on CPU
with the device type and the extension's CUDA build mocked; no GPU is needed or faked for a result."""
import importlib
import pkgutil
import types

import pytest
import torch

import rlhf_kernels.ops
from rlhf_kernels import _backend
from rlhf_kernels.ops._common import backend_for

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


def _op_modules():
    for m in pkgutil.iter_modules(rlhf_kernels.ops.__path__):
        mod = importlib.import_module(f"rlhf_kernels.ops.{m.name}")
        if hasattr(mod, "IMPLEMENTED"):
            yield m.name, mod


@pytest.fixture
def gpu_install(monkeypatch):
    """An install whose extension has CUDA kernels and whose triton imports."""
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_C", types.SimpleNamespace(with_cuda=True, cuda_archs="8.0;9.0+PTX"))
    monkeypatch.setattr(_backend, "_triton_import_error", lambda: None)
    return monkeypatch


def test_every_op_has_an_entry():
    ops = {name for name, _ in _op_modules()}
    assert ops, "no op modules found"
    assert ops <= set(_backend.CUDA_DEFAULTS), f"ops without a CUDA default: {ops - set(_backend.CUDA_DEFAULTS)}"
    for op, order in _backend.CUDA_DEFAULTS.items():
        assert set(order) == {"cuda", "triton"}, (op, order)


@pytest.mark.parametrize("op", sorted(_backend.CUDA_DEFAULTS))
def test_table_picks_first_choice(gpu_install, op):
    assert _backend.choose(None, CUDA, op) == _backend.CUDA_DEFAULTS[op][0]


@pytest.mark.parametrize("op", sorted(_backend.CUDA_DEFAULTS))
def test_falls_back_when_first_choice_is_missing(gpu_install, op):
    first, second = _backend.CUDA_DEFAULTS[op]
    if first == "cuda":
        gpu_install.setattr(_backend, "_C", types.SimpleNamespace(with_cuda=False, cuda_archs=""))
    else:
        gpu_install.setattr(_backend, "_triton_import_error", lambda: "ImportError: no triton")
    assert _backend.choose(None, CUDA, op) == second


def test_neither_gives_reference(gpu_install):
    gpu_install.setattr(_backend, "_C", None)
    gpu_install.setattr(_backend, "_triton_import_error", lambda: "ImportError: no triton")
    assert _backend.choose(None, CUDA, "linear_logprobs") == "reference"


@pytest.mark.parametrize("forced", ["triton", "cuda", "reference"])
def test_env_and_argument_override_the_table(gpu_install, forced):
    gpu_install.setenv("RLHF_KERNELS_BACKEND", forced)
    assert _backend.choose(None, CUDA, "linear_logprobs") == forced
    other = "reference" if forced != "reference" else "triton"
    assert _backend.choose(other, CUDA, "linear_logprobs") == other  # backend= beats the environment


def test_cpu_tensors_unchanged(gpu_install):
    assert _backend.choose(None, torch.device("cpu"), "linear_logprobs") == "cpu"
    gpu_install.setattr(_backend, "_C", None)
    assert _backend.choose(None, torch.device("cpu"), "linear_logprobs") == "reference"


def test_op_without_the_chosen_backend_follows_the_table_order(gpu_install):
    # an op that implements only triton gets triton on CUDA even where the table would say cuda
    assert backend_for(None, CUDA, "linear_logprobs", ("reference", "triton")) == "triton"
    assert backend_for(None, CUDA, "linear_logprobs", ("reference",)) == "reference"
    with pytest.raises(ValueError, match="not implemented"):
        backend_for("cuda", CUDA, "linear_logprobs", ("reference", "triton"))
