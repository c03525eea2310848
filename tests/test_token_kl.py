import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu

BACKENDS = cpu_backends("token_kl")
ALL = cpu_backends("token_kl", reference=True)  # for oracles other than the reference
SHAPES = [(1,), (257,), (3, 1), (4, 257), (2, 3, 5)]


def _fp64_tol(backend, clamp):
    """Exact to rounding (~1e-15 measured), but Triton gets the clamp as an fp32 scalar: a clamped value
    moves by up to clamp·2^-24 (1.2e-8 at 0.3); the derivatives do not depend on it."""
    return 3e-8 * max(1.0, clamp) if backend == "triton" and clamp is not None else 1e-12


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 5
    ref = logp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.7
    return logp.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [None, 0.3])
def test_matches_reference_fp64(backend, shape, estimator, clamp):
    logp, ref = _inputs(shape, torch.float64, seed=hash((shape, estimator)) % 1000)
    a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    out = rk.token_kl(a, b, estimator=estimator, clamp=clamp, backend=backend)
    ea, eb = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    exp = reference.token_kl(ea, eb, estimator, clamp)
    assert out.dtype == torch.float64 and out.shape == logp.shape
    # the gradients of both inputs, clamp=None (the default) included; a clamped position gets none
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got_g = torch.autograd.grad((out * w).sum(), (a, b))
    exp_g = torch.autograd.grad((exp * w).sum(), (ea, eb))
    out, exp = out.detach(), exp.detach()
    tol = _fp64_tol(backend, clamp)
    torch.testing.assert_close(out, exp, rtol=tol, atol=tol)
    for g, e in zip(got_g, exp_g):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_low_precision_inputs_compute_in_fp32(backend, dtype, estimator):
    logp, ref = _inputs((3, 129), dtype)
    a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    out = rk.token_kl(a, b, estimator=estimator, clamp=None if estimator != "k2" else 0.3, backend=backend)
    assert out.dtype == torch.float32
    ea, eb = logp.double().requires_grad_(True), ref.double().requires_grad_(True)
    exp = reference.token_kl(ea, eb, estimator, None if estimator != "k2" else 0.3)
    torch.testing.assert_close(out.detach(), exp.detach().float(), rtol=1e-5, atol=1e-5)
    # the gradients come out in the inputs' dtype: one rounding, half an ulp of it (fp32 math before)
    w = torch.randn(3, 129, generator=torch.Generator().manual_seed(2))
    got_g = torch.autograd.grad((out * w).sum(), (a, b))
    exp_g = torch.autograd.grad((exp * w.double()).sum(), (ea, eb))
    eps = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    for g, e in zip(got_g, exp_g):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=2 * eps, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_gradcheck(backend, estimator):
    logp, ref = _inputs((3, 7), torch.float64, seed=3)
    logp.requires_grad_(True)
    ref.requires_grad_(True)
    # triton: one random projection (fast_mode); the sweeps compare its gradients with the reference elementwise
    assert torch.autograd.gradcheck(lambda a, b: rk.token_kl(a, b, estimator=estimator, clamp=0.8, backend=backend),
                                    (logp, ref), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    logp, ref = _inputs((6, 10), torch.float32)
    a, b = logp.T, ref.T
    torch.testing.assert_close(rk.token_kl(a, b, estimator="k2", backend=backend), reference.token_kl(a, b, "k2"))


def test_bad_input():
    logp, ref = _inputs((2, 3), torch.float32)
    with pytest.raises(ValueError, match="estimator"):
        rk.token_kl(logp, ref, estimator="k4")
    with pytest.raises(ValueError, match="ref_logp"):
        rk.token_kl(logp, ref[:, :2])
    with pytest.raises(TypeError, match="logp"):
        rk.token_kl(logp.long(), ref)
    with pytest.raises(ValueError, match="clamp"):
        rk.token_kl(logp, ref, clamp=-1.0)
    with pytest.raises(ValueError, match="backend"):
        rk.token_kl(logp, ref, backend="tpu")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck_and_compile():
    logp, ref = _inputs((4, 9), torch.float32)
    logp.requires_grad_(True)
    torch.library.opcheck(torch.ops.rlhf_kernels.token_kl_fwd.default, (logp, ref, 2, 0.5))
    f = torch.compile(lambda a, b: rk.token_kl(a, b, estimator="k3", backend="cpu").sum(), fullgraph=True)
    out = f(logp, ref)
    out.backward()
    torch.testing.assert_close(out, reference.token_kl(logp, ref, "k3").sum())


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_reference(backend):
    logp, ref = (t.cuda() for t in _inputs((4, 257), torch.float32))
    for est in ("k1", "k2", "k3"):
        torch.testing.assert_close(rk.token_kl(logp, ref, estimator=est, backend=backend).cpu(),
                                   reference.token_kl(logp.cpu().double(), ref.cpu().double(), est).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_accurate_over_the_whole_exp_range(backend):
    # k3 = e^{−d} − 1 + d exercises the kernels' exp from underflow to overflow (the CPU kernel uses
    # its own vectorised exp, see csrc/common.h)
    d = torch.cat([torch.linspace(-88.5, 87.0, 20001), torch.tensor([-89.0, -100.0, 100.0, float("nan")])])
    logp, ref = d.clone(), torch.zeros_like(d)
    out = rk.token_kl(logp, ref, estimator="k3", backend=backend)
    exp = reference.token_kl(logp.double(), ref.double(), "k3").float()
    torch.testing.assert_close(out, exp, rtol=3e-7, atol=1e-6, equal_nan=True)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), estimator=st.sampled_from(["k1", "k2", "k3"]),
       clamp=st.sampled_from([None, 0.1, 2.0]), seed=st.integers(0, 2**16))
