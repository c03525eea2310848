import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu, ragged_masks

BACKENDS = cpu_backends("ppo_policy_loss")
ALL = cpu_backends("ppo_policy_loss", reference=True)  # for oracles other than the reference
FAST = [b for b in BACKENDS if b != "triton"]  # the interpreter is slow: triton gets the smaller sweeps
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
SHAPES = [(1,), (257,), (3, 1), (4, 257), (2, 3, 5)]
CLIPS = {"sym": dict(clip_low=0.2), "asym": dict(clip_low=0.1, clip_high=0.28), "dual": dict(clip_low=0.2, dual_clip=3.0)}


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 5
    # log-ratios spread so that both clip sides, the unclipped middle and (with A < 0) the dual cap all occur
    old = logp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.6
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), adv.to(dtype)


def _mask(shape, kind, seed=0):
    T = shape[-1]
    R = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return ragged_masks(R, T, torch.Generator().manual_seed(seed))[kind].reshape(shape)


def _run(fn, logp, old, adv, mask, **kw):
    """loss, stats and the gradients of all three inputs (zeros where autograd gives none)."""
    ins = [t.detach().clone().requires_grad_(True) for t in (logp, old, adv)]
    loss, stats = fn(*ins, mask, **kw)
    loss.backward()
    return loss, stats, [t.grad if t.grad is not None else torch.zeros_like(t) for t in ins]


def _ref(logp, old, adv, mask, clip_low=0.2, clip_high=None, dual_clip=None, aggregation="token-mean"):
    return reference.ppo_policy_loss(logp, old, adv, mask, clip_low, clip_high, dual_clip, aggregation)


def _triton_loss_tol(adv, mask, aggregation):
    """Triton gets the clip bounds as fp32 scalars: each clipped token's loss −A·(1 ± clip) then
    moves by up to |A|·2⁻²⁴, so the fp64 loss agrees to 1e-7 times the aggregate of |A|."""
    return 1e-7 * max(1.0, reference.aggregate(adv.abs(), mask, aggregation).item())


def _close(out, exp, tol, loss_tol=None):
    (loss, stats, grads), (rloss, rstats, rgrads) = out, exp
    torch.testing.assert_close(loss, rloss, rtol=tol, atol=tol if loss_tol is None else loss_tol)
    for k in ("clipfrac", "approx_kl"):
        assert stats[k].dtype == torch.float32 and stats[k].dim() == 0 and not stats[k].requires_grad
        torch.testing.assert_close(stats[k], rstats[k], rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("clips", list(CLIPS))
def test_matches_reference_fp64(backend, shape, aggregation, clips):
    logp, old, adv = _inputs(shape, seed=len(shape) * 1000 + shape[-1])
    for kind in ("right", "left", "holes"):
        if backend == "triton" and kind != "holes":
            continue
        mask = _mask(shape, kind)
        kw = dict(CLIPS[clips], aggregation=aggregation)
        out = _run(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k), logp, old, adv, mask, **kw)
        exp = _run(_ref, logp, old, adv, mask, **kw)
        assert out[0].dtype == torch.float64 and out[0].dim() == 0
        # Triton passes float scalars (the clip bounds) as fp32, so fp64 results agree to that precision
        if backend == "triton":
            _close(out, exp, 1e-7, _triton_loss_tol(adv, mask, aggregation))
        else:
            _close(out, exp, 1e-12)


def test_inputs_exercise_every_branch():
    # the sweep above is only meaningful if the data really takes each branch
    logp, old, adv = _inputs((4, 257), seed=4257)
    ratio = (logp - old).exp()
    assert ((ratio < 0.8) & (adv < 0)).any() and ((ratio > 1.2) & (adv > 0)).any()
    assert ((ratio > 3) & (adv < 0)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGS)
def test_masked_garbage_never_leaks(backend, aggregation):
    logp, old, adv = _inputs((3, 40), seed=7)
    mask = _mask((3, 40), "holes", seed=7)
    clean = _run(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k), logp, old, adv, mask,
                 dual_clip=3.0, aggregation=aggregation)
    bad = [t.clone() for t in (logp, old, adv)]
    for t, v in zip(bad, (float("inf"), float("-inf"), float("nan"))):
        t[~mask] = v
    dirty = _run(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k), *bad, mask,
                 dual_clip=3.0, aggregation=aggregation)
    _close(dirty, clean, 0.0)
    for g in dirty[2]:
        assert torch.isfinite(g).all() and (g[~mask] == 0).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("shape", [(3, 5), (2, 0), (0, 4)])
