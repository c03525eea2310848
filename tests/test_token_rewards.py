
import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import all_masks, cpu_backends, needs_gpu

BACKENDS = cpu_backends("token_rewards")
ALL = cpu_backends("token_rewards", reference=True)  # for oracles other than the reference
SHAPES = [(1,), (257,), (3, 1), (4, 257), (2, 3, 5)]
KINDS = ["right", "left", "holes", "random", "full", "none"]


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(shape[:-1], generator=g, dtype=torch.float64) * 3
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 4
    ref = logp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    dense = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    return tuple(t.to(dtype) for t in (score, logp, ref, dense))


def _call(fn, score, m, logp, ref, dense, kw):
    return fn(score, m, logp=logp, ref_logp=ref, dense=dense, **kw)


def _reference(score, m, logp, ref, dense, kw):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.token_rewards(d(score), m, d(logp), d(ref), kw.get("kl_coef", 0.0), kw.get("kl_estimator", "k1"),
                                   d(dense), kw.get("dense_coef", 1.0), kw.get("dense_clip"),
                                   kw.get("score_position", "last"))


def _check(backend, score, m, logp, ref, dense, kw, tol):
    out = rk.token_rewards(score, m, logp=logp, ref_logp=ref, dense=dense, backend=backend, **kw)
    exp = _reference(score, m, logp, ref, dense, kw)
    assert out.shape == m.shape
    torch.testing.assert_close(out.double(), exp, rtol=tol, atol=tol)
    return out


