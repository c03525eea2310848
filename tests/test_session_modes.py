"""How the test session decides where Triton runs (tests/conftest.py), and that a backend the session must
have cannot vanish from the suite."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import cpu_backends, missing_backends, required_cpu_backends, triton_interpret_setting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interpreter_only_without_a_gpu():
    assert triton_interpret_setting(None, gpu_visible=False) == "1"
    assert triton_interpret_setting(None, gpu_visible=True) == "0"  # the GPU triton tests run compiled
    for explicit in ("0", "1"):  # bench/gpu_check.py passes 0; a person may force either
        for gpu in (False, True):
            assert triton_interpret_setting(explicit, gpu) == explicit


def test_triton_on_cpu_tensors_exactly_when_interpreting():
    from rlhf_kernels import _backend
    assert _backend._usable("triton", "cpu") == (os.environ["TRITON_INTERPRET"] == "1")


def test_required_backends():
    assert required_cpu_backends(triton_installed=True, in_ci=False, gpu_visible=False) == {"triton"}
    assert required_cpu_backends(triton_installed=False, in_ci=False, gpu_visible=False) == set()
    # CI requires both, installed or not: a CI without them is a broken CI
    assert required_cpu_backends(triton_installed=False, in_ci=True, gpu_visible=False) == {"cpu", "triton"}
    # with a GPU, triton's tests are the compiled GPU tests; on CPU tensors it is not expected
    assert required_cpu_backends(triton_installed=True, in_ci=True, gpu_visible=True) == {"cpu"}


def test_missing_backends():
    assert missing_backends(("reference", "cpu", "triton"), ["reference", "cpu", "triton"], {"triton"}) == []
    assert missing_backends(("reference", "cpu"), ["reference", "cpu"], {"triton"}) == ["triton"]  # not importable
    assert missing_backends(("reference", "cpu", "triton"), ["reference", "cpu"], {"cpu", "triton"}) == ["triton"]


def test_reference_only_when_asked():
    assert "reference" not in cpu_backends("token_kl")
    assert cpu_backends("token_kl", reference=True)[0] == "reference"


def test_broken_triton_fails_the_suite(tmp_path):
    # an installed triton that cannot be imported: the ops leave it out of IMPLEMENTED; the suite must fail
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.path.join(ROOT, "tests")]),
               CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    code = "import conftest; print(conftest.cpu_backends('token_kl'))"
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "token_kl: backend(s) ['triton'] must run on CPU tensors" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the session without a GPU")
def test_cpu_backends_include_triton_where_installed():
    import importlib.util
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert "triton" in cpu_backends("linear_logprobs")
