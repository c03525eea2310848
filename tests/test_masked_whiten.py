import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import all_masks, cpu_backends, needs_gpu

BACKENDS = cpu_backends("masked_whiten")
ALL = cpu_backends("masked_whiten", reference=True)  # for oracles other than the reference
# (3, 5000) spans several of the CPU and Triton kernels' 4096-element partials
SHAPES = [(), (1,), (257,), (3, 1), (4, 257), (2, 3, 5), (3, 5000)]
KINDS = ["right", "left", "holes", "random", "full", "none", "one"]


def _masks(shape, seed):
    ms = all_masks(shape, seed)
    one = torch.zeros(shape, dtype=torch.bool).reshape(-1)
    one[-1] = True  # n = 1: the unbiased variance divides by 1
    ms["one"] = one.reshape(shape)
    return ms


def _x(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)


def _check(backend, x, m, tol, **kw):
    out = rk.masked_whiten(x, m, backend=backend, **kw)
    exp = reference.masked_whiten(x.double(), m, kw.get("shift_mean", True), kw.get("unbiased", False),
                                  kw.get("eps", 1e-8))
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), exp, rtol=tol, atol=tol)
    assert not out[~m].any(), "masked positions must be exactly 0"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_matches_reference_fp64(backend, shape, kind, shift_mean, unbiased):
    x = _x(shape, seed=sum(shape) + 1)
    m = _masks(shape, seed=sum(shape))[kind]
    # eps exactly representable in fp32, so Triton's fp32 scalar argument loses nothing
    # eps = 0 (no regularisation) where the variance is well defined; n ≤ 1 has var = 0 and needs eps > 0
    out = _check(backend, x, m, 1e-12, shift_mean=shift_mean, unbiased=unbiased, eps=0.5 if m.sum() <= 1 else 0.0)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("backend", ALL)