def test_all_masked_gives_zero(backend, aggregation, shape):
    logp, old, adv = _inputs(shape, torch.float32, seed=1)
    mask = torch.zeros(shape, dtype=torch.bool)
    loss, stats, grads = _run(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k), logp, old, adv, mask,
                              aggregation=aggregation)
    assert loss.item() == 0.0 and stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    for g in grads:
        assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(backend, dtype):
    logp, old, adv = _inputs((3, 129), dtype, seed=5)
    mask = _mask((3, 129), "holes", seed=5)
    loss, stats, grads = _run(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k), logp, old, adv, mask,
                              clip_low=0.1, clip_high=0.3, aggregation="seq-mean-token-mean")
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    exp = _run(_ref, logp.double(), old.double(), adv.double(), mask, clip_low=0.1, clip_high=0.3,
               aggregation="seq-mean-token-mean")
    torch.testing.assert_close(loss.double(), exp[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["approx_kl"], exp[1]["approx_kl"], rtol=1e-5, atol=1e-6)
    # the gradient is computed in fp32 and rounded once to the input dtype
    for g, r in zip(grads, exp[2]):
        torch.testing.assert_close(g, r.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGS)
@pytest.mark.parametrize("clips", ["asym", "dual"])
def test_gradcheck(backend, aggregation, clips):
    if backend == "triton" and clips == "asym":
        pytest.skip("the interpreter is slow; dual covers triton's branches (and the sweeps compare its gradients)")
    logp, old, adv = _inputs((3, 7), seed=11)
    mask = _mask((3, 7), "holes", seed=11)
    ins = [t.clone().requires_grad_(True) for t in (logp, old, adv)]
    # triton: one random projection (fast_mode); the sweeps compare its gradients with the reference elementwise
    assert torch.autograd.gradcheck(
        lambda a, b, c: rk.ppo_policy_loss(a, b, c, mask, aggregation=aggregation, backend=backend, **CLIPS[clips])[0],
        ins, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_logp_gets_a_gradient_when_only_it_requires_one(backend):
    logp, old, adv = _inputs((2, 9), seed=2)
    mask = torch.ones(2, 9, dtype=torch.bool)
    logp.requires_grad_(True)
    loss, stats = rk.ppo_policy_loss(logp, old, adv, mask, backend=backend)
    loss.backward()
    assert logp.grad is not None and old.grad is None and adv.grad is None
    assert not stats["clipfrac"].requires_grad and not stats["approx_kl"].requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    logp, old, adv = _inputs((10, 6), torch.float32, seed=3)
    mask = _mask((10, 6), "holes", seed=3).T
    a, b, c = logp.T, old.T, adv.T
    assert not a.is_contiguous()
    out = _run(lambda *x, **k: rk.ppo_policy_loss(*x, backend=backend, **k), a, b, c, mask, dual_clip=2.0)
    exp = _run(_ref, a.double(), b.double(), c.double(), mask, dual_clip=2.0)
    torch.testing.assert_close(out[0].double(), exp[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(out[2], exp[2]):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 70), density=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16),
       aggregation=st.sampled_from(AGGS), clips=st.sampled_from(list(CLIPS)))
def test_property_matches_reference(B, T, density, seed, aggregation, clips):
    logp, old, adv = _inputs((B, T), seed=seed)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < density
    kw = dict(CLIPS[clips], aggregation=aggregation)
    exp = _run(_ref, logp, old, adv, mask, **kw)
    for backend in FAST:
        _close(_run(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k), logp, old, adv, mask, **kw), exp,
               1e-12)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 40), density=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16),
       aggregation=st.sampled_from(AGGS))