# coefficients exactly representable in fp32, so Triton's fp32 scalar arguments lose nothing
CONFIGS = [
    dict(),  # score only
    dict(kl_coef=0.125, kl_estimator="k1"),
    dict(kl_coef=0.25, kl_estimator="k2", score_position="eos+1"),
    dict(kl_coef=0.5, kl_estimator="k3", dense_coef=1.5, dense_clip=0.75),
    dict(dense_coef=-2.0, score_position="eos+1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_matches_reference_fp64(backend, shape, kind, cfg):
    kw = CONFIGS[cfg]
    score, logp, ref, dense = _inputs(shape, seed=shape[-1] + cfg)
    m = all_masks(shape, seed=shape[-1])[kind]
    out = _check(backend, score, m, logp if "kl_coef" in kw else None, ref if "kl_coef" in kw else None,
                 dense if "dense_coef" in kw else None, kw, 1e-12)
    assert out.dtype == torch.float64
    # zero at masked positions except where "eos+1" puts the score
    last = reference._last_valid_index(m)
    pos = last + 1 if kw.get("score_position") == "eos+1" else last
    keep = torch.nn.functional.one_hot(pos.clamp(0, m.shape[-1] - 1), m.shape[-1]).bool() & (last >= 0)[..., None]
    assert not out[~m & ~keep].any()


@pytest.mark.parametrize("backend", ALL)
def test_hand_computed(backend):
    D = dict(dtype=torch.float64)
    score, mask = torch.tensor([5.0], **D), torch.tensor([[1, 1, 0, 0]]).bool()
    logp, ref = torch.tensor([[-1.0, -2, -3, -4]], **D), torch.tensor([[-1.5, -1, 0, 0]], **D)
    got = rk.token_rewards(score, mask, logp=logp, ref_logp=ref, kl_coef=0.5, backend=backend)
    torch.testing.assert_close(got, torch.tensor([[-0.25, 5.5, 0, 0]], **D))
    got = rk.token_rewards(score, mask, logp=logp, ref_logp=ref, kl_coef=0.5, score_position="eos+1", backend=backend)
    torch.testing.assert_close(got, torch.tensor([[-0.25, 0.5, 5, 0]], **D))
    full = rk.token_rewards(score, torch.ones(1, 4, dtype=torch.bool), score_position="eos+1", backend=backend)
    torch.testing.assert_close(full, torch.tensor([[0, 0, 0, 5.0]], **D))  # clamped to the row end
    dense = rk.token_rewards(score, mask, dense=torch.tensor([[1.0, -3, 9, 9]], **D), dense_coef=2.0, dense_clip=4.0,
                             backend=backend)
    torch.testing.assert_close(dense, torch.tensor([[2, 1.0, 0, 0]], **D))
    assert torch.equal(rk.token_rewards(score, torch.zeros(1, 4, dtype=torch.bool), backend=backend),
                       torch.zeros(1, 4, **D))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_style_coefficients(backend):
    score, logp, ref, dense = _inputs((4, 257), seed=1)
    m = all_masks((4, 257), seed=1)["holes"]
    kw = dict(kl_coef=0.05, kl_estimator="k3", dense_coef=0.1, dense_clip=0.3)
    # Triton receives float scalars as fp32 on GPU (0.05, 0.1, 0.3 round at ~1e-8 relative)
    _check(backend, score, m, logp, ref, dense, kw, 1e-12)  # every backend: exact to rounding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(backend, dtype):
    score, logp, ref, dense = _inputs((3, 129), dtype, seed=2)
    m = all_masks((3, 129), seed=2)["right"]
    kw = dict(kl_coef=0.1, kl_estimator="k3", dense_coef=0.5, dense_clip=1.0, score_position="eos+1")
    out = rk.token_rewards(score, m, logp=logp, ref_logp=ref, dense=dense, backend=backend, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(score, m, logp, ref, dense, kw).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_promote_to_fp64(backend):
    score, logp, ref, dense = _inputs((3, 17), seed=3)
    m = all_masks((3, 17), seed=3)["holes"]
    kw = dict(kl_coef=0.25)
    out = rk.token_rewards(score, m, logp=logp.float(), ref_logp=ref.float(), backend=backend, **kw)
    assert out.dtype == torch.float64  # the score is fp64
    torch.testing.assert_close(out, _reference(score, m, logp.float(), ref.float(), None, kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    score, logp, ref, dense = _inputs((6, 40), torch.float32, seed=4)
    m = all_masks((40, 6), seed=4)["random"].T
    lp, rf, dn = (t.T.contiguous().T for t in (logp, ref, dense))  # same values, column-major strides
    assert not lp.is_contiguous() and not m.is_contiguous()
    kw = dict(kl_coef=0.5, kl_estimator="k2", dense_coef=1.5)
    _check(backend, score, m, lp, rf, dn, kw, 1e-6)
    _check(backend, score[::1], m, lp, rf, dn, dict(score_position="eos+1"), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_inputs_ignored_when_kl_coef_is_zero(backend):
    score, logp, ref, _ = _inputs((2, 8), seed=5)
    m = torch.ones(2, 8, dtype=torch.bool)
    logp[0, 3] = float("nan")
    out = rk.token_rewards(score, m, logp=logp, ref_logp=ref, kl_coef=0.0, backend=backend)
    assert torch.isfinite(out).all()


def test_triton_tiles(monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from rlhf_kernels.triton import token_rewards as tr
    monkeypatch.setattr(tr, "MAX_BLOCK", 16)  # T = 257 spans 17 tiles
    score, logp, ref, dense = _inputs((5, 257), seed=6)
    for pos in ("last", "eos+1"):
        for m in all_masks((5, 257), seed=6).values():
            _check("triton", score, m, logp, ref, dense, dict(kl_coef=0.5, dense_coef=0.25, score_position=pos), 1e-12)


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), T=st.integers(1, 40), kind=st.sampled_from(KINDS),
       cfg=st.integers(0, len(CONFIGS) - 1), seed=st.integers(0, 10 ** 6))
def test_property_random_shapes_andall_masks(lead, T, kind, cfg, seed):
    shape = tuple(lead) + (T,)
    kw = CONFIGS[cfg]
    score, logp, ref, dense = _inputs(shape, seed=seed)
    m = all_masks(shape, seed)[kind]
    for backend in BACKENDS:
        _check(backend, score, m, logp, ref, dense if "dense_coef" in kw else None, kw, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_raises_instead_of_losing_the_gradient(backend):
    score, logp, ref, dense = _inputs((2, 5), seed=8)
    logp.requires_grad_(True)
    m = torch.ones(2, 5, dtype=torch.bool)
    out = rk.token_rewards(score, m, logp=logp, ref_logp=ref, kl_coef=0.5, backend=backend)
    torch.testing.assert_close(out, _reference(score, m, logp.detach(), ref, None, dict(kl_coef=0.5)))
    with pytest.raises(RuntimeError, match="not differentiable"):
        (out.sum() + logp.sum()).backward()


def test_bad_input():
    m = torch.ones(2, 4, dtype=torch.bool)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="dense_clip"):
        rk.token_rewards(torch.randn(2), m, dense=x, dense_clip=0.0)
    with pytest.raises(ValueError, match="dense"):
        rk.token_rewards(torch.randn(2), m, dense=x[:, :3])
    with pytest.raises(TypeError, match="logp"):
        rk.token_rewards(torch.randn(2), m, logp=x.long(), ref_logp=x, kl_coef=0.1)
    with pytest.raises(ValueError, match="mask"):
        rk.token_rewards(torch.randn(()), torch.tensor(True))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck_and_compile():
    score, logp, ref, dense = _inputs((4, 9), torch.float32, seed=9)
    m = all_masks((4, 9), seed=9)["holes"]
    op = torch.ops.rlhf_kernels.token_rewards.default
    torch.library.opcheck(op, (score, m, logp, ref, 0.1, 2, dense, 0.5, 1.0, True))
    torch.library.opcheck(op, (score, m, None, None, 0.0, 0, None, 1.0, 0.0, False))
    kw = dict(kl_coef=0.1, kl_estimator="k3", dense_coef=0.5, dense_clip=1.0, score_position="eos+1")
    f = torch.compile(lambda s, mm, a, b, d: rk.token_rewards(s, mm, logp=a, ref_logp=b, dense=d, backend="cpu", **kw),
                      fullgraph=True)
    torch.testing.assert_close(f(score, m, logp, ref, dense), _reference(score, m, logp, ref, dense, kw).float())


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_opcheck_triton_op():
    score, logp, ref, dense = _inputs((2, 9), torch.float32, seed=10)
    m = all_masks((2, 9), seed=10)["holes"]
    # test_aot_dispatch_dynamic is left out: under the interpreter it hands functional tensors to Triton,
    # which reads their (absent) storage; on a GPU the full opcheck runs in test_gpu_opcheck
    torch.library.opcheck(torch.ops.rlhf_kernels.token_rewards_triton.default,
                          (score, m, logp, ref, 0.1, 2, dense, 0.5, 1.0, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_gpu
def test_gpu_opcheck():
    score, logp, ref, dense = (t.cuda() for t in _inputs((2, 9), torch.float32, seed=10))
    m = all_masks((2, 9), seed=10)["holes"].cuda()
    for op in (torch.ops.rlhf_kernels.token_rewards.default, torch.ops.rlhf_kernels.token_rewards_triton.default):
        torch.library.opcheck(op, (score, m, logp, ref, 0.1, 2, dense, 0.5, 1.0, True))


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("T", [1, 257, 3000])
def test_gpu_matches_reference(backend, T):
    score, logp, ref, dense = _inputs((5, T), seed=11)
    for m in all_masks((5, T), seed=11).values():
        for kw in CONFIGS:
            out = rk.token_rewards(score.cuda(), m.cuda(), logp=logp.cuda(), ref_logp=ref.cuda(),
                                   dense=dense.cuda() if "dense_coef" in kw else None, backend=backend, **kw)
            exp = _reference(score, m, logp, ref, dense if "dense_coef" in kw else None, kw)
            torch.testing.assert_close(out.cpu(), exp, rtol=1e-12, atol=1e-12)
