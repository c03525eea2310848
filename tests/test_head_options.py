"""The head's options on rk.linear_logprobs and rk.logprobs_from_logits: per-token temperature, softcap, and
ignored rows left out of the GEMMs, on every backend against the float64 reference."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu

IGN = -100


def _backends(op):
    return cpu_backends(op) + [pytest.param("cuda", marks=needs_gpu)]


def _case(shape, V, H, seed, device="cpu"):
    """hidden, weight, bias, tokens with ignored positions (the whole first row when there are two or more),
    per-token temperatures in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 3
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, shape, generator=g)
    tokens[torch.rand(shape, generator=g) < 0.3] = IGN
    if shape[0] > 1:
        tokens[0] = IGN
    temps = 0.5 + 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (hidden, weight, bias, tokens, temps)]


# (shape, V, temperature: "scalar" | "token" | "row" (one per sequence, broadcast), softcap)
CASES = [((3, 4), 37, "token", 4.0), ((1,), 19, "scalar", 2.5), ((2, 3), 53, "row", None), ((5,), 37, "token", None)]


def _temperature(kind, temps):
    return {"scalar": 0.7, "token": temps, "row": temps[..., :1]}[kind]


def _run_both(op, backend, shape, V, kind, cap, dtype, device):
    hidden, weight, bias, tokens, temps = _case(shape, V, 8, hash((shape, V)) % 1000, device)
    t = _temperature(kind, temps)
    if op == "linear_logprobs":
        leaves = [x.to(dtype).requires_grad_() for x in (hidden, weight, bias)]
        ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
        got = rk.linear_logprobs(*leaves[:2], tokens, bias=leaves[2], temperature=t, softcap=cap,
                                 return_entropy=True, backend=backend)
        exp = reference.linear_logprobs(*ref_leaves[:2], tokens, ref_leaves[2], t, IGN, True, cap)
    else:
        logits = (hidden @ weight.T + bias).to(dtype)
        leaves, ref_leaves = [logits.requires_grad_()], [logits.detach().double().requires_grad_()]
        got = rk.logprobs_from_logits(leaves[0], tokens, temperature=t, softcap=cap, return_entropy=True,
                                      backend=backend)
        exp = reference.logprobs_from_logits(ref_leaves[0], tokens, t, IGN, True, cap)
    g = torch.Generator().manual_seed(0)
    g1, g2 = (torch.randn(shape, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    for out in (got, exp):
        (out[0].double() * g1 + out[1].double() * g2).sum().backward()
    return got, exp, [x.grad for x in leaves], [x.grad for x in ref_leaves], tokens


@pytest.mark.parametrize("op", ["linear_logprobs", "logprobs_from_logits"])
@pytest.mark.parametrize("case", CASES, ids=[f"{s}-V{v}-{k}-cap{c}" for s, v, k, c in CASES])
@pytest.mark.parametrize("backend", _backends("linear_logprobs"))
def test_matches_reference(op, case, backend):
    device = "cuda" if backend == "cuda" else "cpu"
    got, exp, grads, ref_grads, tokens = _run_both(op, backend, *case, torch.float32, device)
    for a, b in zip(got, exp):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4, atol=1e-4)
    ignored = tokens == IGN
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[0][~ignored] < 0).all()  # a test that can fail: the valid rows are real log-probs
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_reference_per_token_temperature_is_per_row_scalar():
    hidden, weight, bias, tokens, temps = _case((4,), 23, 6, 3)
    tokens = tokens.clamp(min=0)  # every row valid
    lp = reference.linear_logprobs(hidden, weight, tokens, bias, temps, IGN, False, 3.0)
    for i in range(4):
        one = reference.linear_logprobs(hidden[i:i + 1], weight, tokens[i:i + 1], bias, float(temps[i]), IGN, False, 3.0)
        torch.testing.assert_close(lp[i:i + 1], one, rtol=1e-12, atol=1e-12)
    z = (hidden @ weight.T + bias)
    manual = torch.log_softmax(3.0 * torch.tanh(z / 3.0) / temps[:, None], -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(lp, manual)


@pytest.mark.parametrize("op", ["linear_logprobs", "logprobs_from_logits"])
@pytest.mark.parametrize("backend", [b for b in cpu_backends("linear_logprobs") if b != "reference"])
def test_gradcheck(op, backend):
    hidden, weight, bias, tokens, temps = _case((2, 2), 11, 3, 5)
    tokens[0, 1] = 4  # one ignored position left in the first row
    if op == "linear_logprobs":
        leaves = [x.requires_grad_() for x in (hidden, weight, bias)]

        def f(h, w, b):
            return rk.linear_logprobs(h, w, tokens, bias=b, temperature=temps, softcap=2.0, return_entropy=True,
                                      backend=backend)
    else:
        leaves = [(hidden @ weight.T + bias).detach().requires_grad_()]

        def f(x):
            return rk.logprobs_from_logits(x, tokens, temperature=temps, softcap=2.0, return_entropy=True,
                                           backend=backend)
    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


class _OpCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "rlhf_kernels" in str(func):
            self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs")[1:])
def test_ignored_rows_leave_the_gemms(backend):
    hidden, weight, bias, tokens, temps = _case((8,), 13, 4, 7)
    tokens[:] = IGN
    tokens[[2, 5]] = torch.tensor([3, 9])
    h = hidden.requires_grad_()
    with _OpCalls() as rec:
        lp = rk.linear_logprobs(h, weight, tokens, bias=bias, temperature=temps, backend=backend)
        lp.sum().backward()
    rows = [args[2].shape[0] for name, args in rec.calls if "linear_logprobs_bwd" in name]
    rows += [args[0].shape[0] for name, args in rec.calls if "linear_logprobs_fwd" in name]
    assert rows == [2, 2], rec.calls
    assert (h.grad[tokens == IGN] == 0).all() and (h.grad[tokens != IGN] != 0).all()
    # every row ignored: no GEMM row at all, zero outputs and gradients
    w = weight.clone().requires_grad_()
    lp = rk.linear_logprobs(hidden.detach(), w, torch.full_like(tokens, IGN), temperature=temps, softcap=1.5,
                            backend=backend)
    lp.sum().backward()
    assert (lp == 0).all() and (w.grad == 0).all()


def test_opcheck_new_arguments():
    """The schemas with the new trailing arguments: fake kernels and autograd registration; the compiled
    (aot dispatch) check only for the forwards, where the per-row temperatures ride through setup_context."""
    hidden, weight, bias, tokens, temps = _case((5,), 13, 4, 9)
    h, w, b, t32 = hidden.float(), weight.float(), bias.float(), temps.float()
    ops = torch.ops.rlhf_kernels
    light = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.linear_logprobs_fwd.default, (h.requires_grad_(), w, b, tokens, 1.0, IGN, 0, t32, 3.0))
    lp, ent, lse = ops.linear_logprobs_fwd(h.detach(), w, b, tokens, 1.0, IGN, 0, t32, 3.0)
    torch.library.opcheck(ops.linear_logprobs_bwd.default,
                          (torch.randn(5), torch.randn(5), h.detach(), w, b, tokens, lse, ent, 1.0, IGN, True, True,
                           True, 0, t32, 3.0), test_utils=light)
    x = (h.detach() @ w.T).requires_grad_()
    torch.library.opcheck(ops.logprobs_from_logits_fwd.default, (x, tokens, 1.0, IGN, True, t32, 3.0))
    lp, ent, lse = ops.logprobs_from_logits_fwd(x.detach(), tokens, 1.0, IGN, True, t32, 3.0)
    torch.library.opcheck(ops.logprobs_from_logits_bwd.default,
                          (torch.randn(5), torch.randn(5), x.detach(), tokens, lse, ent, 1.0, IGN, t32, 3.0),
                          test_utils=light)


@pytest.mark.parametrize("op", ["linear_logprobs", "logprobs_from_logits"])
def test_bad_options(op):
    hidden, weight, bias, tokens, temps = _case((2, 3), 7, 4, 1)
    h, w = hidden.float(), weight.float()

    def call(**kw):
        if op == "linear_logprobs":
            return rk.linear_logprobs(h, w, tokens, **kw)
        return rk.logprobs_from_logits(h @ w.T, tokens, **kw)

    bad = temps.clone()
    bad[1, 2] = 0.0
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=temps[:, :2])  # not broadcastable to tokens.shape
    with pytest.raises(TypeError, match="temperature"):
        call(temperature=temps > 1)
    with pytest.raises(TypeError, match="temperature"):
        call(temperature="hot")
    with pytest.raises(ValueError, match="softcap"):
        call(softcap=0.0)
    with pytest.raises(TypeError, match="softcap"):
        call(softcap=torch.tensor(2.0))
    call(temperature=bad, validate=False)  # validate=False skips the value check (it would sync)