def test_property_triton_matches_reference(B, T, density, seed, aggregation):
    logp, old, adv = _inputs((B, T), seed=seed)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < density
    kw = dict(clip_low=0.2, dual_clip=3.0, aggregation=aggregation)
    _close(_run(lambda *a, **k: rk.ppo_policy_loss(*a, backend="triton", **k), logp, old, adv, mask, **kw),
           _run(_ref, logp, old, adv, mask, **kw), 1e-7, _triton_loss_tol(adv, mask, aggregation))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_deterministic_cpu_any_thread_count():
    # the loss and the statistics are sums over rows that run in parallel: the combine order must not follow them
    logp, old, adv = _inputs((64, 999), torch.float32, seed=9)
    mask = _mask((64, 999), "holes", seed=9)
    n = torch.get_num_threads()
    try:
        a = _run(lambda *x, **k: rk.ppo_policy_loss(*x, backend="cpu", **k), logp, old, adv, mask,
                 aggregation="seq-mean-token-mean")
        torch.set_num_threads(1)
        b = _run(lambda *x, **k: rk.ppo_policy_loss(*x, backend="cpu", **k), logp, old, adv, mask,
                 aggregation="seq-mean-token-mean")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_bad_input():
    logp, old, adv = _inputs((2, 3), torch.float32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="aggregation"):
        rk.ppo_policy_loss(logp, old, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        rk.ppo_policy_loss(logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="mask"):
        rk.ppo_policy_loss(logp, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match="advantages"):
        rk.ppo_policy_loss(logp, old, adv[:1], mask)
    with pytest.raises(TypeError, match="old_logp"):
        rk.ppo_policy_loss(logp, old.long(), adv, mask)
    with pytest.raises(ValueError, match="clip_low"):
        rk.ppo_policy_loss(logp, old, adv, mask, clip_low=-0.1)
    with pytest.raises(ValueError, match="logp"):
        rk.ppo_policy_loss(logp[0, 0], old[0, 0], adv[0, 0], mask[0, 0])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck():
    # torch.compile(fullgraph=True) of this op: tests/test_ppo_policy_loss_grpo.py::test_opcheck_and_compile_cpu
    logp, old, adv = _inputs((4, 9), torch.float32, seed=4)
    mask = _mask((4, 9), "holes", seed=4)
    lp = logp.clone().requires_grad_(True)
    op = torch.ops.rlhf_kernels.ppo_policy_loss_fwd.default
    torch.library.opcheck(op, (lp, old, adv, mask, None, None, 0.2, 0.28, 3.0, 1, 0, 0, 0.0, 2, 0.0))
    ad = adv.clone().requires_grad_(True)
    torch.library.opcheck(op, (lp, old, ad, mask, None, None, 0.2, 0.2, 0.0, 0, 0, 0, 0.0, 2, 0.0))


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("aggregation", AGGS)
def test_gpu_matches_reference(backend, aggregation):
    logp, old, adv = _inputs((5, 1030), torch.float32, seed=6)
    mask = _mask((5, 1030), "holes", seed=6)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation=aggregation)
    out = _run(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k), logp.cuda(), old.cuda(), adv.cuda(),
               mask.cuda(), **kw)
    exp = _run(_ref, logp.double(), old.double(), adv.double(), mask, **kw)
    torch.testing.assert_close(out[0].cpu().double(), exp[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(out[2], exp[2]):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-5, atol=1e-6)
    again = _run(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k), logp.cuda(), old.cuda(), adv.cuda(),
                 mask.cuda(), **kw)
    assert torch.equal(out[0], again[0]) and all(torch.equal(x, y) for x, y in zip(out[2], again[2]))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
def test_opcheck_triton_op():
    # test_aot_dispatch_* are left out: under TRITON_INTERPRET the kernel runs eagerly on host pointers,
    # which the functional tensors of AOT tracing do not have (on a GPU wrap_triton is traced instead)
    logp, old, adv = _inputs((3, 9), torch.float32, seed=12)
    mask = _mask((3, 9), "holes", seed=12)
    torch.library.opcheck(torch.ops.rlhf_kernels.ppo_policy_loss_fwd_triton.default,
                          (logp.requires_grad_(True), old, adv, mask, None, None, 0.2, 0.28, 3.0, 1, 0, 0, 0.0, 2, 0.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
