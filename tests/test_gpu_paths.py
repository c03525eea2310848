"""GPU tests at the shapes and dtypes of real training, for the cuda and the compiled triton backends (they skip
without a GPU; `make gpu-check` runs them with TRITON_INTERPRET=0): every output and statistic against the
float64 reference of the very same (rounded) inputs, fp32/bf16/fp16, the Llama-3 vocabulary (V = 128256) with
H in {2048, 4096} and thousands of rows, the shifted non-contiguous logits[:, :-1] of a causal LM, the head's
multi-chunk path under a small RLHF_KERNELS_CHUNK_BYTES, and the token_kl backward.

Tolerances: outputs are fp32 (fp64 in, fp64 out); what an fp32 computation reaches is ~1e-5 relative. Gradients
come out in the input dtype: one rounding, half an ulp of it (2^-8 bf16, 2^-11 fp16, 2^-24 fp32), on top."""
import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import needs_gpu, ragged_masks

pytestmark = needs_gpu
GPU_BACKENDS = ["cuda", "triton"]
LOW = [torch.float32, torch.bfloat16, torch.float16]
HALF_ULP = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float64: 1e-15}
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close_grad(got, exp, dtype, what):
    """A gradient stored in `dtype` against the float64 one: half an ulp of `dtype` relative, plus fp32 error
    relative to the gradient's size."""
    scale = max(exp.abs().max().item(), 1e-30)
    torch.testing.assert_close(got.to(exp.device).double(), exp.double(), rtol=2 * HALF_ULP[dtype],
                               atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


# ---- losses' statistics (clipfrac, approx_kl, vf_clipfrac) and gradients, in every input dtype ---------------

def _policy_inputs(B, T, dtype, seed):
    g = _gen(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 5
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = ragged_masks(B, T, g)["holes"]
    return [t.to(dtype) for t in (logp, old, adv)], mask


def _loss_and_grads(fn, ins, mask, **kw):
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    loss, stats = fn(*ins, mask, **kw)
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    return loss.detach(), stats, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, ins)]


def _check_stats(stats, exp_stats, keys, n_valid):
    for k in keys:
        assert stats[k].dtype == torch.float32 and stats[k].dim() == 0 and not stats[k].requires_grad, k
        # a token whose fp32 ratio lands on the other side of a clip bound than in fp64 moves a fraction by 1/n
        atol = 1.5 / n_valid if k.endswith("clipfrac") else 1e-6
        torch.testing.assert_close(stats[k].cpu().double(), exp_stats[k].double(), rtol=1e-5, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("aggregation", AGGS)
def test_policy_loss_stats_and_gradients(backend, dtype, aggregation):
    (logp, old, adv), mask = _policy_inputs(64, 1500, dtype, seed=1)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation=aggregation)
    loss, stats, grads = _loss_and_grads(lambda *a, **k: rk.ppo_policy_loss(*a, backend=backend, **k),
                                         [t.cuda() for t in (logp, old, adv)], mask.cuda(), **kw)
    eloss, estats, egrads = _loss_and_grads(reference.ppo_policy_loss, [t.double() for t in (logp, old, adv)], mask,
                                            **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.cpu().double(), eloss, rtol=1e-5, atol=1e-6)
    assert 0.05 < estats["clipfrac"] < 0.95  # both branches occur: the statistic can be wrong
    _check_stats(stats, estats, ("clipfrac", "approx_kl"), int(mask.sum()))
    for i, (g, e) in enumerate(zip(grads, egrads)):
        assert g.dtype == dtype
        _close_grad(g, e, dtype, f"gradient of input {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum"])
