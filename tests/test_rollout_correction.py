import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import all_masks, cpu_backends, needs_gpu

BACKENDS = cpu_backends("rollout_correction", reference=True)  # the oracle is loop_spec, not reference.py
LEVELS = ["token", "sequence", "geometric"]
MODES = ["truncate", "mask"]
SHAPES = [(1,), (257,), (3, 1), (4, 257), (2, 3, 5)]
KINDS = ["right", "left", "holes", "random", "full", "none"]
STATS = ("mismatch_k1", "mismatch_k3", "masked_fraction", "weight_mean")


def _exp(x):
    return math.exp(x) if x < 700 else math.inf


def loop_spec(old, roll, mask, level, mode, low, high):
    """The definition as a plain float64 loop over rows (independent of reference.py)."""
    T = old.shape[-1]
    o, q = old.double().reshape(-1, T).tolist(), roll.double().reshape(-1, T).tolist()
    m = mask.bool().reshape(-1, T).tolist()
    lo, hi = (0.0 if low is None else low), (math.inf if high is None else high)
    w = torch.zeros(len(o), T, dtype=torch.float64)
    keep = torch.zeros(len(o), T, dtype=torch.bool)
    k1 = k3 = wsum = 0.0
    n = kept = 0
    for i in range(len(o)):
        valid = [t for t in range(T) if m[i][t]]
        d = {t: o[i][t] - q[i][t] for t in valid}
        row = sum(d.values()) / (len(valid) if level == "geometric" else 1) if valid else 0.0
        for t in valid:
            ratio = _exp(d[t] if level == "token" else row)
            if mode == "truncate":
                w[i, t], keep[i, t] = min(max(ratio, lo), hi), True
            elif lo <= ratio <= hi:
                w[i, t], keep[i, t] = ratio, True
            k1 += d[t]
            k3 += math.exp(-d[t]) - 1 + d[t]
            wsum += float(w[i, t])
            n += 1
            kept += bool(keep[i, t])
    den = max(n, 1)
    stats = {"mismatch_k1": k1 / den, "mismatch_k3": k3 / den, "masked_fraction": (n - kept) / den,
             "weight_mean": wsum / den}
    return w.reshape(mask.shape), keep.reshape(mask.shape), stats


