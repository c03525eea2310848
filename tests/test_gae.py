
import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import all_masks, cpu_backends, needs_gpu

BACKENDS = cpu_backends("gae")
ALL = cpu_backends("gae", reference=True)  # for oracles other than the reference
SHAPES = [(1,), (257,), (3, 1), (4, 257), (2, 3, 5)]
KINDS = ["right", "left", "holes", "random", "full", "none"]


def _inputs(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
    return r.to(dtype), v.to(dtype)


def _check(backend, r, v, m, gamma, lam, tol):
    adv, ret = rk.gae(r, v, m, gamma=gamma, lam=lam, backend=backend)
    ea, er = reference.gae(r.double(), v.double(), m, gamma, lam)
    assert adv.shape == r.shape and ret.shape == r.shape
    torch.testing.assert_close(adv.double(), ea, rtol=tol, atol=tol)
    torch.testing.assert_close(ret.double(), er, rtol=tol, atol=tol)
    assert not adv[~m].any() and not ret[~m].any(), "masked positions must be exactly 0"
    return adv, ret


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_fp64(backend, shape, kind):
    r, v = _inputs(shape, seed=len(shape) * 7 + shape[-1])
    m = all_masks(shape, seed=shape[-1])[kind]
    # γ, λ exactly representable in fp32, so Triton's fp32 scalar arguments lose nothing: fp64 exact
    adv, _ = _check(backend, r, v, m, 0.75, 0.5, 1e-12)
    assert adv.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_coefficients(backend):
    r, v = _inputs((4, 257), seed=1)
    m = all_masks((4, 257), seed=1)["holes"]
    # Triton receives float scalars as fp32 on GPU (λ = 0.95 rounds at ~1e-8)
    _check(backend, r, v, m, 1.0, 0.95, 1e-12)  # every backend: exact to rounding (triton ~1e-14 measured)


@pytest.mark.parametrize("backend", ALL)
def test_hand_computed_hole(backend):
    r = torch.tensor([[1.0, 2, 3, 4]], dtype=torch.float64)
    v = torch.tensor([[0.5, 1, 2, 1.5]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1]]).bool()
    adv, ret = rk.gae(r, v, m, gamma=0.5, lam=0.5, backend=backend)
    # t=3: A = 4 − 1.5 = 2.5; t=1 links over the hole to t=3: δ = 2 + 0.5·1.5 − 1 = 1.75, A = 1.75 + 0.25·2.5;
    # t=0: δ = 1 + 0.5·1 − 0.5 = 1, A = 1 + 0.25·2.375
    torch.testing.assert_close(adv, torch.tensor([[1.59375, 2.375, 0, 2.5]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[2.09375, 3.375, 0, 4.0]], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(backend, dtype):
    r, v = _inputs((3, 129), dtype, seed=2)
    m = all_masks((3, 129), seed=2)["holes"]
    adv, ret = rk.gae(r, v, m, backend=backend)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    ea, er = reference.gae(r.double(), v.double(), m)
    torch.testing.assert_close(adv, ea.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, er.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    r, v = _inputs((40, 6), torch.float32, seed=3)
    m = all_masks((40, 6), seed=3)["random"]
    a, b, mm = r.T, v.T, m.T  # [6, 40] views with strides (1, 6)
    assert not a.is_contiguous()
    _check(backend, a, b, mm, 0.75, 0.5, 1e-6)


def test_triton_carries_across_tiles(monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from rlhf_kernels.triton import gae as tg
    monkeypatch.setattr(tg, "MAX_BLOCK", 16)  # 17 tiles over T = 257: holes straddle tile boundaries
    r, v = _inputs((3, 257), seed=4)
    m = all_masks((3, 257), seed=4)["holes"]
    m[1, 100:200] = False  # a hole wider than several tiles
    _check("triton", r, v, m, 0.75, 0.5, 1e-12)


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), T=st.integers(1, 40),
       kind=st.sampled_from(KINDS), gamma=st.sampled_from([0.0, 0.5, 0.75, 1.0]),
       lam=st.sampled_from([0.0, 0.25, 0.5, 1.0]), seed=st.integers(0, 10 ** 6))
def test_property_random_shapes_andall_masks(lead, T, kind, gamma, lam, seed):
    shape = tuple(lead) + (T,)
    r, v = _inputs(shape, seed=seed)
    m = all_masks(shape, seed)[kind]
    for backend in BACKENDS:
        _check(backend, r, v, m, gamma, lam, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_raises_instead_of_losing_the_gradient(backend):
    r, v = _inputs((2, 5), seed=6)
    v.requires_grad_(True)
    m = torch.ones(2, 5, dtype=torch.bool)
    adv, ret = rk.gae(r, v, m, backend=backend)  # calling on grad-requiring input is fine...
    torch.testing.assert_close(adv, reference.gae(r, v.detach(), m)[0])
    with pytest.raises(RuntimeError, match="not differentiable"):  # ...backpropagating into it is not
        (adv.sum() + v.sum()).backward()
    with torch.no_grad():
        assert not rk.gae(r, v, m, backend=backend)[0].requires_grad


def test_bad_input():
    r, v = _inputs((2, 4), torch.float32)
    m = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="lam"):
        rk.gae(r, v, m, lam=-0.1)
    with pytest.raises(TypeError, match="gamma"):
        rk.gae(r, v, m, gamma="1")
    with pytest.raises(TypeError, match="rewards"):
        rk.gae(r.long(), v, m)
    with pytest.raises(ValueError, match="rewards"):
        rk.gae(r[0, 0], v[0, 0], m[0, 0])
    with pytest.raises(ValueError, match="backend"):
        rk.gae(r, v, m, backend="tpu")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck_and_compile():
    r, v = _inputs((4, 9), torch.float32, seed=7)
    m = all_masks((4, 9), seed=7)["holes"]
    torch.library.opcheck(torch.ops.rlhf_kernels.gae.default, (r, v, m, None, 0.9, 0.95))
    f = torch.compile(lambda a, b, mm: rk.gae(a, b, mm, gamma=0.9, backend="cpu"), fullgraph=True)
    for got, exp in zip(f(r, v, m), reference.gae(r, v, m, 0.9)):
        torch.testing.assert_close(got, exp)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_opcheck_triton_op():
    r, v = _inputs((2, 9), torch.float32, seed=8)
    m = all_masks((2, 9), seed=8)["holes"]
    # test_aot_dispatch_dynamic is left out: under the interpreter it hands functional tensors to Triton,
    # which reads their (absent) storage; on a GPU the full opcheck runs in test_gpu_opcheck_triton
    torch.library.opcheck(torch.ops.rlhf_kernels.gae_triton.default, (r, v, m, None, 0.9, 0.95),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_gpu
def test_gpu_opcheck_triton():
    r, v = (t.cuda() for t in _inputs((2, 9), torch.float32, seed=8))
    m = all_masks((2, 9), seed=8)["holes"].cuda()
    d = _dones((2, 9), seed=8).cuda()
    for dn in (None, d):
        torch.library.opcheck(torch.ops.rlhf_kernels.gae_triton.default, (r, v, m, dn, 0.9, 0.95))
        torch.library.opcheck(torch.ops.rlhf_kernels.gae.default, (r, v, m, dn, 0.9, 0.95))


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("T", [1, 257, 3000])
def test_gpu_matches_reference(backend, T):
    r, v = _inputs((5, T), seed=9)
    for _kind, m in all_masks((5, T), seed=9).items():
        adv, ret = rk.gae(r.cuda(), v.cuda(), m.cuda(), gamma=0.75, lam=0.5, backend=backend)
        ea, er = reference.gae(r, v, m, 0.75, 0.5)
        torch.testing.assert_close(adv.cpu(), ea, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ret.cpu(), er, rtol=1e-12, atol=1e-12)
        a32, _ = rk.gae(r.float().cuda(), v.float().cuda(), m.cuda(), backend=backend)
        torch.testing.assert_close(a32.cpu(), reference.gae(r, v, m)[0].float(), rtol=1e-5, atol=1e-5)
        d = _dones((5, T), seed=T)
        adv, ret = rk.gae(r.cuda(), v.cuda(), m.cuda(), gamma=0.75, lam=0.5, dones=d.cuda(), backend=backend)
        ea, er = loop_gae(r, v, m, d, 0.75, 0.5)
        torch.testing.assert_close(adv.cpu(), ea, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ret.cpu(), er, rtol=1e-12, atol=1e-12)


# ---- dones: rows holding several episodes (docs/algorithms.md §1.3, done-mask form) ---------------------------

def loop_gae(r, v, m, d, gamma, lam):
    """The spec written out as a plain float64 loop over (row, t): the next valid position of the row
    gives V_next and A_next, and a done at a valid t multiplies both by (1 − d_t)."""
    T = r.shape[-1]
    rr, vv = r.double().reshape(-1, T).tolist(), v.double().reshape(-1, T).tolist()
    mm, dd = m.reshape(-1, T).tolist(), d.reshape(-1, T).tolist()
    adv, ret = torch.zeros(len(rr), T, dtype=torch.float64), torch.zeros(len(rr), T, dtype=torch.float64)
    for i in range(len(rr)):
        next_v = next_a = 0.0
        for t in reversed(range(T)):
            if not mm[i][t]:
                continue
            keep = 1.0 - float(dd[i][t])
            delta = rr[i][t] + gamma * keep * next_v - vv[i][t]
            a = delta + gamma * lam * keep * next_a
            adv[i, t], ret[i, t] = a, a + vv[i][t]
            next_v, next_a = vv[i][t], a
    return adv.reshape(r.shape), ret.reshape(r.shape)


def _dones(shape, seed):
    """Several dones per row (masked positions included), always one at the last position of each row."""
    g = torch.Generator().manual_seed(seed + 1)
    d = torch.rand(shape, generator=g) < 0.2
    d[..., -1] = True
    return d


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(1,), (257,), (3, 1), (3, 40), (2, 3, 5)])
@pytest.mark.parametrize("kind", ["right", "holes", "random", "full"])  # "none" is in the edge cases
def test_dones_match_loop_fp64(backend, shape, kind):
    r, v = _inputs(shape, seed=len(shape) * 5 + shape[-1])
    m = all_masks(shape, seed=shape[-1] + 1)[kind]
    d = _dones(shape, seed=shape[-1])
    adv, ret = rk.gae(r, v, m, gamma=0.75, lam=0.5, dones=d, backend=backend)
    ea, er = loop_gae(r, v, m, d, 0.75, 0.5)
    torch.testing.assert_close(adv, ea, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, er, rtol=1e-12, atol=1e-12)
    assert not adv[~m].any() and not ret[~m].any()


@pytest.mark.parametrize("backend", ALL)
def test_dones_hand_computed(backend):
    # episode 1: t=0,1 (done at 1), a hole at t=2 (its done is ignored), episode 2: t=3,4 (done at the row end)
    r = torch.tensor([[1.0, 2, 9, 3, 4]], dtype=torch.float64)
    v = torch.tensor([[0.5, 1, 7, 2, 1.5]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1, 1]]).bool()
    d = torch.tensor([[0, 1, 1, 0, 1]]).bool()
    adv, ret = rk.gae(r, v, m, gamma=0.5, lam=0.5, dones=d, backend=backend)
    # t=4: A = 4 − 1.5 = 2.5; t=3: δ = 3 + 0.5·1.5 − 2 = 1.75, A = 1.75 + 0.25·2.5 = 2.375
    # t=1 (done): A = 2 − 1 = 1; t=0: δ = 1 + 0.5·1 − 0.5 = 1, A = 1 + 0.25·1 = 1.25
    torch.testing.assert_close(adv, torch.tensor([[1.25, 1, 0, 2.375, 2.5]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[1.75, 2, 0, 4.375, 4]], dtype=torch.float64))