def test_property_random_shapes(shape, estimator, clamp, seed):
    logp, ref = _inputs(tuple(shape), torch.float64, seed=seed)
    exp = reference.token_kl(logp, ref, estimator, clamp)
    for backend in BACKENDS:
        out = rk.token_kl(logp, ref, estimator=estimator, clamp=clamp, backend=backend)
        tol = _fp64_tol(backend, clamp)
        torch.testing.assert_close(out, exp, rtol=tol, atol=tol)


def _k3_exact(d):
    """e^{−d} − 1 + d and its d-derivative 1 − e^{−d} to 40 digits (mpmath), as float64."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        v = [float(mpmath.exp(-mpmath.mpf(x)) - 1 + mpmath.mpf(x)) for x in d.tolist()]
        g = [float(1 - mpmath.exp(-mpmath.mpf(x))) for x in d.tolist()]
    return torch.tensor(v, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)


def _small_d_inputs(dtype, scale, n=64, seed=0):
    # logp and ref of the size of d itself, so that d = logp − ref is exact in `dtype`; the exact d
    # is taken from the rounded inputs
    g = torch.Generator().manual_seed(seed)
    logp = (torch.rand(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    ref = (logp.double() - torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype)
    return logp, ref, logp.double() - ref.double()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
@pytest.mark.parametrize("scale", [1e-6, 1e-7, 1e-8, 1e-9])
def test_k3_small_d_is_exact(backend, dtype, rtol, scale):
    # k3 ≈ d²/2: the direct e^{−d} − 1 + d has no correct digit here (in float32 already at 1e-4)
    logp, ref, d = _small_d_inputs(dtype, scale, seed=int(-torch.log10(torch.tensor(scale))))
    val, grad = _k3_exact(d)
    lp = logp.clone().requires_grad_(True)
    out = rk.token_kl(lp, ref, estimator="k3", backend=backend)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out.double(), val, rtol=rtol, atol=0)
    torch.testing.assert_close(lp.grad.double(), grad, rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_k3_matches_exact_across_the_series_switch(backend, dtype, rtol):
    # both sides of |d| = 1 (series inside, direct form outside), and large |d|
    d = torch.cat([torch.linspace(-3, 3, 241, dtype=torch.float64), torch.tensor([-1.0, 1.0, -30.0, 40.0]),
                   torch.tensor([1.0, -1.0], dtype=torch.float64) * (1 + 1e-7)])
    logp = d.to(dtype)
    ref = torch.zeros_like(logp)
    val, grad = _k3_exact(logp.double())
    lp = logp.clone().requires_grad_(True)
    out = rk.token_kl(lp, ref, estimator="k3", backend=backend)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out.double(), val, rtol=rtol, atol=0)
    torch.testing.assert_close(lp.grad.double(), grad, rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", cpu_backends("token_rewards"))
def test_token_rewards_k3_small_d_is_exact(backend):
    # token_rewards' KL penalty goes through the same k3 (csrc/common.h kl_value, triton _kl)
    logp, ref, d = _small_d_inputs(torch.float32, 1e-7, n=40, seed=11)
    val, _ = _k3_exact(d)
    mask = torch.ones(4, 10, dtype=torch.bool)
    r = rk.token_rewards(torch.zeros(4), mask, logp=logp.view(4, 10), ref_logp=ref.view(4, 10), kl_coef=1.0,
                         kl_estimator="k3", backend=backend)
    torch.testing.assert_close(r.double().view(-1), -val, rtol=2e-6, atol=0)
