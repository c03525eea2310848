"""The sampler replay (top_k, top_p) on rk.linear_logprobs and rk.logprobs_from_logits: the reference against a
plain per-row reading of vLLM's rule and against transformers' own processors, every backend against the float64
reference (composed with per-token temperature, softcap and ignored rows), gradcheck, and random per-token
settings."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu

IGN = -100
NINF = float("-inf")


def _backends(op):
    return cpu_backends(op) + [pytest.param("cuda", marks=needs_gpu)]


def _spec_kept(z, k, p):
    """One row's kept set by the words of the rule, with Python lists: top k (ties with the k-th kept), softmax,
    ascending cumulative probability of each group of equal values, drop the groups at or below 1 − p."""
    z = [float(v) for v in z]
    V = len(z)
    kept = [True] * V
    if 0 < k < V:
        kth = sorted(z, reverse=True)[k - 1]
        kept = [v >= kth for v in z]
    if p < 1:
        m = max(v for v, c in zip(z, kept) if c)
        Z = sum(math.exp(v - m) for v, c in zip(z, kept) if c)
        cum = [sum(math.exp(v - m) for v, c in zip(z, kept) if c and v <= z[j]) / Z for j in range(V)]
        kept = [c and (cum[j] > 1 - p or z[j] == m) for j, c in enumerate(kept)]
    return kept


def _tied_logits(N, V, g):
    """Random logits with ties: in each row a group of equal values at a random rank, and a tied maximum in one row."""
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    for r in range(N):
        idx = torch.randperm(V, generator=g)[:3]
        x[r, idx] = x[r, idx[0]].item()
    x[0, :2] = x[0].max()
    return x


def test_reference_is_the_rule():
    g = torch.Generator().manual_seed(1)
    N, V = 12, 17
    z = _tied_logits(N, V, g)
    k = torch.randint(-1, V + 2, (N,), generator=g)
    p = torch.rand(N, generator=g, dtype=torch.float64) * 0.9 + 0.05
    p[::4] = 1.0
    tok = torch.zeros(N, dtype=torch.long)
    kept = reference.replay_kept(z, tok, k, p)
    for r in range(N):
        assert kept[r].tolist() == _spec_kept(z[r], int(k[r]), float(p[r])), r
    assert kept.sum(-1).min() >= 1 and (kept.sum(-1) < V).any()  # the cuts cut something, never everything


def _case(shape, V, H, seed, device="cpu"):
    """hidden, weight (with duplicated rows: ties among the logits), bias, tokens (30% ignored, the first row all
    ignored when there are two), per-token temperatures, top_k and top_p per token (some off)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 3
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    weight[1:4] = weight[0]  # four equal logits in every row: ties at whatever rank they land
    bias[1:4] = bias[0]
    tokens = torch.randint(0, V, shape, generator=g)
    # every other token the argmax (always kept), the rest random (often cut)
    tokens.view(-1)[::2] = (hidden @ weight.T + bias).argmax(-1).view(-1)[::2]
    tokens[torch.rand(shape, generator=g) < 0.3] = IGN
    if shape[0] > 1:
        tokens[0] = IGN
    temps = 0.5 + 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    top_k = torch.randint(-1, V // 2, shape, generator=g)
    top_p = 0.3 + 0.7 * torch.rand(shape, generator=g, dtype=torch.float64)
    top_p[torch.rand(shape, generator=g) < 0.2] = 1.0
    return [t.to(device) for t in (hidden, weight, bias, tokens, temps, top_k, top_p)]


# (shape, V, top_k: "token" | scalar | None, top_p: "token" | scalar | None, temperature kind, softcap)
CASES = [((3, 4), 37, "token", "token", "token", 4.0), ((1,), 19, 5, None, "scalar", None),
         ((2, 3), 53, None, 0.8, "row", 3.0), ((5,), 37, 4, "token", "token", None)]


def _args(case, hidden, temps, top_k, top_p):
    _, _, k, p, t, cap = case
    temperature = {"scalar": 0.7, "token": temps, "row": temps[..., :1]}[t]
    return dict(temperature=temperature, softcap=cap, top_k=top_k if k == "token" else k,
                top_p=top_p if p == "token" else p)


def _run(op, backend, leaves, tokens, bias_leaf, kw):
    if op == "linear_logprobs":
        return rk.linear_logprobs(leaves[0], leaves[1], tokens, bias=bias_leaf, return_entropy=True, backend=backend,
                                  **kw)
    return rk.logprobs_from_logits(leaves[0], tokens, return_entropy=True, backend=backend, **kw)


@pytest.mark.parametrize("op", ["linear_logprobs", "logprobs_from_logits"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-V{c[1]}-k{c[2]}-p{c[3]}-{c[4]}-cap{c[5]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch_invariant"])
@pytest.mark.parametrize("backend", _backends("linear_logprobs"))
def test_matches_reference(op, case, dtype, backend, invariant):
    device = "cuda" if backend == "cuda" else "cpu"
    shape, V = case[:2]
    hidden, weight, bias, tokens, temps, top_k, top_p = _case(shape, V, 8, CASES.index(case), device)
    kw = dict(_args(case, hidden, temps, top_k, top_p), batch_invariant=invariant)
    if op == "linear_logprobs":
        base = [hidden, weight, bias]
    else:
        base = [(hidden @ weight.T + bias).to(dtype).double()]  # the same logits for both sides, ties kept
    leaves = [x.to(dtype).requires_grad_() for x in base]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    got = _run(op, backend, leaves[:2], tokens, leaves[2] if len(leaves) > 2 else None, kw)
    exp = _run(op, "reference", ref_leaves[:2], tokens, ref_leaves[2] if len(ref_leaves) > 2 else None, kw)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    assert got[0].dtype == dtype
    out = torch.isinf(exp[0])
    assert torch.equal(torch.isinf(got[0]), out)  # the same tokens fall outside their kept sets
    assert (~out & (tokens != IGN)).any()  # kept tokens: the values below are compared
    assert out.any() or shape == (1,)  # and cut ones (the one-row case has its argmax only)
    torch.testing.assert_close(got[0][~out].double(), exp[0][~out].detach(), **tol)
    torch.testing.assert_close(got[1].double(), exp[1].detach(), **tol)
    ignored = tokens == IGN
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    g = torch.Generator().manual_seed(0)
    g1, g2 = (torch.randn(shape, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    for o in (got, exp):  # the loss masks the −inf positions first, as a caller must
        lp = torch.where(torch.isfinite(o[0]), o[0], 0.0)
        (lp.double() * g1 + o[1].double() * g2).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, **tol)


@pytest.mark.parametrize("op", ["linear_logprobs", "logprobs_from_logits"])
@pytest.mark.parametrize("backend", [b for b in cpu_backends("linear_logprobs") if b != "reference"])
def test_gradcheck(op, backend):
    # the interpreter is slow: triton gets a smaller case (its gradients also match the reference's in float64 above)
    shape = (2, 3) if backend == "cpu" else (2, 2)
    hidden, weight, bias, tokens, temps, top_k, top_p = _case(shape, 11, 3, 5)
    tokens[0, 1] = 4  # one valid position in the first row
    kw = dict(temperature=temps, softcap=2.0, top_k=top_k, top_p=top_p, return_entropy=True, backend=backend)
    if op == "linear_logprobs":
        leaves = [x.requires_grad_() for x in (hidden, weight, bias)]

        def f(h, w, b):
            lp, ent = rk.linear_logprobs(h, w, tokens, bias=b, **kw)
            return torch.where(torch.isfinite(lp), lp, 0.0), ent
    else:
        leaves = [(hidden @ weight.T + bias).detach().requires_grad_()]

        def f(x):
            lp, ent = rk.logprobs_from_logits(x, tokens, **kw)
            return torch.where(torch.isfinite(lp), lp, 0.0), ent
    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", [b for b in cpu_backends("linear_logprobs") if b != "reference"])
def test_all_ignored_and_single_rows(backend):
    hidden, weight, bias, tokens, temps, top_k, top_p = _case((4,), 13, 4, 2)
    w = weight.clone().requires_grad_()
    lp, ent = rk.linear_logprobs(hidden, w, torch.full_like(tokens, IGN), top_k=3, top_p=0.5, return_entropy=True,
                                 backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (w.grad == 0).all()
    x = (hidden[:1] @ weight.T).detach()
    one = rk.logprobs_from_logits(x, x.argmax(-1), top_k=1, backend=backend)  # k = 1: the argmax has p = 1
    assert one.abs().max() == 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 4), V=st.integers(2, 19), seed=st.integers(0, 2 ** 16), cap=st.sampled_from([None, 2.5]),
       invariant=st.booleans())
def test_random_per_token_settings(N, V, seed, cap, invariant):
    g = torch.Generator().manual_seed(seed)
    x = _tied_logits(N, V, g)
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[torch.rand(N, generator=g) < 0.2] = IGN
    kw = dict(temperature=0.3 + 2 * torch.rand(N, generator=g, dtype=torch.float64), softcap=cap,
              top_k=torch.randint(-2, V + 2, (N,), generator=g),
              top_p=torch.where(torch.rand(N, generator=g) < 0.3, 1.0,
                                0.05 + 0.95 * torch.rand(N, generator=g, dtype=torch.float64)),
              batch_invariant=invariant)
    exp = rk.logprobs_from_logits(x, tokens, return_entropy=True, backend="reference", **kw)
    for backend in [b for b in cpu_backends("logprobs_from_logits") if b != "reference"]:
        got = rk.logprobs_from_logits(x, tokens, return_entropy=True, backend=backend, **kw)
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("op", ["linear_logprobs", "logprobs_from_logits"])
def test_bad_options(op):
    hidden, weight, bias, tokens, temps, top_k, top_p = _case((2, 3), 7, 4, 1)
    h, w = hidden.float(), weight.float()

    def call(**kw):
        if op == "linear_logprobs":
            return rk.linear_logprobs(h, w, tokens, **kw)
        return rk.logprobs_from_logits(h @ w.T, tokens, **kw)

    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="top_p"):
            call(top_p=bad)
    with pytest.raises(ValueError, match="top_p"):
        call(top_p=torch.full((2, 3), 1.2))
    with pytest.raises(TypeError, match="top_p"):
        call(top_p="high")
    with pytest.raises(TypeError, match="top_k"):
        call(top_k=2.5)
    with pytest.raises(TypeError, match="top_k"):
        call(top_k=torch.ones(2, 3))
    with pytest.raises(ValueError, match="top_k"):
        call(top_k=torch.ones(4, dtype=torch.long))
    call(top_p=torch.full((2, 3), 1.2), validate=False)  # validate=False skips the value check (it would sync)


def test_opcheck_threshold_and_trailing_thresholds():
    hidden, weight, bias, tokens, temps, top_k, top_p = _case((5,), 13, 4, 9)
    x = (hidden @ weight.T + bias).float()
    t32, p32 = temps.float(), top_p.float()
    ops = torch.ops.rlhf_kernels
    light = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.logprobs_from_logits_threshold.default, (x, tokens, 1.0, IGN, t32, 3.0, top_k, p32),
                          test_utils=light)
    thr = ops.logprobs_from_logits_threshold(x, tokens, 1.0, IGN, t32, 3.0, top_k, p32)
    torch.library.opcheck(ops.logprobs_from_logits_fwd.default,
                          (x.clone().requires_grad_(), tokens, 1.0, IGN, True, t32, 3.0, False, thr))
    lp, ent, lse = ops.logprobs_from_logits_fwd(x, tokens, 1.0, IGN, True, t32, 3.0, False, thr)
    torch.library.opcheck(ops.logprobs_from_logits_bwd.default,
                          (torch.randn(5), torch.randn(5), x, tokens, lse, ent, 1.0, IGN, t32, 3.0, False, thr),
                          test_utils=light)


@pytest.mark.parametrize("top_k,top_p,temperature", [(7, 0.8, 0.7), (0, 0.6, 1.3), (5, 1.0, 1.0)])
def test_replays_transformers_sampler(top_k, top_p, temperature):
    """Tokens drawn by transformers' generate with its top-k / top-p / temperature processors: finite under the
    replay, and the replay's log-probs of every token equal the log-softmax of the processors' scores (−inf
    exactly where they removed a token)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    V = 61
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # spread the logits so that the cuts bite
        model.lm_head.weight.mul_(40)
    prompt = torch.randint(0, V, (3, 4))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=top_k, top_p=top_p,
                         temperature=temperature, max_new_tokens=5, min_new_tokens=5, eos_token_id=None,
                         pad_token_id=0, output_logits=True, output_scores=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1)  # [B, steps, V], before the processors
    scores = torch.stack(out.scores, 1)  # after them: removed tokens are −inf
    drawn = out.sequences[:, prompt.shape[1]:]
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    for backend in cpu_backends("logprobs_from_logits", reference=True):
        lp = rk.logprobs_from_logits(logits, drawn, backend=backend, **kw)
        assert torch.isfinite(lp).all(), backend
        torch.testing.assert_close(lp, torch.log_softmax(scores, -1).gather(-1, drawn[..., None])[..., 0])
    every = torch.arange(V).expand(*logits.shape[:2], V)  # each row's log-prob of every token
    want = torch.log_softmax(scores, -1)
    assert torch.isinf(want).any()
    for backend in [b for b in cpu_backends("logprobs_from_logits", reference=True) if b != "triton"]:
        got = rk.logprobs_from_logits(logits[..., None, :].expand(*every.shape, V), every, backend=backend, **kw)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), backend
        torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])


@pytest.mark.parametrize("backend", [b for b in cpu_backends("linear_logprobs") if b != "reference"])
def test_linear_row_blocks(backend, monkeypatch):
    """A budget of two rows per block: the forward and the backward walk several blocks and agree with one block."""
    hidden, weight, bias, tokens, temps, top_k, top_p = _case((7,), 23, 5, 4)
    monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", str(2 * 2 * 23 * 8))
    outs = []
    for budget in ("small", "default"):
        if budget == "default":
            monkeypatch.delenv("RLHF_KERNELS_CHUNK_BYTES")
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        lp, ent = rk.linear_logprobs(leaves[0], leaves[1], tokens, bias=leaves[2], temperature=temps, top_k=top_k,
                                     top_p=top_p, return_entropy=True, backend=backend)
        (torch.where(torch.isfinite(lp), lp, 0.0).sum() + ent.sum()).backward()
        outs.append([lp, ent] + [x.grad for x in leaves])
    assert torch.isinf(outs[0][0]).any()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