def test_value_loss_stats_and_gradients(backend, dtype, aggregation):
    g = _gen(2)
    v = torch.randn(64, 1500, generator=g, dtype=torch.float64)
    vo = v + torch.randn(64, 1500, generator=g, dtype=torch.float64) * 0.3
    ret = v + torch.randn(64, 1500, generator=g, dtype=torch.float64)
    mask = ragged_masks(64, 1500, g)["right"]
    ins = [t.to(dtype) for t in (v, vo, ret)]
    loss, stats, grads = _loss_and_grads(lambda *a, **k: rk.ppo_value_loss(*a, backend=backend, **k),
                                         [t.cuda() for t in ins], mask.cuda(), clip=0.2, aggregation=aggregation)
    eloss, estats, egrads = _loss_and_grads(reference.ppo_value_loss, [t.double() for t in ins], mask, clip=0.2,
                                            aggregation=aggregation)
    torch.testing.assert_close(loss.cpu().double(), eloss, rtol=1e-5, atol=1e-6)
    assert 0.05 < estats["vf_clipfrac"] < 0.95
    _check_stats(stats, estats, ("vf_clipfrac",), int(mask.sum()))
    for i, (gr, e) in enumerate(zip(grads, egrads)):
        _close_grad(gr, e, dtype, f"gradient of input {i}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_dpo_loss_low_precision(backend, dtype):
    g = _gen(3)
    c = -torch.rand(4096, generator=g, dtype=torch.float64) * 100
    ins = [c] + [c + torch.randn(4096, generator=g, dtype=torch.float64) * 20 for _ in range(3)]
    ins = [t.to(dtype) for t in ins]
    for loss_type, eps in (("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)):
        leaves = [t.cuda().requires_grad_(True) for t in ins]
        out = rk.dpo_loss(*leaves, beta=0.1, loss_type=loss_type, label_smoothing=eps, backend=backend)
        grads = torch.autograd.grad(out[0].sum(), leaves)
        rleaves = [t.double().requires_grad_(True) for t in ins]
        exp = reference.dpo_loss(*rleaves, 0.1, loss_type, eps)
        egrads = torch.autograd.grad(exp[0].sum(), rleaves)
        for o, e in zip(out, exp):
            torch.testing.assert_close(o.detach().cpu().double(), e.detach(), rtol=1e-5, atol=1e-5)
        for gr, e in zip(grads, egrads):
            _close_grad(gr, e, dtype, f"{loss_type} gradient")


# ---- token_kl: the backward on CUDA, clamp=None (the default) and a clamp, every dtype ------------------------

@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [None, 0.3])
def test_token_kl_backward(backend, dtype, estimator, clamp):
    g = _gen(4)
    logp = -torch.rand(8, 3000, generator=g, dtype=torch.float64) * 5
    ref = logp + torch.randn(8, 3000, generator=g, dtype=torch.float64) * 0.7
    logp, ref = logp.to(dtype), ref.to(dtype)
    w = torch.randn(8, 3000, generator=g, dtype=torch.float64)
    a, b = logp.cuda().requires_grad_(True), ref.cuda().requires_grad_(True)
    out = rk.token_kl(a, b, estimator=estimator, clamp=clamp, backend=backend)
    ga, gb = torch.autograd.grad((out * w.cuda().to(out.dtype)).sum(), (a, b))
    ra, rb = logp.double().requires_grad_(True), ref.double().requires_grad_(True)
    exp = reference.token_kl(ra, rb, estimator, clamp)
    ea, eb = torch.autograd.grad((exp * w).sum(), (ra, rb))
    # fp64: exact to rounding, but a clamp reaches compiled Triton as an fp32 scalar (0.3 moves by 1.2e-8)
    tol = (3e-8 if backend == "triton" and clamp else 1e-12) if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.detach().cpu().double(), exp.detach(), rtol=tol, atol=tol)
    _close_grad(ga, ea, dtype, "d logp")
    _close_grad(gb, eb, dtype, "d ref_logp")


# ---- masked_whiten and token_rewards beyond fp64 ----------------------------------------------------------------

@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_whiten_and_rewards_low_precision(backend, dtype):
    g = _gen(5)
    x = (torch.randn(64, 2000, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    mask = ragged_masks(64, 2000, g)["holes"]
    out = rk.masked_whiten(x.cuda(), mask.cuda(), unbiased=True, backend=backend)
    exp = reference.masked_whiten(x.double(), mask, True, True, 1e-8)
    torch.testing.assert_close(out.cpu().double(), exp, rtol=1e-5, atol=1e-5)
    score = torch.randn(64, generator=g, dtype=torch.float64).to(dtype)
    logp = (-torch.rand(64, 2000, generator=g, dtype=torch.float64) * 5).to(dtype)
    ref = (logp.double() + torch.randn(64, 2000, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    for est in ("k1", "k3"):
        r = rk.token_rewards(score.cuda(), mask.cuda(), logp=logp.cuda(), ref_logp=ref.cuda(), kl_coef=0.05,
                             kl_estimator=est, backend=backend)
        e = reference.token_rewards(score.double(), mask, logp.double(), ref.double(), 0.05, est)
        torch.testing.assert_close(r.cpu().double(), e, rtol=1e-5, atol=1e-6)


# ---- the heads at V = 128256 ---------------------------------------------------------------------------------

V_LLAMA = 128256


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_logprobs_from_logits_llama_vocab_shifted(backend, dtype):
    # logits[:, :-1] of a [B, T + 1, V] causal-LM output: rows of stride V inside batches of stride (T + 1)·V,
    # leading dims that do not merge; 2 × 1024 = 2048 rows
    B, T = 2, 1024
    g = torch.Generator(device="cuda").manual_seed(6)
    full = (torch.randn(B, T + 1, V_LLAMA, device="cuda", generator=g) * 3).to(dtype)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    tokens = torch.randint(0, V_LLAMA, (B, T), device="cuda", generator=g)
    tokens[0, -100:] = -100
    w_lp, w_ent = torch.randn(B, T, device="cuda", generator=g), torch.randn(B, T, device="cuda", generator=g)
    x = logits.detach().requires_grad_(True)  # the view itself is the leaf: its gradient is [B, T, V]
    lp, ent = rk.logprobs_from_logits(x, tokens, temperature=0.7, return_entropy=True, backend=backend)
    grad, = torch.autograd.grad((lp * w_lp).sum() + (ent * w_ent).sum(), x)
    lp_only = rk.logprobs_from_logits(logits, tokens, temperature=0.7, backend=backend)  # the old/ref path
    for r0 in range(0, T, 256):  # the float64 reference a slice of rows at a time (2 GiB at once otherwise)
        sl = (slice(None), slice(r0, r0 + 256))
        xr = logits[sl].double().requires_grad_(True)
        elp, eent = reference.logprobs_from_logits(xr, tokens[sl], 0.7, -100, True)
        egrad, = torch.autograd.grad((elp * w_lp[sl].double()).sum() + (eent * w_ent[sl].double()).sum(), xr)
        torch.testing.assert_close(lp[sl].double(), elp.detach(), rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(lp_only[sl].double(), elp.detach(), rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(ent[sl].double(), eent.detach(), rtol=1e-5, atol=5e-5)
        _close_grad(grad[sl], egrad, dtype, f"gradient rows {r0}..")


def _head_oracle(h, w, tokens, temperature, g_lp, g_ent, chunk=8192):
    """Float64 logp, entropy and the gradients of Σ g_lp·logp + g_ent·entropy, for a [V, H] weight too big to
    widen at once: two passes over vocabulary chunks (log-sum-exp, then everything else). Yields (entropy and
    logp first) then (slice, d weight of the slice) per chunk, then d hidden."""
    hd = h.double()
    valid = tokens != -100
    lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float64, device=h.device)
    target = torch.zeros_like(lse)
    V = w.shape[0]
    for v0 in range(0, V, chunk):
        z = hd @ w[v0:v0 + chunk].double().T / temperature
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        inside = valid & (tokens >= v0) & (tokens < v0 + z.shape[1])
        target[inside] = z[inside, tokens[inside] - v0]
    ez = torch.zeros_like(lse)  # Σ p·z
    for v0 in range(0, V, chunk):
        z = hd @ w[v0:v0 + chunk].double().T / temperature
        ez += (torch.exp(z - lse[:, None]) * z).sum(-1)
    ent = torch.where(valid, lse - ez, 0.0)
    logp = torch.where(valid, target - lse, 0.0)
    yield logp, ent
    gl, ge = torch.where(valid, g_lp.double(), 0.0), torch.where(valid, g_ent.double(), 0.0)
    dh = torch.zeros_like(hd)
    for v0 in range(0, V, chunk):
        wc = w[v0:v0 + chunk].double()
        z = hd @ wc.T / temperature
        p = torch.exp(z - lse[:, None])
        # d logp / dz = onehot − p; d entropy / dz = −p·(z − Σ p·z)
        dz = -gl[:, None] * p - ge[:, None] * p * (z - ez[:, None])
        inside = valid & (tokens >= v0) & (tokens < v0 + z.shape[1])
        dz[inside, tokens[inside] - v0] += gl[inside]
        dz /= temperature
        dh += dz @ wc
        yield slice(v0, v0 + z.shape[1]), dz.T @ hd
    yield dh


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("H", [2048, 4096])
def test_linear_logprobs_llama_head(backend, dtype, H):
    N = 2048
    g = torch.Generator(device="cuda").manual_seed(7)
    h = torch.randn(N, H, device="cuda", generator=g).to(dtype)
    w = (torch.randn(V_LLAMA, H, device="cuda", generator=g) * (3 / H ** 0.5)).to(dtype)
    tokens = torch.randint(0, V_LLAMA, (N,), device="cuda", generator=g)
    tokens[:50] = -100
    g_lp, g_ent = torch.randn(N, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = rk.linear_logprobs(hh, ww, tokens, temperature=0.7, return_entropy=True, backend=backend)
    dh, dw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hh, ww))
    del hh, ww
    oracle = _head_oracle(h, w, tokens, 0.7, g_lp, g_ent)
    elp, eent = next(oracle)
    # fp32 accumulation over H products and V exponentials
    torch.testing.assert_close(lp.double(), elp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), eent, rtol=1e-5, atol=1e-4)
    # bf16/fp16 operands: the kernels round d(logits) to the operand dtype before the gradient dots (tensor-core
    # practice), a relative 2^-9 of each term; fp32 operands: fp32 GEMMs over V and N terms
    low = dtype != torch.float32
    for item in oracle:
        if isinstance(item, tuple):
            sl, edw = item
            scale = edw.abs().max().item()
            torch.testing.assert_close(dw[sl].double(), edw, rtol=0, atol=(2e-2 if low else 1e-4) * scale,
                                       msg=lambda m: f"d weight rows {sl}: {m}")
        else:
            scale = item.abs().max().item()
            torch.testing.assert_close(dh.double(), item, rtol=0, atol=(2e-2 if low else 1e-4) * scale)


# ---- the head's multi-chunk path: a tiny RLHF_KERNELS_CHUNK_BYTES, ragged last chunks -----------------------

@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_linear_logprobs_many_chunks(backend, dtype, monkeypatch):
    # N = 333 rows and V = 9001 entries: neither divides any chunk size, so every last chunk is ragged
    # (triton's chunks are at least MIN_CHUNK = 4096 columns on a GPU: 4096 + 4096 + 809)
    monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", str(64 << 10))
    N, H, V = 333, 64, 9001
    g = _gen(8)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (3 / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[::7] = -100
    tokens[1], tokens[2] = V - 1, 4095  # in the last chunk, and at a chunk's last column
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    g_lp, g_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)

    def run(fn, dev, *ins):
        leaves = [t.to(dev).requires_grad_(True) for t in ins]
        lp, ent = fn(*leaves)
        grads = torch.autograd.grad((lp * g_lp.to(dev, lp.dtype)).sum() + (ent * g_ent.to(dev, lp.dtype)).sum(),
                                    leaves)
        return [t.detach().cpu().double() for t in (lp, ent, *grads)]

    got = run(lambda hh, ww, bb: rk.linear_logprobs(hh, ww, tokens.cuda(), bias=bb, temperature=0.6,
                                                    return_entropy=True, backend=backend), "cuda", h, w, b)
    exp = run(lambda hh, ww, bb: reference.linear_logprobs(hh, ww, tokens, bb, 0.6, -100, True), "cpu",
              h.double(), w.double(), b.double())
    rtol, atol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (0, 1.6e-2)}[dtype]
    for i, (a, e) in enumerate(zip(got, exp)):
        tol = (1e-5, 1e-5) if i < 2 and dtype == torch.bfloat16 else (rtol, atol)
        torch.testing.assert_close(a, e, rtol=tol[0], atol=tol[1] * max(1.0, e.abs().max().item()),
                                   msg=lambda m, i=i: f"output {i}: {m}")
