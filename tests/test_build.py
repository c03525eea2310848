"""The extension is built, carries the GPU code it should, and the backends say why they are (not) usable."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _backend

NVCC = shutil.which("nvcc")
CUDA_WANTED = NVCC is not None and torch.version.cuda is not None and os.environ.get("RLHF_KERNELS_CUDA") != "0"


def test_extension_imports():
    from rlhf_kernels import _C

    assert hasattr(torch.ops.rlhf_kernels, "token_kl_fwd")
    assert _C.with_openmp == 1, "built without OpenMP: at::parallel_for would run on one thread"


def test_cpp_enums_match_the_python_codes():
    """The C++ enums the kernels switch on (csrc/common.h) are the codes the Python layer passes: same
    names (the Python name upper-cased behind the enum's prefix) and same values, none missing."""
    from rlhf_kernels import _C
    from rlhf_kernels.ops import _common

    for enum, prefix, py in (("KlEstimator", "KL_", _common.KL_CODES), ("Aggregation", "AGG_", _common.AGG_CODES),
                             ("DpoLoss", "DPO_", _common.DPO_CODES)):
        expected = {prefix + name.upper().replace("-", "_"): code for name, code in py.items()}
        assert _C.codes[enum] == expected, enum
    assert set(_C.codes) == {"KlEstimator", "Aggregation", "DpoLoss"}


def test_backends_listed_with_reasons():
    av = rk.available_backends()
    assert set(av) == {"reference", "cpu", "triton", "cuda"}
    assert av["reference"] == "available" and av["cpu"] == "available"
    for name, why in av.items():
        assert why.startswith("available") or len(why) > 10, (name, why)
    if not torch.cuda.is_available() and _backend._C.with_cuda:
        assert av["cuda"] == "built for sm_80, sm_90; no GPU visible"


@pytest.mark.skipif(not CUDA_WANTED, reason="no nvcc or a CPU-only torch: the CUDA part is not expected")
def test_cuda_part_was_built():
    # where nvcc exists, a silent CPU-only build must not pass
    assert _backend._C.with_cuda == 1, "nvcc is on PATH but the extension was built without CUDA"


@pytest.mark.skipif(not CUDA_WANTED, reason="no nvcc or a CPU-only torch: the CUDA part is not expected")
def test_so_carries_sm80_and_sm90():
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = cuobjdump if os.path.exists(cuobjdump) else shutil.which("cuobjdump")
    assert cuobjdump, "cuobjdump not found (ships inside triton's package)"
    so = glob.glob(os.path.join(os.path.dirname(rk.__file__), "_C*.so"))[0]
    elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    assert "sm_80" in elf and "sm_90" in elf, elf
    ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in ptx, "expected PTX for 9.0+PTX (forward compatibility to newer GPUs)"


def test_backend_override(monkeypatch):
    logp, ref = torch.randn(3), torch.randn(3)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    assert _backend.choose(None, logp.device, "token_kl") == "reference"
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="cuda"):
        rk.token_kl(logp, ref)
    monkeypatch.delenv("RLHF_KERNELS_BACKEND")
    assert _backend.choose(None, logp.device, "token_kl") == "cpu"


def test_imports_without_extension():
    """With no native extension (no compiler at install time) the package imports, warns once and
    runs on the reference backend."""
    code = (
        "import sys, warnings; sys.modules['rlhf_kernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import rlhf_kernels as rk, torch\n"
        "msgs = [str(x.message) for x in w if 'rlhf_kernels' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert rk.available_backends()['cpu'].startswith('native extension not built')\n"
        "print(float(rk.token_kl(torch.tensor([0.5]), torch.tensor([0.25]))))\n")
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.25"
