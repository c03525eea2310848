"""batch_invariant=True on rk.linear_logprobs and rk.logprobs_from_logits: a row's log-prob, entropy and row of the
hidden (logits) gradient are bitwise the same whatever else is in the batch (its position, the batch size, the
other rows' contents, ignored rows), on every backend; values still match the float64 reference."""
import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu

IGN = -100
CAP = 6.0

# (V, H, batch sizes) per backend: V crosses the cpu backend's 1024-entry vocabulary chunks, the sizes cross its
# 64-row tiles and the default mode's 512-row tiles; the interpreter (triton) gets a few 16-row tiles
SHAPES = {"reference": (37, 8, (1, 3, 6)), "cpu": (2500, 40, (1, 7, 70, 600)), "triton": (100, 24, (1, 5, 37)),
          "cuda": (5000, 72, (1, 7, 300, 1500))}


def _backends(op, reference_too=True):
    return cpu_backends(op, reference=reference_too) + [pytest.param("cuda", marks=needs_gpu)]


class Probe:
    """K probe rows (hidden or logits rows, tokens, temperatures, the upstream gradients of logp and entropy and,
    with replay, per-row top_k / top_p) that are placed into batches of other random rows."""

    def __init__(self, op, V, H, dtype, device, K=3, seed=0, replay=False):
        g = torch.Generator().manual_seed(seed)
        self.op, self.V, self.H, self.dtype, self.device, self.g = op, V, H, dtype, device, g
        self.replay = replay
        self.weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(device, dtype)
        self.bias = torch.randn(V, generator=g).to(device)
        self.data = self._rows(K)

    def _rows(self, n):
        g = self.g
        width = self.H if self.op == "linear_logprobs" else self.V
        rows = (torch.randn(n, width, generator=g) * (1 if self.op == "linear_logprobs" else 3)).to(self.device,
                                                                                                     self.dtype)
        tok = torch.randint(0, self.V, (n,), generator=g).to(self.device)
        temp = (0.5 + torch.rand(n, generator=g)).to(self.device)
        g1, g2 = (torch.randn(n, generator=g).to(self.device) for _ in range(2))
        k = p = None
        if self.replay:  # top_k 0 (off) … 8, top_p in [0.5, 1]; the token one of the row's two largest logits,
            # so that most are kept and some (the second largest under top_k = 1 or a small top_p) are cut
            k = torch.randint(0, 9, (n,), generator=g).to(self.device)
            p = (0.5 + 0.5 * torch.rand(n, generator=g)).to(self.device)
            z = rows.double()
            if self.op == "linear_logprobs":
                z = z @ self.weight.double().T + self.bias.double()
            top2 = z.topk(2, dim=-1).indices
            tok = top2.gather(1, torch.randint(0, 2, (n, 1), generator=g).to(self.device))[:, 0]
        return [rows, tok, temp, g1, g2, k, p]

    def batch(self, n, at, ignored=0):
        """A batch of n random rows with the probes at positions `at`, and `ignored` random rows whose token is
        ignore_index (padding) in front."""
        data = self._rows(n + ignored)
        data[1][:ignored] = IGN
        at = [a + ignored for a in at]
        for k, a in enumerate(at):
            for t, probe in zip(data, self.data):
                if t is not None:
                    t[a] = probe[k]
        return data, at

    def run(self, backend, data, invariant=True):
        """(logp, entropy, d rows) of a batch, d rows the gradient of Σ g1·logp + g2·entropy over the kept tokens."""
        rows, tok, temp, g1, g2, k, p = data
        x = rows.clone().requires_grad_()
        kw = dict(temperature=temp, softcap=CAP, return_entropy=True, backend=backend, batch_invariant=invariant,
                  top_k=k, top_p=p)
        if self.op == "linear_logprobs":
            lp, ent = rk.linear_logprobs(x, self.weight, tok, bias=self.bias, **kw)
        else:
            lp, ent = rk.logprobs_from_logits(x, tok, **kw)
        (lp.masked_fill(lp == float("-inf"), 0) * g1.to(lp.dtype) + ent * g2.to(ent.dtype)).sum().backward()
        return lp.detach(), ent.detach(), x.grad

    def expected(self, data):
        """float64 reference of a batch."""
        rows, tok, temp, g1, g2, k, p = data
        x = rows.double().requires_grad_()
        if self.op == "linear_logprobs":
            lp, ent = reference.linear_logprobs(x, self.weight.double(), tok, self.bias.double(), temp.double(), IGN,
                                                True, CAP, k, p)
        else:
            lp, ent = reference.logprobs_from_logits(x, tok, temp.double(), IGN, True, CAP, k, p)
        (lp.masked_fill(lp == float("-inf"), 0) * g1.double() + ent * g2.double()).sum().backward()
        return lp.detach(), ent.detach(), x.grad