def _inputs(shape, seed, dtype=torch.float64, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    roll = old + torch.randn(shape, generator=g, dtype=torch.float64) * spread
    return old.to(dtype), roll.to(dtype)


def _check(backend, old, roll, mask, level, mode, low, high, tol, stat_tol=1e-6):
    w, keep, stats = rk.rollout_correction(old, roll, mask, level=level, mode=mode, low=low, high=high,
                                           backend=backend)
    ew, ek, es = loop_spec(old, roll, mask, level, mode, low, high)
    assert w.shape == mask.shape and keep.shape == mask.shape and keep.dtype == torch.bool
    assert w.dtype == (torch.float64 if old.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(w.double(), ew, rtol=tol, atol=tol)
    assert torch.equal(keep, ek)
    assert not w[~mask.bool()].any() and not keep[~mask.bool()].any()
    assert set(stats) == set(STATS)
    for k in STATS:
        assert stats[k].dtype == torch.float32 and stats[k].shape == ()
        assert stats[k].item() == pytest.approx(es[k], rel=stat_tol, abs=stat_tol), k
    return w, keep, stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed(backend):
    # valid log-ratios ln 1, ln 3, ln ¼; the fourth position is masked and holds garbage
    d = torch.tensor([[0.0, math.log(3), math.log(0.25), float("nan")]], dtype=torch.float64)
    roll = torch.full_like(d, -1.0)
    old = roll + d
    m = torch.tensor([[1, 1, 1, 0]]).bool()
    rc = lambda **kw: rk.rollout_correction(old, roll, m, backend=backend, **kw)  # noqa: E731
    t = lambda *x: torch.tensor([list(x)], dtype=torch.float64)  # noqa: E731
    w, keep, s = rc()  # token TIS, high 2
    torch.testing.assert_close(w, t(1, 2, 0.25, 0))
    assert keep.tolist() == [[True, True, True, False]]
    assert s["weight_mean"].item() == pytest.approx(3.25 / 3) and s["masked_fraction"].item() == 0
    assert s["mismatch_k1"].item() == pytest.approx(math.log(0.75) / 3)
    # k3 per token: 1/ρ − 1 + ln ρ
    k3 = (0 + (1 / 3 - 1 + math.log(3)) + (4 - 1 + math.log(0.25))) / 3
    assert s["mismatch_k3"].item() == pytest.approx(k3, rel=1e-6)
    w, keep, s = rc(low=0.5)  # the ¼ token is lifted to 0.5
    torch.testing.assert_close(w, t(1, 2, 0.5, 0))
    w, keep, s = rc(mode="mask", low=0.5)  # MIS: only ρ = 1 is inside [0.5, 2]
    torch.testing.assert_close(w, t(1, 0, 0, 0))
    assert keep.tolist() == [[True, False, False, False]]
    assert s["masked_fraction"].item() == pytest.approx(2 / 3)
    w, keep, s = rc(mode="mask", high=None)  # no bounds at all: plain importance weights
    torch.testing.assert_close(w, t(1, 3, 0.25, 0))
    w, _, _ = rc(level="sequence")  # the product ρ = ¾ on every valid token
    torch.testing.assert_close(w, t(0.75, 0.75, 0.75, 0))
    w, keep, _ = rc(level="geometric", mode="mask", low=0.95)  # (¾)^(1/3) ≈ 0.9086 < 0.95: the whole row drops
    assert not w.any() and not keep.any()
    w, _, _ = rc(level="geometric")
    torch.testing.assert_close(w, t(*[0.75 ** (1 / 3)] * 3, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", LEVELS)
def test_matches_spec_fp64(backend, shape, kind, level):
    old, roll = _inputs(shape, seed=shape[-1] + len(shape), spread=0.5 if level == "token" else 0.05)
    m = all_masks(shape, seed=shape[-1])[kind]
    # two of the four bound settings per mask kind (the interpreter is slow); each kind covers all of them
    combos = (("truncate", None, 2.0), ("mask", 0.5, 2.0), ("truncate", 0.8, 1.2), ("mask", None, None))
    for mode, low, high in combos[KINDS.index(kind) % 2::2]:
        _check(backend, old, roll, m, level, mode, low, high, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_in_fp32_out(backend, dtype):
    old, roll = _inputs((3, 129), seed=2, dtype=dtype, spread=0.1)
    m = all_masks((3, 129), seed=2)["holes"]
    for level in LEVELS:
        w, keep, _ = rk.rollout_correction(old, roll, m, level=level, mode="mask", low=0.5, backend=backend)
        assert w.dtype == torch.float32
        ew, ek, _ = loop_spec(old, roll, m, level, "mask", 0.5, 2.0)
        torch.testing.assert_close(w, ew.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_garbage_and_overflow(backend):
    old, roll = _inputs((4, 9), seed=3)
    m = torch.ones(4, 9, dtype=torch.bool)
    m[:, -2:] = False
    old[:, -2:], roll[:, -1] = float("inf"), float("nan")  # masked: must not reach anything
    old[1, :7] = roll[1, :7] + 40  # Σ = 280: the row's ratio overflows to inf
    m[2] = False  # an all-masked row
    for level in LEVELS:
        for mode, low in (("truncate", 0.5), ("mask", None)):
            w, keep, stats = _check(backend, old, roll, m, level, mode, low, 2.0, 1e-12)
            assert torch.isfinite(w).all() and all(torch.isfinite(v) for v in stats.values())
    w, keep, _ = rk.rollout_correction(old, roll, m, level="sequence", backend=backend)
    assert (w[1, :7] == 2.0).all()  # inf truncated to high
    w, keep, _ = rk.rollout_correction(old, roll, m, level="sequence", mode="mask", backend=backend)
    assert not keep[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_stats(backend):
    old, roll = _inputs((3, 5), seed=4)
    w, keep, stats = rk.rollout_correction(old, roll, torch.zeros(3, 5), level="sequence", backend=backend)
    assert not w.any() and not keep.any() and all(v.item() == 0 for v in stats.values())
    w, keep, stats = rk.rollout_correction(old[:, :0], roll[:, :0], torch.zeros(3, 0), backend=backend)
    assert w.shape == (3, 0) and all(v.item() == 0 for v in stats.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient(backend):
    old, roll = _inputs((2, 6), seed=5)
    old.requires_grad_(True)
    roll.requires_grad_(True)
    w, _, stats = rk.rollout_correction(old, roll, torch.ones(2, 6), backend=backend)
    assert not w.requires_grad and not any(v.requires_grad for v in stats.values())


def test_triton_tile_loops(monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from rlhf_kernels.triton import rollout_correction as tr
    monkeypatch.setattr(tr, "MAX_BLOCK", 16)
    monkeypatch.setattr(tr, "BLOCK_R", 2)
    old, roll = _inputs((5, 100), seed=6, spread=0.05)
    m = all_masks((5, 100), seed=6)["holes"]
    for level in LEVELS:
        _check("triton", old, roll, m, level, "mask", 0.9, 1.1, 1e-12)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), T=st.integers(1, 40), kind=st.sampled_from(KINDS),
       level=st.sampled_from(LEVELS), mode=st.sampled_from(MODES), low=st.sampled_from([None, 0.0, 0.5, 0.9]),
       high=st.sampled_from([None, 1.0, 1.1, 2.0]), seed=st.integers(0, 10 ** 6))
def test_property_ragged(lead, T, kind, level, mode, low, high, seed):
    shape = tuple(lead) + (T,)
    old, roll = _inputs(shape, seed, spread=0.3 if level == "token" else 0.05)
    m = all_masks(shape, seed)[kind]
    for backend in BACKENDS:
        _check(backend, old, roll, m, level, mode, low, high, 1e-12)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_deterministic_cpu_any_thread_count():
    old, roll = _inputs((64, 999), seed=7, dtype=torch.float32)
    m = all_masks((64, 999), seed=7)["holes"]
    for level in LEVELS:
        first = rk.rollout_correction(old, roll, m, level=level, backend="cpu")
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = rk.rollout_correction(old, roll, m, level=level, backend="cpu")
        finally:
            torch.set_num_threads(n)
        for a, b in zip(first[:2], single[:2]):
            assert torch.equal(a, b)
        assert all(torch.equal(first[2][k], single[2][k]) for k in STATS)


def test_bad_input():
    old, roll = _inputs((2, 4), seed=8, dtype=torch.float32)
    m = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="level must be one of"):
        rk.rollout_correction(old, roll, m, level="row")
    with pytest.raises(ValueError, match="mode must be one of"):
        rk.rollout_correction(old, roll, m, mode="clip")
    with pytest.raises(ValueError, match="low must be <= high"):
        rk.rollout_correction(old, roll, m, low=3.0, high=2.0)
    with pytest.raises(ValueError, match="low must be >= 0"):
        rk.rollout_correction(old, roll, m, low=-1.0)
    with pytest.raises(ValueError, match="high must be > 0"):
        rk.rollout_correction(old, roll, m, high=0.0)
    with pytest.raises(TypeError, match="high must be a number"):
        rk.rollout_correction(old, roll, m, high="2")
    with pytest.raises(ValueError, match="rollout_logp must have the shape of old_logp"):
        rk.rollout_correction(old, roll[:, :3], m)
    with pytest.raises(ValueError, match="mask must have shape"):
        rk.rollout_correction(old, roll, m[:, :3])
    with pytest.raises(TypeError, match="old_logp must be a floating"):
        rk.rollout_correction(old.long(), roll, m)
    with pytest.raises(ValueError, match="old_logp must have at least 1"):
        rk.rollout_correction(old[0, 0], roll[0, 0], m[0, 0])
    with pytest.raises(ValueError, match="rollout_logp is on meta"):
        rk.rollout_correction(old, roll.to("meta"), m)
    with pytest.raises(ValueError, match="backend"):
        rk.rollout_correction(old, roll, m, backend="tpu")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck_and_compile():
    old, roll = _inputs((4, 9), seed=9, dtype=torch.float32)
    m = all_masks((4, 9), seed=9)["holes"]
    for level in range(3):
        torch.library.opcheck(torch.ops.rlhf_kernels.rollout_correction.default, (old, roll, m, level, 1, 0.5, 2.0))
    f = torch.compile(lambda a, b, mm: rk.rollout_correction(a, b, mm, level="geometric", mode="mask", low=0.5,
                                                             backend="cpu"), fullgraph=True)
    w, keep, stats = f(old, roll, m)
    ew, ek, es = reference.rollout_correction(old, roll, m, "geometric", "mask", 0.5, 2.0)
    torch.testing.assert_close(w, ew)
    assert torch.equal(keep, ek)
    for k in STATS:
        torch.testing.assert_close(stats[k], es[k])


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_opcheck_triton_op():
    old, roll = _inputs((2, 9), seed=10, dtype=torch.float32)
    m = all_masks((2, 9), seed=10)["holes"]
    torch.library.opcheck(torch.ops.rlhf_kernels.rollout_correction_triton.default, (old, roll, m, 1, 1, 0.5, 2.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_triton_plan_on_meta_tensors():
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from rlhf_kernels.triton import rollout_correction as tr
    old = torch.empty(8, 3000, device="meta")
    plan, (w, keep, stats) = tr.plan_fwd(old, old, torch.empty(8, 3000, dtype=torch.bool, device="meta"), 1, 0,
                                         0.0, 2.0)
    assert [p.grid for p in plan] == [(8,), (1,)] and keep.dtype == torch.bool
    for p in plan:
        chosen = dict(kernel=p.kernel.__name__ if hasattr(p.kernel, "__name__") else p.kernel.fn.__name__,
                      **p.constexprs)
        chosen = {k: v for k, v in chosen.items() if k in ("kernel", "BLOCK", "BLOCK_R")}
        assert dict(chosen, num_warps=p.num_warps) in tr.configs()


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("T", [1, 257, 3000])
def test_gpu_matches_spec(backend, T):
    old, roll = _inputs((5, T), seed=T, spread=0.01)
    for _kind, m in all_masks((5, T), seed=T).items():
        for level in LEVELS:
            for mode, low in (("truncate", None), ("mask", 0.5)):
                w, keep, stats = rk.rollout_correction(old.cuda(), roll.cuda(), m.cuda(), level=level, mode=mode,
                                                       low=low, backend=backend)
                ew, ek, es = loop_spec(old, roll, m, level, mode, low, 2.0)
                torch.testing.assert_close(w.cpu(), ew, rtol=1e-12, atol=1e-12)
                assert torch.equal(keep.cpu(), ek)
                for k in STATS:
                    assert stats[k].item() == pytest.approx(es[k], rel=1e-6, abs=1e-6)


@needs_gpu
def test_gpu_opcheck():
    old, roll = (t.cuda() for t in _inputs((4, 9), seed=11, dtype=torch.float32))
    m = all_masks((4, 9), seed=11)["holes"].cuda()
    for op in (torch.ops.rlhf_kernels.rollout_correction, torch.ops.rlhf_kernels.rollout_correction_triton):
        torch.library.opcheck(op.default, (old, roll, m, 2, 0, 0.5, 2.0))