@pytest.mark.parametrize("backend", ALL)
def test_dones_edge_cases(backend):
    r, v = _inputs((6, 7), seed=11)
    m = torch.ones(6, 7, dtype=torch.bool)
    d = torch.zeros(6, 7, dtype=torch.bool)
    d[0] = True                       # every step its own episode: A = r − V
    m[1] = False                      # all masked, with dones everywhere
    d[1] = True
    d[2, 2], m[2, 3:5] = True, False  # a done, then a hole before the next episode
    m[3, ::2] = False                 # dones only at masked positions: no effect
    d[3, ::2] = True
    d[4, -1] = True                   # a done at the last position changes nothing (nothing follows)
    m[5, -1], d[5, -2] = False, True  # a done at the last valid position
    adv, ret = rk.gae(r, v, m, gamma=0.9, lam=0.8, dones=d, backend=backend)
    ea, er = loop_gae(r, v, m, d, 0.9, 0.8)
    torch.testing.assert_close(adv, ea, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, er, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv[0], r[0] - v[0], rtol=0, atol=0)
    assert not adv[1].any() and not ret[1].any()
    plain = rk.gae(r, v, m, gamma=0.9, lam=0.8, backend=backend)
    for row in (3, 4, 5):
        assert torch.equal(adv[row], plain[0][row]) and torch.equal(ret[row], plain[1][row])
    # T = 1: a done there has nothing to cut
    one = rk.gae(r[:, :1], v[:, :1], m[:, :1], dones=d[:, :1], backend=backend)
    torch.testing.assert_close(one[0], torch.where(m[:, :1], r[:, :1] - v[:, :1], 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dones_none_or_zero_is_the_single_episode_result(backend):
    r, v = _inputs((3, 65), torch.float32, seed=12)
    m = all_masks((3, 65), seed=12)["holes"]
    plain = rk.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    for zeros in (torch.zeros(3, 65, dtype=torch.bool), torch.zeros(3, 65)):
        with_zero = rk.gae(r, v, m, gamma=0.99, lam=0.95, dones=zeros, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(plain, with_zero))
    torch.testing.assert_close(plain[0], reference.gae(r.double(), v.double(), m, 0.99, 0.95)[0].float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8, torch.int8])
def test_dones_any_zero_one_dtype(backend, dtype):
    r, v = _inputs((3, 20), torch.float32, seed=13)
    m = all_masks((3, 20), seed=13)["random"]
    d = _dones((3, 20), seed=13)
    exp = rk.gae(r, v, m, dones=d, backend=backend)
    got = rk.gae(r, v, m, dones=d.to(dtype), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(exp, got))


def test_dones_bad_input():
    r, v = _inputs((2, 4), torch.float32)
    m = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="dones must have shape"):
        rk.gae(r, v, m, dones=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="dones must hold only 0 and 1"):
        rk.gae(r, v, m, dones=torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="dones must hold only 0 and 1"):
        rk.gae(r, v, m, dones=torch.full((2, 4), 2))
    with pytest.raises(TypeError, match="dones must be a torch.Tensor"):
        rk.gae(r, v, m, dones=[[0, 1, 0, 1]] * 2)
    with pytest.raises(TypeError, match="dones must be a bool"):
        rk.gae(r, v, m, dones=torch.zeros(2, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="dones is on meta"):
        rk.gae(r, v, m, dones=torch.zeros(2, 4, dtype=torch.bool, device="meta"))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_dones_raw_op_checks_its_arguments():
    r, v = _inputs((2, 4), torch.float32)
    m = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="dones must have the shape"):
        torch.ops.rlhf_kernels.gae(r, v, m, torch.zeros(2, 3, dtype=torch.bool), 1.0, 0.95)
    with pytest.raises(RuntimeError, match="dones must be bool or uint8"):
        torch.ops.rlhf_kernels.gae(r, v, m, torch.zeros(2, 4), 1.0, 0.95)