def _placements(sizes, K):
    """(batch size, positions of the K probes): all K together, then per size the last positions and scattered
    ones (the first ones in a small batch)."""
    out = [(K, list(range(K)))]
    for n in sizes:
        if n >= K:
            out.append((n, [n - 1 - k for k in range(K)]))
            out.append((n, [(k * 7919 + n // 2) % n for k in range(K)] if n >= 7 * K else list(range(K))))
    return out


def _check(op, backend, dtype, sizes=None, device="cpu", paddings=(0, 3), shape=None, replay=False):
    V, H, default_sizes = SHAPES[backend]
    V, H = shape or (V, H)
    sizes = sizes or default_sizes
    p = Probe(op, V, H, dtype, device, replay=replay)
    K = p.data[0].shape[0]
    alone = [p.run(backend, _single(p, k)) for k in range(K)]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for i, (n, at) in enumerate(_placements(sizes, K)):
        ignored = paddings[i % len(paddings)]
        data, pos = p.batch(n, at, ignored)
        got = p.run(backend, data)
        for k, a in enumerate(pos):
            for name, x, y in zip(("logp", "entropy", "d rows"), alone[k], got):
                assert torch.equal(x[0], y[a]), (name, n, a, ignored, k)
        if i == 1:  # the values: the float64 reference of the same batch
            exp = p.expected(data)
            for x, y in zip(got, exp):
                torch.testing.assert_close(x.double(), y, **tol)


def _single(p, k):
    return [None if t is None else t[k:k + 1] for t in p.data]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", _backends("linear_logprobs"))
def test_linear_logprobs_rows_do_not_depend_on_the_batch(backend, dtype):
    device = "cuda" if backend == "cuda" else "cpu"
    _check("linear_logprobs", backend, dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", _backends("linear_logprobs"))
def test_linear_logprobs_replay_rows_do_not_depend_on_the_batch(backend, dtype):
    """The sampler replay (per-row top_k and top_p) with batch_invariant: its row blocks' products run in the
    fixed-order GEMMs, so a row's bits, kept set included, do not follow the block it lands in."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("interpreter time: fp64 runs the same triton kernels as fp32 with another IS_FP64")
    device = "cuda" if backend == "cuda" else "cpu"
    _check("linear_logprobs", backend, dtype, device=device, replay=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", _backends("logprobs_from_logits"))
def test_logprobs_from_logits_rows_do_not_depend_on_the_batch(backend, dtype):
    device = "cuda" if backend == "cuda" else "cpu"
    _check("logprobs_from_logits", backend, dtype, device=device)


@pytest.mark.parametrize("backend", _backends("linear_logprobs", reference_too=False))
def test_linear_logprobs_large_batch(backend):
    """One batch of thousands of rows (CPU: 4096; the same rows alone give the same bits)."""
    if backend == "triton":
        pytest.skip("the interpreter is too slow for thousands of rows; the triton shapes above cross its tiles")
    _check("linear_logprobs", backend, torch.float32, sizes=(4096,), device="cuda" if backend == "cuda" else "cpu",
           paddings=(3,), shape=(1100, 16))


@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("backend", cpu_backends("linear_logprobs"))
def test_default_mode_is_not_batch_invariant(backend, replay):
    """Why the flag exists: the default cpu plan sizes its tiles by the row count (and picks BLAS GEMMs by
    shape), the default triton forward splits the vocabulary more when there are few row tiles, and the replay's
    row blocks are BLAS GEMMs on any backend here, so a row's bits change with the batch. Were it not so, the
    tests above would prove nothing about the flag."""
    if replay and backend == "triton":
        pytest.skip("the default replay's row blocks are the same torch GEMMs as on cpu (shown there)")
    V, H, n = {"cpu": (5000, 64, 600), "triton": (300, 24, 70)}[backend]
    p = Probe("linear_logprobs", V, H, torch.float32, "cpu", K=4, replay=replay)
    data, pos = p.batch(n, [n // 4 * k + 3 for k in range(4)])

    def same(invariant):  # each probe alone (a GEMM of one row) and in the batch
        got = p.run(backend, data, invariant=invariant)
        return all(torch.equal(x[0], y[a]) for k, a in enumerate(pos)
                   for x, y in zip(p.run(backend, _single(p, k), invariant=invariant), got))
    assert not same(False)
    assert same(True)


def _kept(lp):
    return lp.masked_fill(lp == float("-inf"), 0)


@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("backend", _backends("linear_logprobs"))
def test_linear_logprobs_weight_gradient_is_deterministic(backend, replay):
    device = "cuda" if backend == "cuda" else "cpu"
    V, H, sizes = SHAPES[backend]
    p = Probe("linear_logprobs", V, H, torch.float32, device, replay=replay)
    data, _ = p.batch(sizes[-1], [0], ignored=2)
    rows, tok, temp, g1, g2, k, top_p = data

    def grads():
        w = p.weight.clone().requires_grad_()
        b = p.bias.clone().requires_grad_()
        lp, ent = rk.linear_logprobs(rows, w, tok, bias=b, temperature=temp, softcap=CAP, return_entropy=True,
                                     backend=backend, batch_invariant=True, top_k=k, top_p=top_p)
        (_kept(lp) * g1 + ent * g2).sum().backward()
        return w.grad, b.grad

    (w1, b1), (w2, b2) = grads(), grads()
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    exp_w = reference.linear_logprobs  # the values: float64 reference
    w = p.weight.double().requires_grad_()
    b = p.bias.double().requires_grad_()
    lp, ent = exp_w(rows.double(), w, tok, b, temp.double(), IGN, True, CAP, k, top_p)
    (_kept(lp) * g1.double() + ent * g2.double()).sum().backward()
    torch.testing.assert_close(w1.double(), w.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b1.double(), b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("backend", _backends("linear_logprobs"))
def test_linear_logprobs_gradcheck_batch_invariant(backend, replay):
    device = "cuda" if backend == "cuda" else "cpu"
    g = torch.Generator().manual_seed(3)
    N, V, H = 3, 11, 4  # the vocabulary chunks are crossed in the tests above (against the float64 reference)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(device).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(device).requires_grad_()
    # with replay, each token is its row's largest logit (kept whatever top_k / top_p cut)
    tok = (h @ w.T + b).argmax(-1).detach() if replay else torch.randint(0, V, (N,), generator=g).to(device)
    tok[1] = IGN
    temp = (0.5 + torch.rand(N, generator=g, dtype=torch.float64)).to(device)
    top = dict(top_k=torch.tensor([3, 5, 0], device=device), top_p=0.8) if replay else {}

    def f(h, w, b):
        return rk.linear_logprobs(h, w, tok, bias=b, temperature=temp, softcap=3.0, return_entropy=True,
                                  backend=backend, batch_invariant=True, **top)
    if backend == "triton":  # the interpreter is slow: the weight's gradient is checked against the reference above
        args = (h,) if replay else (h, b)  # (and the replay's bias gradient is the weight's, summed)
        assert torch.autograd.gradcheck(lambda h, b=b: f(h, w.detach(), b), args, eps=1e-6, atol=1e-6)
    else:
        assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", _backends("logprobs_from_logits"))
def test_logprobs_from_logits_gradcheck_batch_invariant(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    g = torch.Generator().manual_seed(4)
    N, V = 3, 11
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(device).requires_grad_()
    tok = torch.randint(0, V, (N,), generator=g).to(device)
    tok[2] = IGN
    temp = (0.5 + torch.rand(N, generator=g, dtype=torch.float64)).to(device)

    def f(x):
        return rk.logprobs_from_logits(x, tok, temperature=temp, softcap=3.0, return_entropy=True, backend=backend,
                                       batch_invariant=True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_batch_invariant_must_be_a_bool():
    h, w, tok = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        rk.linear_logprobs(h, w, tok, batch_invariant=1)
    with pytest.raises(TypeError, match="batch_invariant must be a bool"):
        rk.logprobs_from_logits(torch.randn(2, 5), tok, batch_invariant=None)


def test_batch_invariant_with_a_vocabulary_shard_is_refused():
    # the vocabulary-parallel head combines the shards' partials outside the kernels: not batch-invariant yet
    h, w, tok = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="batch_invariant does not compose with process_group"):
        rk.linear_logprobs(h, w, tok, batch_invariant=True, vocab_offset=0)
    with pytest.raises(ValueError, match="batch_invariant does not compose with process_group"):
        rk.logprobs_from_logits(torch.randn(2, 5), tok, batch_invariant=True, vocab_offset=0)


@pytest.mark.parametrize("backend", _backends("logprobs_from_logits"))
def test_logprobs_from_logits_replay_is_batch_invariant(backend):
    # the sampler replay's threshold is found row by row, so top_k/top_p compose with batch_invariant here
    V = SHAPES[backend][0]
    g = torch.Generator().manual_seed(3)
    dev = "cuda" if backend == "cuda" else "cpu"

    def rows(n):
        x = torch.randn(n, V, generator=g) * 3
        return (x.to(dev), x.argmax(-1).to(dev), torch.randint(0, 9, (n,), generator=g).to(dev),
                (0.5 + 0.5 * torch.rand(n, generator=g)).to(dev), torch.randn(n, generator=g).to(dev))

    def run(x, tok, k, p, g1):
        x = x.clone().requires_grad_()
        lp, ent = rk.logprobs_from_logits(x, tok, top_k=k, top_p=p, softcap=CAP, return_entropy=True,
                                          backend=backend, batch_invariant=True)
        (lp * g1 + ent).sum().backward()
        return lp.detach(), ent.detach(), x.grad

    probe = rows(2)
    alone = [run(*(t[i:i + 1] for t in probe)) for i in range(2)]
    batch = rows(37)
    at = (5, 30)
    for i, a in enumerate(at):
        for t, src in zip(batch, probe):
            t[a] = src[i]
    got = run(*batch)
    for i, a in enumerate(at):
        for x, y in zip(alone[i], got):
            assert torch.equal(x[0], y[a])
    assert torch.isfinite(got[0][list(at)]).all()  # each probe's token is its row's argmax: always kept


def test_replay_with_a_shard_is_refused():
    h, w, tok = torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="top_k/top_p does not compose with process_group"):
        rk.linear_logprobs(h, w, tok, top_p=0.9, vocab_offset=0)
    with pytest.raises(ValueError, match="top_k/top_p does not compose with process_group"):
        rk.logprobs_from_logits(torch.randn(2, 5), tok, top_k=3, vocab_offset=0)
