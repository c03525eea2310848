"""Numeric extremes of the softmax ops on every backend that runs on CPU tensors, against the float64 reference of
the very same (rounded) inputs: rows whose logits sit far from 0 (|z| ≈ 1e4 in fp32, ≈ 1e2 in bf16, before a
temperature that doubles them), where exp without the row-max shift overflows or underflows, and -inf logits in
rows that also have finite ones (an impossible token: probability 0, no gradient, no NaN in the entropy).
The same for linear_logprobs, whose logits get a per-row offset through a constant hidden feature."""
import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends

INF = float("inf")
# per-row offsets, largest first: exp(offset / T) overflows fp32 (> e^88.7) or underflows to 0, both ways
OFFSETS = {torch.float32: [1e4, -1e4, 3e3, 0.0], torch.bfloat16: [1e2, -1e2, 60.0, 0.0]}
TEMPERATURES = [1.0, 0.5]
HALF_ULP = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8}


def _tol(dtype, temperature):
    """What the kernels reach: log-probs are differences of numbers of size |z|/T, so their error is a few ulp
    of fp32 at that size (ulp(2e4) = 2^-9); the gradient p − onehot inherits it as a relative error of p."""
    big = max(abs(o) for o in OFFSETS[dtype]) / temperature
    ulp = 2.0 ** (torch.tensor(big).log2().floor().item() - 23)
    return dict(rtol=1e-5, atol=4 * ulp)


def _logits(dtype, V=300, seed=0):
    """One row per offset: N(0, 3²) logits around it, three of them -inf (never the target)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor(OFFSETS[dtype], dtype=torch.float64)
    x = torch.randn(len(offsets), V, generator=g, dtype=torch.float64) * 3 + offsets[:, None]
    tokens = torch.randint(0, V, (len(offsets),), generator=g)
    for r in range(len(offsets)):
        impossible = (tokens[r] + torch.tensor([1, 7, 150])) % V
        x[r, impossible] = -INF
    return x.to(dtype), tokens


def _grads(fn, x, w_lp, w_ent):
    x = x.detach().clone().requires_grad_(True)
    lp, ent = fn(x)
    grad, = torch.autograd.grad((lp * w_lp).sum() + (ent * w_ent).sum(), x)
    return lp.detach(), ent.detach(), grad


@pytest.mark.parametrize("backend", cpu_backends("logprobs_from_logits"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_logprobs_from_logits_far_from_zero_and_minus_inf(backend, dtype, temperature):
    x, tokens = _logits(dtype)
    w_lp, w_ent = torch.tensor([1.0, -2.0, 0.5, 1.5]), torch.tensor([0.7, 1.0, -1.0, 0.3])
    got = _grads(lambda z: rk.logprobs_from_logits(z, tokens, temperature=temperature, return_entropy=True,
                                                   backend=backend), x, w_lp, w_ent)
    exp = _grads(lambda z: reference.logprobs_from_logits(z, tokens, temperature, -100, True), x.double(),
                 w_lp.double(), w_ent.double())
    for a in got:
        assert torch.isfinite(a).all()
    tol = _tol(dtype, temperature)
    for i, (a, b) in enumerate(zip(got[:2], exp[:2])):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, i=i: f"output {i}: {m}")
    # the gradient is rounded once to the logits dtype: half an ulp of it on top
    torch.testing.assert_close(got[2].double(), exp[2], rtol=max(tol["rtol"], HALF_ULP[dtype]), atol=tol["atol"])
    assert (got[2][x == -INF] == 0).all()  # an impossible token gets no gradient
    # the values alone, the old/ref log-prob path (its own CPU code path)
    lp = rk.logprobs_from_logits(x, tokens, temperature=temperature, backend=backend)
    torch.testing.assert_close(lp.double(), exp[0], **tol)


def _linear_inputs(dtype, H=9, V=200, seed=1):
    """hidden[:, 0] is the row's offset and weight[:, 0] = 1: every logit of a row moves by it (the log-probs do
    not change); bias = -inf on three entries."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor(OFFSETS[dtype], dtype=torch.float64)
    hidden = torch.randn(len(offsets), H, generator=g, dtype=torch.float64)
    hidden[:, 0] = offsets
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    weight[:, 0] = 1.0
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (len(offsets),), generator=g)
    impossible = torch.tensor([0, 77, V - 1])
    tokens[torch.isin(tokens, impossible)] = 5
    bias[impossible] = -INF
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), tokens


@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_linear_logprobs_far_from_zero_and_minus_inf(backend, dtype, temperature):
    h, w, b, tokens = _linear_inputs(dtype)
    g = torch.Generator().manual_seed(2)
    w_lp, w_ent = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)

    def run(fn, *ins):
        ins = [t.detach().clone().requires_grad_(True) for t in ins]
        lp, ent = fn(*ins)
        grads = torch.autograd.grad((lp * w_lp.to(lp.dtype)).sum() + (ent * w_ent.to(lp.dtype)).sum(), ins[:2])
        return [lp.detach(), ent.detach(), *grads]

    got = run(lambda hh, ww: rk.linear_logprobs(hh, ww, tokens, bias=b, temperature=temperature,
                                                return_entropy=True, backend=backend), h, w)
    exp = run(lambda hh, ww: reference.linear_logprobs(hh, ww, tokens, b.double(), temperature, -100, True),
              h.double(), w.double())
    for a in got:
        assert torch.isfinite(a).all()
    tol = _tol(dtype, temperature)
    torch.testing.assert_close(got[0].double(), exp[0], **tol)
    torch.testing.assert_close(got[1].double(), exp[1], **tol)
    # gradients, relative to the largest: fp32, the error above; bf16, also one rounding of d(logits) to bf16
    # before the gradient dots (the triton backend, as tensor-core kernels do) and of the result: what
    # test_linear_logprobs allows at ordinary logits
    for i in (2, 3):
        scale = max(1.0, exp[i].abs().max().item())
        atol = tol["atol"] * scale if dtype == torch.float32 else 1.6e-2 * scale
        torch.testing.assert_close(got[i].double(), exp[i], rtol=0, atol=atol, msg=lambda m, i=i: f"gradient {i - 2}: {m}")
    assert (got[3][[0, 77, -1]] == 0).all()  # impossible vocabulary entries get no weight gradient