def test_triton_dones_across_tiles(monkeypatch):
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from rlhf_kernels.triton import gae as tg
    monkeypatch.setattr(tg, "MAX_BLOCK", 16)
    r, v = _inputs((3, 257), seed=14)
    m = all_masks((3, 257), seed=14)["holes"]
    d = torch.zeros(3, 257, dtype=torch.bool)
    d[0, [15, 16, 31, 100]] = True  # dones on both sides of tile boundaries
    d[1] = _dones((257,), seed=14)
    m[2, 40:90] = False
    d[2, 39] = True                 # an episode ends just before a hole spanning tiles
    adv, ret = rk.gae(r, v, m, gamma=0.75, lam=0.5, dones=d, backend="triton")
    ea, er = loop_gae(r, v, m, d, 0.75, 0.5)
    torch.testing.assert_close(adv, ea, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, er, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), T=st.integers(1, 40),
       kind=st.sampled_from(KINDS), p_done=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]), lam=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
       seed=st.integers(0, 10 ** 6))
def test_property_dones(lead, T, kind, p_done, gamma, lam, seed):
    shape = tuple(lead) + (T,)
    r, v = _inputs(shape, seed=seed)
    m = all_masks(shape, seed)[kind]
    d = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p_done
    ea, er = loop_gae(r, v, m, d, gamma, lam)
    for backend in BACKENDS:
        adv, ret = rk.gae(r, v, m, gamma=gamma, lam=lam, dones=d, backend=backend)
        # gamma, lam not all fp32-exact here (0.99, 0.95): Triton takes its scalars as fp32
        tol = 1e-12
        torch.testing.assert_close(adv, ea, rtol=tol, atol=tol)
        torch.testing.assert_close(ret, er, rtol=tol, atol=tol)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_dones_opcheck_and_compile():
    r, v = _inputs((4, 9), torch.float32, seed=15)
    m = all_masks((4, 9), seed=15)["holes"]
    d = _dones((4, 9), seed=15)
    torch.library.opcheck(torch.ops.rlhf_kernels.gae.default, (r, v, m, d, 0.9, 0.95))
    f = torch.compile(lambda a, b, mm, dd: rk.gae(a, b, mm, gamma=0.9, dones=dd, backend="cpu"), fullgraph=True)
    exp = reference.gae(r, v, m, 0.9, 0.95, d)
    for dd in (d, d.float()):  # float dones: the value check is left out of the graph
        for got, e in zip(f(r, v, m, dd), exp):
            torch.testing.assert_close(got, e)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not available")
def test_dones_opcheck_triton_op():
    r, v = _inputs((2, 9), torch.float32, seed=16)
    m = all_masks((2, 9), seed=16)["holes"]
    d = _dones((2, 9), seed=16)
    torch.library.opcheck(torch.ops.rlhf_kernels.gae_triton.default, (r, v, m, d, 0.9, 0.95),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
