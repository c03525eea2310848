import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu, ragged_masks

BACKENDS = cpu_backends("ppo_value_loss")
ALL = cpu_backends("ppo_value_loss", reference=True)  # for oracles other than the reference
FAST = [b for b in BACKENDS if b != "triton"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
SHAPES = [(1,), (257,), (3, 1), (4, 257), (2, 3, 5)]


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    # V − V_old spread across ±0.2 so both the clipped and the unclipped branch occur
    old = values + torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    returns = values + torch.randn(shape, generator=g, dtype=torch.float64)
    return values.to(dtype), old.to(dtype), returns.to(dtype)


def _mask(shape, kind, seed=0):
    R = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return ragged_masks(R, shape[-1], torch.Generator().manual_seed(seed))[kind].reshape(shape)


def _run(fn, v, vo, ret, mask, **kw):
    ins = [t.detach().clone().requires_grad_(True) for t in (v, vo, ret)]
    loss, stats = fn(*ins, mask, **kw)
    loss.backward()
    return loss, stats, [t.grad if t.grad is not None else torch.zeros_like(t) for t in ins]


def _ref(v, vo, ret, mask, clip=0.2, aggregation="token-mean"):
    return reference.ppo_value_loss(v, vo, ret, mask, clip, aggregation)


def _triton_loss_tol(v, vo, ret, mask, aggregation):
    """Triton gets `clip` as an fp32 scalar: a clipped token's ½(V_old ± clip − R)² then moves by up to
    |V_old ± clip − R|·clip·2⁻²⁴ < 1e-7·(|V_old − R| + 1) for clip < 1; the loss aggregates those."""
    err = (vo - ret).abs() + 1.0
    return 1e-7 * max(1.0, reference.aggregate(err, mask, aggregation).item())


def _close(out, exp, tol, loss_tol=None):
    (loss, stats, grads), (rloss, rstats, rgrads) = out, exp
    torch.testing.assert_close(loss, rloss, rtol=tol, atol=tol if loss_tol is None else loss_tol)
    s = stats["vf_clipfrac"]
    assert set(stats) == {"vf_clipfrac"} and s.dtype == torch.float32 and s.dim() == 0 and not s.requires_grad
    torch.testing.assert_close(s, rstats["vf_clipfrac"], rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_matches_reference_fp64(backend, shape, aggregation, clip):
    v, vo, ret = _inputs(shape, seed=len(shape) * 1000 + shape[-1])
    for kind in ("right", "left", "holes"):
        if backend == "triton" and kind != "holes":
            continue
        mask = _mask(shape, kind)
        out = _run(lambda *a, **k: rk.ppo_value_loss(*a, backend=backend, **k), v, vo, ret, mask, clip=clip,
                   aggregation=aggregation)
        assert out[0].dtype == torch.float64 and out[0].dim() == 0
        exp = _run(_ref, v, vo, ret, mask, clip=clip, aggregation=aggregation)
        if backend == "triton":  # clip reaches Triton as an fp32 scalar
            _close(out, exp, 1e-7, _triton_loss_tol(v, vo, ret, mask, aggregation))
        else:
            _close(out, exp, 1e-12)


def test_inputs_exercise_every_branch():
    v, vo, ret = _inputs((4, 257), seed=4257)
    dv = v - vo
    vc = vo + dv.clamp(-0.2, 0.2)
    clipped = (vc - ret) ** 2 > (v - ret) ** 2
    assert clipped.any() and (~clipped).any() and (dv.abs() < 0.2).any() and (dv.abs() > 0.2).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_masked_garbage_never_leaks(backend, aggregation):
    v, vo, ret = _inputs((3, 40), seed=7)
    mask = _mask((3, 40), "holes", seed=7)
    fn = lambda *a, **k: rk.ppo_value_loss(*a, backend=backend, **k)  # noqa: E731
    clean = _run(fn, v, vo, ret, mask, aggregation=aggregation)
    bad = [t.clone() for t in (v, vo, ret)]
    for t, x in zip(bad, (float("inf"), float("-inf"), float("nan"))):
        t[~mask] = x
    dirty = _run(fn, *bad, mask, aggregation=aggregation)
    _close(dirty, clean, 0.0)
    for g in dirty[2]:
        assert torch.isfinite(g).all() and (g[~mask] == 0).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("shape", [(3, 5), (2, 0), (0, 4)])
def test_all_masked_gives_zero(backend, aggregation, shape):
    v, vo, ret = _inputs(shape, torch.float32, seed=1)
    loss, stats, grads = _run(lambda *a, **k: rk.ppo_value_loss(*a, backend=backend, **k), v, vo, ret,
                              torch.zeros(shape, dtype=torch.bool), aggregation=aggregation)
    assert loss.item() == 0.0 and stats["vf_clipfrac"].item() == 0.0
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(backend, dtype):
    v, vo, ret = _inputs((3, 129), dtype, seed=5)
    mask = _mask((3, 129), "holes", seed=5)
    loss, stats, grads = _run(lambda *a, **k: rk.ppo_value_loss(*a, backend=backend, **k), v, vo, ret, mask,
                              aggregation="seq-mean-token-sum")
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    exp = _run(_ref, v.double(), vo.double(), ret.double(), mask, aggregation="seq-mean-token-sum")
    torch.testing.assert_close(loss.double(), exp[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["vf_clipfrac"], exp[1]["vf_clipfrac"])
    for g, r in zip(grads, exp[2]):
        torch.testing.assert_close(g, r.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_gradcheck(backend, aggregation, clip):
    v, vo, ret = _inputs((3, 7), seed=11)
    mask = _mask((3, 7), "holes", seed=11)
    ins = [t.clone().requires_grad_(True) for t in (v, vo, ret)]
    # triton: one random projection (fast_mode); the sweeps compare its gradients with the reference elementwise
    assert torch.autograd.gradcheck(
        lambda a, b, c: rk.ppo_value_loss(a, b, c, mask, clip=clip, aggregation=aggregation, backend=backend)[0], ins,
        fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    v, vo, ret = _inputs((10, 6), torch.float32, seed=3)
    mask = _mask((10, 6), "holes", seed=3).T
    a, b, c = v.T, vo.T, ret.T
    out = _run(lambda *x, **k: rk.ppo_value_loss(*x, backend=backend, **k), a, b, c, mask)
    exp = _run(_ref, a.double(), b.double(), c.double(), mask)
    torch.testing.assert_close(out[0].double(), exp[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(out[2], exp[2]):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 70), density=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16),
       aggregation=st.sampled_from(AGGS), clip=st.sampled_from([None, 0.1, 0.5]))
def test_property_matches_reference(B, T, density, seed, aggregation, clip):
    v, vo, ret = _inputs((B, T), seed=seed)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < density
    exp = _run(_ref, v, vo, ret, mask, clip=clip, aggregation=aggregation)
    for backend in FAST:
        _close(_run(lambda *a, **k: rk.ppo_value_loss(*a, backend=backend, **k), v, vo, ret, mask, clip=clip,
                    aggregation=aggregation), exp, 1e-12)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 40), density=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16),
       aggregation=st.sampled_from(AGGS))
def test_property_triton_matches_reference(B, T, density, seed, aggregation):
    v, vo, ret = _inputs((B, T), seed=seed)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < density
    _close(_run(lambda *a, **k: rk.ppo_value_loss(*a, backend="triton", **k), v, vo, ret, mask,
                aggregation=aggregation), _run(_ref, v, vo, ret, mask, aggregation=aggregation), 1e-7,
           _triton_loss_tol(v, vo, ret, mask, aggregation))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_deterministic_cpu_any_thread_count():
    # the loss and vf_clipfrac are sums over rows that run in parallel: the combine order must not follow them
    v, vo, ret = _inputs((64, 999), torch.float32, seed=9)
    mask = _mask((64, 999), "holes", seed=9)
    fn = lambda *x, **k: rk.ppo_value_loss(*x, backend="cpu", **k)  # noqa: E731
    n = torch.get_num_threads()
    try:
        a = _run(fn, v, vo, ret, mask, aggregation="seq-mean-token-mean")
        torch.set_num_threads(1)
        b = _run(fn, v, vo, ret, mask, aggregation="seq-mean-token-mean")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["vf_clipfrac"], b[1]["vf_clipfrac"])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_bad_input():
    v, vo, ret = _inputs((2, 3), torch.float32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="aggregation"):
        rk.ppo_value_loss(v, vo, ret, mask, aggregation="sum")
    with pytest.raises(ValueError, match="clip"):
        rk.ppo_value_loss(v, vo, ret, mask, clip=0.0)
    with pytest.raises(ValueError, match="returns"):
        rk.ppo_value_loss(v, vo, ret[:, :1], mask)
    with pytest.raises(TypeError, match="old_values"):
        rk.ppo_value_loss(v, vo.int(), ret, mask)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck_and_compile():
    v, vo, ret = _inputs((4, 9), torch.float32, seed=4)
    mask = _mask((4, 9), "holes", seed=4)
    vv = v.clone().requires_grad_(True)
    rr = ret.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.rlhf_kernels.ppo_value_loss_fwd.default, (vv, vo, rr, mask, 0.2, 1))
    torch.library.opcheck(torch.ops.rlhf_kernels.ppo_value_loss_fwd.default, (vv, vo, ret, mask, 0.0, 3))

    def f(a, b, c, m):
        loss, stats = rk.ppo_value_loss(a, b, c, m, aggregation="seq-mean-token-mean", backend="cpu")
        return loss, stats["vf_clipfrac"]

    out = torch.compile(f, fullgraph=True)(vv, vo, ret, mask)
    out[0].backward()
    exp = _run(_ref, v, vo, ret, mask, aggregation="seq-mean-token-mean")
    torch.testing.assert_close(out[0], exp[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], exp[1]["vf_clipfrac"])
    torch.testing.assert_close(vv.grad, exp[2][0], rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("aggregation", AGGS)
def test_gpu_matches_reference(backend, aggregation):
    v, vo, ret = _inputs((5, 1030), torch.float32, seed=6)
    mask = _mask((5, 1030), "holes", seed=6)
    out = _run(lambda *a, **k: rk.ppo_value_loss(*a, backend=backend, **k), v.cuda(), vo.cuda(), ret.cuda(),
               mask.cuda(), aggregation=aggregation)
    exp = _run(_ref, v.double(), vo.double(), ret.double(), mask, aggregation=aggregation)
    torch.testing.assert_close(out[0].cpu().double(), exp[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(out[2], exp[2]):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
def test_opcheck_triton_op():
    # no test_aot_dispatch_*: the interpreter needs real host pointers (see test_ppo_policy_loss)
    v, vo, ret = _inputs((3, 9), torch.float32, seed=12)
    mask = _mask((3, 9), "holes", seed=12)
    torch.library.opcheck(torch.ops.rlhf_kernels.ppo_value_loss_fwd_triton.default,
                          (v.requires_grad_(True), vo, ret, mask, 0.2, 2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