def test_hand_computed(backend):
    x = torch.tensor([1.0, 100, 2, 6], dtype=torch.float64)
    m = torch.tensor([1, 0, 1, 1]).bool()
    s = math.sqrt(14 / 3)
    got = rk.masked_whiten(x, m, eps=0.0, backend=backend)
    torch.testing.assert_close(got, torch.tensor([-2 / s, 0, -1 / s, 3 / s], dtype=torch.float64))
    got = rk.masked_whiten(x, m, eps=0.0, unbiased=True, shift_mean=False, backend=backend)
    torch.testing.assert_close(got, torch.tensor([-2 / math.sqrt(7) + 3, 0, -1 / math.sqrt(7) + 3,
                                                  3 / math.sqrt(7) + 3], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_eps(backend):
    x = _x((4, 257), seed=1)
    m = _masks((4, 257), seed=1)["holes"]
    _check(backend, x, m, 1e-12)
    _check(backend, x * 1e-4, m, 1e-9)  # var ≈ 1e-7: eps = 1e-8 matters; fp32 rounding of eps is 1e-17


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(backend, dtype):
    x = _x((3, 129), dtype, seed=2)
    m = _masks((3, 129), seed=2)["right"]
    out = rk.masked_whiten(x, m, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.masked_whiten(x.double(), m).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_non_finite_masked_values(backend):
    x = _x((40, 6), seed=3).T
    m = _masks((40, 6), seed=3)["random"].T
    x = x.clone().T.contiguous().T  # column-major strides again, with writable storage
    x[~m] = float("nan")  # masked positions are ignored, whatever they hold
    x[~m & (torch.arange(40) % 2 == 0)] = float("inf")
    assert not x.is_contiguous() and not m.is_contiguous()
    out = _check(backend, x, m, 1e-12, unbiased=True)
    assert torch.isfinite(out).all()


def test_triton_many_partials(monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from rlhf_kernels.triton import masked_whiten as tw
    monkeypatch.setattr(tw, "CHUNK", 64)  # 4·257 elements: 17 partials ...
    monkeypatch.setattr(tw, "MERGE_BLOCK", 4)  # ... merged in 5 tiles, some partials empty
    x = _x((4, 257), seed=4)
    for _kind, m in _masks((4, 257), seed=4).items():
        _check("triton", x, m, 1e-12, unbiased=True, eps=0.5 if m.sum() <= 1 else 0.0)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=0, max_size=3), kind=st.sampled_from(KINDS),
       shift_mean=st.booleans(), unbiased=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_property_random_shapes_and_masks(shape, kind, shift_mean, unbiased, seed):
    shape = tuple(shape)
    x = _x(shape, seed=seed)
    m = _masks(shape, seed)[kind]
    for backend in BACKENDS:
        _check(backend, x, m, 1e-12, shift_mean=shift_mean, unbiased=unbiased, eps=0.5)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_deterministic_cpu_any_thread_count():
    x = _x((64, 999), torch.float32, seed=5)  # 16 partials
    m = _masks((64, 999), seed=5)["holes"]
    first = rk.masked_whiten(x, m, backend="cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = rk.masked_whiten(x, m, backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(first, single)
    assert torch.equal(first, rk.masked_whiten(x, m, backend="cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_raises_instead_of_losing_the_gradient(backend):
    x = _x((2, 5), seed=6).requires_grad_(True)
    m = torch.ones(2, 5, dtype=torch.bool)
    out = rk.masked_whiten(x, m, backend=backend)
    torch.testing.assert_close(out, reference.masked_whiten(x.detach(), m))
    with pytest.raises(RuntimeError, match="not differentiable"):
        (out.sum() + x.sum()).backward()


def test_bad_input():
    x = torch.randn(2, 4)
    m = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="eps"):
        rk.masked_whiten(x, m, eps=-1.0)
    with pytest.raises(ValueError, match="mask"):
        rk.masked_whiten(x, m[:, :3])
    with pytest.raises(TypeError, match="mask"):
        rk.masked_whiten(x, m.to(torch.complex64))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck_and_compile():
    x = _x((4, 9), torch.float32, seed=7)
    m = _masks((4, 9), seed=7)["holes"]
    torch.library.opcheck(torch.ops.rlhf_kernels.masked_whiten.default, (x, m, False, True, 1e-8))
    f = torch.compile(lambda a, mm: rk.masked_whiten(a, mm, unbiased=True, backend="cpu"), fullgraph=True)
    torch.testing.assert_close(f(x, m), reference.masked_whiten(x, m, unbiased=True))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_opcheck_triton_op():
    x = _x((2, 9), torch.float32, seed=8)
    m = _masks((2, 9), seed=8)["holes"]
    # test_aot_dispatch_dynamic is left out: under the interpreter it hands functional tensors to Triton,
    # which reads their (absent) storage; on a GPU the full opcheck runs in test_gpu_opcheck
    torch.library.opcheck(torch.ops.rlhf_kernels.masked_whiten_triton.default, (x, m, True, False, 1e-8),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_gpu
def test_gpu_opcheck():
    x = _x((2, 9), torch.float32, seed=8).cuda()
    m = _masks((2, 9), seed=8)["holes"].cuda()
    for op in (torch.ops.rlhf_kernels.masked_whiten.default, torch.ops.rlhf_kernels.masked_whiten_triton.default):
        torch.library.opcheck(op, (x, m, True, False, 1e-8))


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(1,), (5, 257), (7, 3000), (1 << 20,)])
def test_gpu_matches_reference_and_is_deterministic(backend, shape):
    x = _x(shape, seed=9)
    for _kind, m in _masks(shape, seed=9).items():
        for unbiased in (False, True):
            out = rk.masked_whiten(x.cuda(), m.cuda(), unbiased=unbiased, eps=0.5, backend=backend)
            torch.testing.assert_close(out.cpu(), reference.masked_whiten(x, m, True, unbiased, 0.5),
                                       rtol=1e-12, atol=1e-12)
            again = rk.masked_whiten(x.cuda(), m.cuda(), unbiased=unbiased, eps=0.5, backend=backend)
            assert torch.equal(out, again)
