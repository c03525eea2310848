import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu

BACKENDS = cpu_backends("dpo_loss")
ALL = cpu_backends("dpo_loss", reference=True)  # for oracles other than the reference
LOSSES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]
SHAPES = [(1,), (257,), (3, 5), (2, 3, 4)]


def _inputs(shape, dtype=torch.float64, seed=0, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    # sequence log-probs: large negative sums, with margins h of either sign and several magnitudes
    c = -torch.rand(shape, generator=g, dtype=torch.float64) * 100
    r = c + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    cr = c + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    rr = r + torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return [t.to(dtype) for t in (c, r, cr, rr)]


def _run(fn, ins, **kw):
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    out = fn(*ins, **kw)
    g = torch.linspace(-1, 2, out[0].numel(), dtype=out[0].dtype).reshape(out[0].shape)
    (out[0] * g).sum().backward()  # a non-uniform upstream gradient
    return out, [t.grad for t in ins]


def _ref(c, r, cr, rr, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    return reference.dpo_loss(c, r, cr, rr, beta, loss_type, label_smoothing)


def _fp64_tol(backend, beta, label_smoothing):
    """Exact to rounding (~1e-15 measured), but Triton may get beta and label_smoothing as fp32 scalars (the
    hinge at beta = 0.1 moves by 1.5e-8 relative); scalars exact in fp32 keep it at rounding."""
    exact = all(float(torch.tensor(x, dtype=torch.float32)) == x for x in (beta, label_smoothing))
    return 1e-12 if backend != "triton" or exact else 3e-8


def _close(a, b, tol):
    (out, grads), (rout, rgrads) = a, b
    for x, y in zip(out, rout):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    assert not out[1].requires_grad and not out[2].requires_grad
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_reference_fp64(backend, shape, loss, beta):
    ins = _inputs(shape, seed=shape[-1])
    kw = dict(beta=beta, loss_type=loss[0], label_smoothing=loss[1])
    out = _run(lambda *a, **k: rk.dpo_loss(*a, backend=backend, **k), ins, **kw)
    assert all(o.shape == shape and o.dtype == torch.float64 for o in out[0])
    _close(out, _run(_ref, ins, **kw), _fp64_tol(backend, beta, loss[1]))


def test_inputs_exercise_every_regime():
    c, r, cr, rr = _inputs((257,), seed=257)
    bh = 0.1 * ((c - cr) - (r - rr))
    assert (bh > 1).any() and (bh < 0).any() and ((bh > 0) & (bh < 1)).any() and (bh.abs() > 5).any()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_margins_stay_finite(backend, loss):
    c = torch.tensor([0.0, 0.0, -1e4, 0.0])
    r = torch.tensor([-1e4, 0.0, 0.0, -3.0])
    z = torch.zeros(4)
    (out, grads) = _run(lambda *a, **k: rk.dpo_loss(*a, backend=backend, **k), [c, r, z, z], beta=0.5,
                        loss_type=loss[0], label_smoothing=loss[1])
    assert all(torch.isfinite(o).all() for o in out) and all(torch.isfinite(g).all() for g in grads)
    exp = _run(_ref, [c.double(), r.double(), z.double(), z.double()], beta=0.5, loss_type=loss[0],
               label_smoothing=loss[1])
    torch.testing.assert_close(out[0].double(), exp[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(backend, dtype):
    ins = _inputs((37,), dtype, seed=5, scale=3.0)
    out, grads = _run(lambda *a, **k: rk.dpo_loss(*a, backend=backend, **k), ins, beta=0.3)
    assert all(o.dtype == torch.float32 for o in out) and all(g.dtype == dtype for g in grads)
    (rout, rgrads) = _run(_ref, [t.double() for t in ins], beta=0.3)
    for x, y in zip(out, rout):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-4)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r.to(dtype), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(backend, loss):
    ins = [t.requires_grad_(True) for t in _inputs((6,), seed=3, scale=2.0)]
    # triton: one random projection (fast_mode); the sweeps compare its gradients with the reference elementwise
    assert torch.autograd.gradcheck(
        lambda *a: rk.dpo_loss(*a, beta=0.4, loss_type=loss[0], label_smoothing=loss[1], backend=backend)[0], ins,
        fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    ins = [t.T for t in _inputs((5, 4), torch.float32, seed=8)]
    assert not ins[0].is_contiguous()
    out = _run(lambda *a, **k: rk.dpo_loss(*a, backend=backend, **k), ins, loss_type="ipo")
    exp = _run(_ref, [t.double() for t in ins], loss_type="ipo")
    for x, y in zip(out[0], exp[0]):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 50), seed=st.integers(0, 2 ** 16), beta=st.floats(0.01, 2.0),
       loss=st.sampled_from(LOSSES), scale=st.floats(0.1, 50.0))
def test_property_matches_reference(n, seed, beta, loss, scale):
    ins = _inputs((n,), seed=seed, scale=scale)
    kw = dict(beta=beta, loss_type=loss[0], label_smoothing=loss[1])
    exp = _run(_ref, ins, **kw)
    for backend in BACKENDS:
        _close(_run(lambda *a, **k: rk.dpo_loss(*a, backend=backend, **k), ins, **kw), exp,
               _fp64_tol(backend, beta, loss[1]))


def test_bad_input():
    c, r, cr, rr = _inputs((4,), torch.float32)
    with pytest.raises(ValueError, match="loss_type"):
        rk.dpo_loss(c, r, cr, rr, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        rk.dpo_loss(c, r, cr, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        rk.dpo_loss(c, r, cr, rr, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        rk.dpo_loss(c, r, cr, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="ref_rejected_logp"):
        rk.dpo_loss(c, r, cr, rr[:2])
    with pytest.raises(TypeError, match="rejected_logp"):
        rk.dpo_loss(c, r.long(), cr, rr)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck_and_compile():
    ins = [t.requires_grad_(True) for t in _inputs((9,), torch.float32, seed=4, scale=3.0)]
    for code, eps in ((0, 0.1), (1, 0.0), (2, 0.0), (3, 0.2)):
        torch.library.opcheck(torch.ops.rlhf_kernels.dpo_loss_fwd.default, (*ins, 0.3, code, eps))

    def f(*a):
        losses, cw, rw = rk.dpo_loss(*a, beta=0.3, label_smoothing=0.1, backend="cpu")
        return losses.mean(), cw, rw

    out = torch.compile(f, fullgraph=True)(*ins)
    out[0].backward()
    exp = _ref(*[t.detach().double().requires_grad_(True) for t in ins], beta=0.3, label_smoothing=0.1)
    torch.testing.assert_close(out[0].double(), exp[0].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1].double(), exp[1], rtol=1e-5, atol=1e-5)
    assert ins[0].grad is not None and torch.isfinite(ins[0].grad).all()


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("loss", LOSSES)
def test_gpu_matches_reference(backend, loss):
    ins = _inputs((300,), torch.float32, seed=6, scale=3.0)
    kw = dict(beta=0.2, loss_type=loss[0], label_smoothing=loss[1])
    out, grads = _run(lambda *a, **k: rk.dpo_loss(*a, backend=backend, **k), [t.cuda() for t in ins], **kw)
    rout, rgrads = _run(_ref, [t.double() for t in ins], **kw)
    for x, y in zip(out, rout):
        torch.testing.assert_close(x.cpu().double(), y, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
def test_opcheck_triton_op():
    # no test_aot_dispatch_*: the interpreter needs real host pointers (see test_ppo_policy_loss)
    ins = [t.requires_grad_(True) for t in _inputs((5,), torch.float32, seed=12, scale=3.0)]
    torch.library.opcheck(torch.ops.rlhf_kernels.dpo_loss_fwd_triton.default, (*ins, 0.2, 0, 0.1),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
