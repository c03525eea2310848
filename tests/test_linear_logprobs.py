import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu

BACKENDS = cpu_backends("linear_logprobs")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (leading shape, H, V): N = 1, a 2-d and a 3-d hidden, V and H not multiples of any tile size
CASES = [((1,), 5, 37), ((3, 5), 24, 100), ((2, 3, 4), 17, 70)]


def _inputs(lead, H, V, dtype=torch.float64, bias=True, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tokens = torch.randint(0, V, lead, generator=g)
    if ignore and tokens.numel() > 1:
        tokens.view(-1)[1] = -100
        tokens.view(-1)[-1] = V - 1  # the last vocabulary entry (in the last, ragged tile)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(hidden), cast(weight), cast(b), tokens


def _grads(fn, hidden, weight, bias, seed=1):
    """(logp, entropy, d hidden, d weight, d bias) of Σ g1·logp + g2·entropy with random g1, g2."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    lp, ent = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    g1 = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.dtype)
    g2 = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.dtype)
    inputs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), inputs)
    grads = list(grads) + ([None] if bias is None else [])
    return [lp.detach(), ent.detach()] + grads


def _ours(backend, tokens, **kw):
    return lambda h, w, b: rk.linear_logprobs(h, w, tokens, bias=b, return_entropy=True, backend=backend, **kw)


def _ref(tokens, temperature=1.0, ignore_index=-100):
    return lambda h, w, b: reference.linear_logprobs(h.double(), w.double(), tokens, None if b is None else b.double(),
                                                     temperature, ignore_index, True)


def _close(got, exp, rtol, atol):
    for i, (a, b) in enumerate(zip(got, exp)):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"output {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_matches_reference_fp64(backend, case, bias, temperature):
    lead, H, V = case
    hidden, weight, b, tokens = _inputs(lead, H, V, bias=bias)
    got = _grads(_ours(backend, tokens, temperature=temperature), hidden, weight, b)
    exp = _grads(_ref(tokens, temperature), hidden, weight, b)
    assert got[0].dtype == torch.float64 and got[0].shape == tokens.shape
    # temperatures that are exact in fp32, so triton's fp32 scalars do not limit the agreement
    _close(got, exp, rtol=1e-10, atol=1e-10)
    assert (got[0][tokens == -100] == 0).all() and (got[1][tokens == -100] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_temperature_bias_ignore_index(backend):
    hidden, weight, b, tokens = _inputs((4, 9), 20, 150, dtype=torch.float32, seed=4, ignore=False)
    tokens[0, 3] = 11  # positions equal to a custom ignore_index
    got = _grads(_ours(backend, tokens, temperature=0.7, ignore_index=11), hidden, weight, b)
    exp = _grads(_ref(tokens, 0.7, 11), hidden, weight, b)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    _close(got, exp, rtol=1e-5, atol=1e-5)
    assert got[0][0, 3] == 0 and got[1][0, 3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(backend, dtype):
    hidden, weight, b, tokens = _inputs((3, 7), 32, 90, dtype=dtype, seed=5)
    got = _grads(_ours(backend, tokens, temperature=0.8), hidden, weight, b)
    exp = _grads(_ref(tokens, 0.8), hidden, weight, b)  # the same rounded inputs, in fp64
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == got[4].dtype == dtype
    # log-probs and entropy: fp32 accumulation over H = 32 terms
    _close(got[:2], exp[:2], rtol=1e-5, atol=1e-5)
    # gradients come out in the input dtype (one rounding: 2^-8 relative for bf16); the triton backend
    # also rounds d(logits) to the operand dtype before its gradient dots, as tensor-core kernels do
    _close(got[2:], exp[2:], rtol=0, atol=1.6e-2 if dtype == torch.bfloat16 else 4e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    hidden, weight, b, tokens = _inputs((3,), 4, 17, seed=6)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, b)]

    def f(h, w, bb):
        lp, ent = rk.linear_logprobs(h, w, tokens, bias=bb, temperature=0.5, return_entropy=True, backend=backend)
        return lp, ent

    # triton: one random projection (fast_mode); the sweeps compare its gradients with the reference elementwise
    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
@pytest.mark.parametrize("budget", [4096, 1 << 20, None])
def test_cpu_tiling_budgets(monkeypatch, budget):
    # 700 rows (two row tiles) and V = 300 (ragged vocabulary chunks, several parallel groups at 1 MiB)
    if budget is not None:
        monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", str(budget))
    hidden, weight, b, tokens = _inputs((700,), 8, 300, seed=7)
    got = _grads(_ours("cpu", tokens, temperature=0.5), hidden, weight, b)
    exp = _grads(_ref(tokens, 0.5), hidden, weight, b)
    _close(got, exp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [97, 127])
def test_chunk_boundaries(backend, V, monkeypatch):
    # a budget far below one [N, V] chunk: the triton interpreter's backward takes chunks of 32 columns (its
    # tile), so V = 97 leaves a last chunk of 1 column and V = 127 one of 31; the cpu plan splits rows and
    # columns in its own sizes. N = 21 leaves a ragged row tile too. Targets sit on both sides of the
    # boundaries and in the last column.
    monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", "2048")
    hidden, weight, b, tokens = _inputs((21,), 16, V, seed=25)
    tokens[:6] = torch.tensor([31, 32, 63, 64, 95, V - 1])
    got = _grads(_ours(backend, tokens, temperature=0.7), hidden, weight, b)
    exp = _grads(_ref(tokens, 0.7), hidden, weight, b)
    _close(got, exp, rtol=1e-10, atol=1e-10)


def test_chunk_budget_env_validated(monkeypatch):
    hidden, weight, b, tokens = _inputs((2,), 4, 9)
    monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match="RLHF_KERNELS_CHUNK_BYTES"):
        rk.linear_logprobs(hidden, weight, tokens, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    hidden, weight, b, tokens = _inputs((5,), 16, 40, seed=8)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, b)]
    _, ent = rk.linear_logprobs(*leaves[:2], tokens, bias=leaves[2], return_entropy=True, backend=backend)
    got = torch.autograd.grad(ent.sum(), leaves)
    _, ent_r = reference.linear_logprobs(*leaves[:2], tokens, leaves[2], 1.0, -100, True)
    exp = torch.autograd.grad(ent_r.sum(), leaves)
    _close(got, exp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient(backend, monkeypatch):
    hidden, weight, b, tokens = _inputs((6,), 16, 50, seed=9)
    h = hidden.clone().requires_grad_(True)
    if backend == "triton":
        # the weight-gradient kernel must not even be launched
        from rlhf_kernels.triton import linear_logprobs as tl_mod

        def boom(*a, **k):
            raise AssertionError("weight-gradient kernel launched for a frozen weight")
        monkeypatch.setattr(tl_mod, "_bwd_dw_kernel", boom)
    lp = rk.linear_logprobs(h, weight, tokens, backend=backend)
    lp.sum().backward()
    assert weight.grad is None
    h_r = hidden.clone().requires_grad_(True)
    reference.linear_logprobs(h_r, weight, tokens).sum().backward()
    torch.testing.assert_close(h.grad, h_r.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_hidden_trains_head_only(backend):
    hidden, weight, b, tokens = _inputs((7,), 16, 45, seed=20)
    w, bb = weight.clone().requires_grad_(True), b.clone().requires_grad_(True)
    lp, ent = rk.linear_logprobs(hidden, w, tokens, bias=bb, return_entropy=True, backend=backend)
    got = torch.autograd.grad((lp + 0.5 * ent).sum(), (w, bb))
    w_r, b_r = weight.clone().requires_grad_(True), b.clone().requires_grad_(True)
    lp_r, ent_r = reference.linear_logprobs(hidden, w_r, tokens, b_r, 1.0, -100, True)
    exp = torch.autograd.grad((lp_r + 0.5 * ent_r).sum(), (w_r, b_r))
    _close(got, exp, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_cpu_frozen_weight_skips_the_gemm():
    hidden, weight, b, tokens = _inputs((6,), 16, 50, seed=9)
    args = (hidden, weight, None, tokens)
    lp, ent, lse = torch.ops.rlhf_kernels.linear_logprobs_fwd(*args, 1.0, -100, 0)
    g = torch.ones_like(lp)

    def mm_calls(need_w):
        with torch.profiler.profile() as prof:
            out = torch.ops.rlhf_kernels.linear_logprobs_bwd(g, None, *args, lse, ent, 1.0, -100, True, need_w,
                                                             False, 0)
        return out, sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))

    (gh, gw, _), n_frozen = mm_calls(False)
    (gh2, gw2, _), n_full = mm_calls(True)
    assert gw.numel() == 0 and gw2.shape == weight.shape
    assert torch.equal(gh, gh2)
    assert n_frozen < n_full, (n_frozen, n_full)  # one vocabulary chunk here: 2 GEMMs instead of 3
    assert n_frozen * 3 == n_full * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_runs_forward_only_and_saves_nothing(backend):
    if backend == "reference":
        pytest.skip("the reference saves its [N, V] logits by design")
    hidden, weight, b, tokens = _inputs((4,), 16, 33, seed=10)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, b)]
    packed = []

    def run():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
            return rk.linear_logprobs(*leaves[:2], tokens, bias=leaves[2], backend=backend)

    with torch.no_grad():
        lp = run()
    assert lp.grad_fn is None and not lp.requires_grad and packed == []
    lp = run()  # with grad: the saved tensors are the inputs and per-row vectors only
    assert lp.grad_fn is not None and packed
    n = int((tokens != -100).sum())  # ignored rows are compacted away first: per-row tensors have n rows
    assert all(s in {hidden.shape, weight.shape, b.shape, tokens.shape, (4,), (n,), (n, 16)} for s in packed), packed


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_tokens(backend):
    hidden, weight, b, tokens = _inputs((5,), 16, 20, seed=11)
    tokens[2] = 20
    with pytest.raises(ValueError, match="tokens"):
        rk.linear_logprobs(hidden, weight, tokens, backend=backend)
    h = hidden.clone().requires_grad_(True)
    lp = rk.linear_logprobs(h, weight, tokens, validate=False, backend=backend)
    exp = reference.linear_logprobs(hidden, weight, tokens)
    assert torch.isnan(lp[2]) and torch.isnan(exp[2])
    torch.testing.assert_close(lp, exp, equal_nan=True)
    lp.nan_to_num().sum().backward()
    assert torch.isfinite(h.grad).all() and (h.grad[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_mixed_dtypes(backend):
    hidden, weight, b, tokens = _inputs((6,), 16, 40, dtype=torch.float32, seed=12)
    h_nc = hidden.T.contiguous().T  # column-major
    w_nc = weight.T.contiguous().T
    got = rk.linear_logprobs(h_nc, w_nc.to(torch.bfloat16), torch.stack([tokens, tokens], 1)[:, 0], bias=b.double(),
                             backend=backend)
    exp = reference.linear_logprobs(hidden, w_nc.to(torch.bfloat16), tokens, b.double())
    assert got.dtype == torch.float64  # a float64 bias makes the computation float64, as in the reference
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_empty_rows():
    hidden, weight, b, tokens = _inputs((0,), 8, 10)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    lp = rk.linear_logprobs(h, w, tokens, backend="cpu")
    assert lp.shape == (0,)
    lp.sum().backward()
    assert h.grad.shape == (0, 8) and (w.grad == 0).all()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_deterministic_cpu_any_thread_count(monkeypatch):
    # several parallel groups, each with its partial weight and bias gradients: their sum is where the order of
    # operations could follow the threads
    monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", str(1 << 20))
    hidden, weight, b, tokens = _inputs((700,), 32, 1000, dtype=torch.float32, seed=13)
    n = torch.get_num_threads()
    runs = []
    try:
        for threads in (n, 1, n):
            torch.set_num_threads(threads)
            runs.append(_grads(_ours("cpu", tokens, temperature=0.9), hidden, weight, b))
    finally:
        torch.set_num_threads(n)
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)


@settings(max_examples=15, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), H=st.integers(1, 12), V=st.integers(1, 90),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), bias=st.booleans(), seed=st.integers(0, 1000))
def test_property_cpu_matches_reference(lead, H, V, temperature, bias, seed):
    if "cpu" not in BACKENDS:
        pytest.skip("native extension not built")
    hidden, weight, b, tokens = _inputs(tuple(lead), H, V, bias=bias, seed=seed)
    got = _grads(_ours("cpu", tokens, temperature=temperature), hidden, weight, b)
    exp = _grads(_ref(tokens, temperature), hidden, weight, b)
    _close(got, exp, rtol=1e-9, atol=1e-9)


def test_bad_input():
    hidden, weight, b, tokens = _inputs((3,), 4, 9)
    with pytest.raises(ValueError, match="weight"):
        rk.linear_logprobs(hidden, weight[:, :3], tokens)
    with pytest.raises(ValueError, match="tokens"):
        rk.linear_logprobs(hidden, weight, tokens[:2])
    with pytest.raises(ValueError, match="bias"):
        rk.linear_logprobs(hidden, weight, tokens, bias=b[:4])
    with pytest.raises(ValueError, match="temperature"):
        rk.linear_logprobs(hidden, weight, tokens, temperature=0.0)
    with pytest.raises(TypeError, match="tokens"):
        rk.linear_logprobs(hidden, weight, tokens.double())
    with pytest.raises(TypeError, match="hidden"):
        rk.linear_logprobs(hidden.long(), weight, tokens)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_opcheck():
    hidden, weight, b, tokens = _inputs((5,), 8, 21, dtype=torch.float32, seed=14)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, b)]
    torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_fwd.default,
                          (leaves[0], leaves[1], leaves[2], tokens, 0.8, -100, 0))
    torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_fwd.default,
                          (hidden.detach().bfloat16(), weight.detach().bfloat16(), None, tokens, 1.0, -100, 4096))
    lp, ent, lse = torch.ops.rlhf_kernels.linear_logprobs_fwd(hidden.detach(), weight.detach(), b.detach(), tokens,
                                                              0.8, -100, 0)
    torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_bwd.default,
                          (torch.randn(5), torch.randn(5), hidden.detach(), weight.detach(), b.detach(), tokens, lse,
                           ent, 0.8, -100, True, False, True, 0))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
def test_opcheck_triton():
    hidden, weight, b, tokens = _inputs((3,), 8, 20, dtype=torch.float32, seed=15)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, b)]
    torch.library.opcheck(torch.ops.rlhf_kernels.linear_logprobs_fwd_triton.default,
                          (leaves[0], leaves[1], leaves[2], tokens, 0.8, -100, 1 << 20),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_compile_fullgraph():
    hidden, weight, b, tokens = _inputs((2, 5), 16, 45, dtype=torch.float32, seed=16)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, b)]

    def f(h, w, bb):
        lp, ent = rk.linear_logprobs(h, w, tokens, bias=bb, temperature=0.9, return_entropy=True, backend="cpu")
        return (lp * 2).sum() + (ent * 0.3).sum()

    out = torch.compile(f, fullgraph=True)(*leaves)
    got = torch.autograd.grad(out, leaves)
    lp_r, ent_r = reference.linear_logprobs(*leaves[:2], tokens, leaves[2], 0.9, -100, True)
    exp_out = (lp_r * 2).sum() + (ent_r * 0.3).sum()
    exp = torch.autograd.grad(exp_out, leaves)
    torch.testing.assert_close(out, exp_out, rtol=1e-5, atol=1e-5)
    for a, c in zip(got, exp):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


_MEMORY_SCRIPT = r"""
import sys, torch
import rlhf_kernels as rk
torch.set_num_threads(2)
impl = sys.argv[1]
N, H, V = 512, 32, 65536
hidden = torch.randn(N, H).requires_grad_(True)
weight = (torch.randn(V, H) * 0.1).requires_grad_(True)
tokens = torch.randint(0, V, (N,))

def step(n, v):
    h, w = hidden[:n], weight[:v]
    if impl == "naive":
        lp = torch.log_softmax(h @ w.T, -1).gather(-1, tokens[:n, None] % v).squeeze(-1)
    else:
        lp = rk.linear_logprobs(h, w, tokens[:n] % v, backend="cpu")
    g = torch.autograd.grad(lp.sum(), (h, w))
    return g

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

step(8, 64)  # warm up (lazy initialisation, thread pools)
# reset the peak-RSS mark, so a transient peak during the imports cannot hide the step's own
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
g = step(N, V)
print(status("VmHWM:") - before)
"""


def _extra_peak_rss(impl, budget):
    env = dict(os.environ, RLHF_KERNELS_CHUNK_BYTES=str(budget), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, impl], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="native extension not built")
def test_cpu_never_allocates_n_by_v():
    nv_bytes = 512 * 65536 * 4  # 128 MiB of fp32 logits
    budget = 4 << 20
    ours = _extra_peak_rss("rk", budget)
    # the weight gradient (8 MiB) + the budget + allocator slack; far below one [N, V] buffer
    assert ours < nv_bytes // 4, f"peak grew by {ours / 2**20:.1f} MiB"
    naive = _extra_peak_rss("naive", budget)
    assert naive > nv_bytes, f"the measurement missed the naive [N, V] logits ({naive / 2**20:.1f} MiB)"


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
def test_triton_never_allocates_n_by_v(monkeypatch):
    from bench.common import peak_bytes

    # N ≫ H, so that an [N, V] buffer (512 KiB) dwarfs the [V, H] copies the interpreter makes of its
    # tensor arguments; the backward's d(logits) chunk is held to a 128 KiB budget (4 chunks)
    monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", str(128 << 10))
    N, H, V = 256, 16, 512
    hidden, weight, b, tokens = _inputs((N,), H, V, dtype=torch.float32, seed=17, ignore=False)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, b)]

    def step():
        lp = rk.linear_logprobs(leaves[0], leaves[1], tokens, bias=leaves[2], backend="triton")
        torch.autograd.grad(lp.sum(), leaves)

    nv_bytes = N * V * 4
    ours = peak_bytes(step)
    # gradients, fp32 accumulators and the interpreter's argument copies (about 6 of each [V, H] and
    # [N, H] tensor: 0.28 MiB here); one [N, V] buffer alone would reach nv_bytes
    assert ours < nv_bytes, ours

    def naive():
        lp = reference.linear_logprobs(leaves[0], leaves[1], tokens, leaves[2])
        torch.autograd.grad(lp.sum(), leaves)
    assert peak_bytes(naive) > nv_bytes  # the measurement sees an [N, V] buffer when there is one


needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")


def _plans(N, H, V, hdt=torch.float32, wdt=None, arch=None, bias=True, budget=256 << 20, device="cpu", made=None,
           **kw):
    """(forward plan, backward plan) for tensors of these shapes (meta tensors for a GPU arch); the tensors
    made here are appended to `made`."""
    from rlhf_kernels.triton import linear_logprobs as tl_mod

    wdt = wdt or hdt
    acc = torch.float64 if torch.float64 in (hdt, wdt) else torch.float32
    h, w = torch.empty(N, H, dtype=hdt, device=device), torch.empty(V, H, dtype=wdt, device=device)
    b = torch.empty(V, dtype=acc, device=device) if bias else None
    t = torch.zeros(N, dtype=torch.int64, device=device)
    lp, ent, lse = (torch.empty(N, dtype=acc, device=device) for _ in range(3))
    fwd = tl_mod.plan_fwd(h, w, b, t, lp, ent, lse, arch=arch, **kw)
    gh, gw, gb = torch.empty_like(h), torch.empty_like(w), torch.empty_like(b) if bias else None
    bwd = tl_mod.plan_bwd(lp, ent, h, w, b, t, lse, ent, gh, gw, gb, budget=budget, arch=arch, **kw)
    if made is not None:
        made += [h, w, b, t, lp, ent, lse, gh, gw, gb]
    return fwd, bwd


@needs_triton
def test_triton_forward_merges_vocabulary_splits():
    from rlhf_kernels.triton import linear_logprobs as tl_mod

    hidden, weight, b, tokens = _inputs((3,), 17, 100, seed=21)
    b[:32] = -5e3  # a whole split far below the rest: its partial state scales to 0 in the merge
    fwd, _ = _plans(3, 17, 100, torch.float64)
    assert fwd[0].kernel is tl_mod._fwd_kernel and fwd[0].grid[1] == 4  # four splits, then the merge
    got = _grads(_ours("triton", tokens, temperature=0.5), hidden, weight, b)
    exp = _grads(_ref(tokens, 0.5), hidden, weight, b)
    _close(got, exp, rtol=1e-10, atol=1e-10)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_padding_rows_with_huge_bias_stay_finite(dtype):
    # 21 rows: the second row tile (16 rows under the interpreter) has 11 rows past N, whose zero hidden
    # rows give logits b / T = 100 / 0.05 = 2000: exp overflows even in fp64 if they are not zeroed first
    hidden, weight, b, tokens = _inputs((21,), 16, 40, dtype=dtype, seed=22)
    b[7] = 100.0
    got = _grads(_ours("triton", tokens, temperature=0.05), hidden, weight, b)
    exp = _grads(_ref(tokens, 0.05), hidden, weight, b)
    for g in got:
        assert torch.isfinite(g).all()
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    _close(got, exp, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype,wdtype", [(torch.float64, None), (torch.bfloat16, torch.float32)])
def test_triton_backward_in_vocabulary_chunks(monkeypatch, dtype, wdtype):
    # a 2 KiB budget: d(logits) in chunks of 32 columns; a bf16 hidden with an fp32 weight also takes the
    # fp32 d(hidden) accumulator and the on-chip conversion of mixed dtypes
    hidden, weight, b, tokens = _inputs((21,), 16, 100, dtype=dtype, seed=23)
    weight = weight.to(wdtype or dtype)
    _, bwd = _plans(21, 16, 100, dtype, wdtype, budget=2048)
    assert sum(launch.kernel.__name__ == "_bwd_dh_kernel" for launch in bwd) == 4
    monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", "2048")
    got = _grads(_ours("triton", tokens, temperature=0.8), hidden, weight, b)
    exp = _grads(_ref(tokens, 0.8), hidden, weight, b)
    assert [g.dtype for g in got[2:]] == [hidden.dtype, weight.dtype, b.dtype]
    if dtype == torch.float64:
        _close(got, exp, rtol=1e-10, atol=1e-10)
    else:
        _close(got[:2], exp[:2], rtol=1e-5, atol=1e-5)
        _close(got[2:], exp[2:], rtol=0, atol=1.6e-2)
    # bitwise deterministic, the weight gradient included
    again = _grads(_ours("triton", tokens, temperature=0.8), hidden, weight, b)
    for x, y in zip(got, again):
        assert torch.equal(x, y)


@needs_triton
def test_triton_launches_under_the_inputs_device_guard(monkeypatch):
    import contextlib

    from rlhf_kernels.triton import _launch

    seen = []

    def spy(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()
    monkeypatch.setattr(_launch, "device_guard", spy)
    hidden, weight, b, tokens = _inputs((5,), 8, 20, seed=24)
    h = hidden.requires_grad_(True)
    rk.linear_logprobs(h, weight, tokens, bias=b, backend="triton").sum().backward()
    assert seen == [hidden.device, hidden.device]  # the forward's plan, then the backward's
    # on a GPU the guard is torch.cuda.device of the inputs' device (constructing it needs no GPU)
    monkeypatch.undo()
    g = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1


@needs_triton
@pytest.mark.parametrize("arch", [None, 80, 86, 89, 90])
@pytest.mark.parametrize("hdt,wdt,dot", [(torch.bfloat16, None, torch.bfloat16), (torch.float16, None, torch.float16),
                                         (torch.float32, None, torch.float32),
                                         (torch.float32, torch.bfloat16, torch.float32),
                                         (torch.float64, None, torch.float64)])
def test_triton_plans_use_listed_configs(arch, hdt, wdt, dot):
    from rlhf_kernels.triton import linear_logprobs as tl_mod
    from rlhf_kernels.triton._launch import uses

    listed = tl_mod.configs(dot, arch)
    device = "cpu" if arch is None else "meta"
    reached = set()
    for N, H, V in [(1, 64, 1000), (300, 4096, 128256)] if arch else [(1, 16, 40), (37, 16, 100)]:
        for tf32 in (False, True):
            fwd, bwd = _plans(N, H, V, hdt, wdt, arch=arch, device=device, allow_tf32=tf32)
            for launch in fwd + bwd:
                hits = [i for i, c in enumerate(listed) if uses(launch, c)]
                assert hits, (launch.kernel.fn.__name__, launch.constexprs)
                reached.update(hits)
    assert reached == set(range(len(listed)))  # and every listed config is reachable (the GPU report compiles each)


@needs_triton
def test_triton_fp32_precision_follows_torch_tf32_flag():
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag, prec in [(False, "ieee"), (True, "tf32")]:
            torch.backends.cuda.matmul.allow_tf32 = flag
            fwd, bwd = _plans(20, 64, 1000, torch.float32, arch=90, device="meta")
            assert {launch.constexprs["DOT_PREC"] for launch in fwd[:1] + bwd} == {prec}
            fwd, bwd = _plans(20, 64, 1000, torch.bfloat16, arch=90, device="meta")
            assert {launch.constexprs["DOT_PREC"] for launch in fwd[:1] + bwd} == {"ieee"}  # no TF32 for bf16
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@needs_triton
def test_triton_split_and_chunk_sizes():
    from rlhf_kernels.triton import linear_logprobs as tl_mod

    # N = 2048 on an H100: 32 row tiles of 64, so about two waves of 132 SMs need 9 vocabulary splits
    splits, per = tl_mod.forward_splits(2048, 128256, 64, 128, 90)
    assert (splits, per) == (9, 112) and 32 * splits >= 2 * 132 and (splits - 1) * per < 1002 <= splits * per
    assert tl_mod.forward_splits(1 << 20, 128256, 128, 128, 90)[0] == 1
    # the headline backward: N = 16384, H = 4096, bf16, 256 MiB: the fp32 accumulator fills the budget,
    # so the chunk takes its floor of MIN_CHUNK columns
    N, H, V = 16384, 4096, 128256
    assert tl_mod.chunk_columns(N, V, H, 2, 4, 256 << 20, 128, tl_mod.MIN_CHUNK) == tl_mod.MIN_CHUNK
    # N = 2048: 2048·C·2 + 2048·4096·4 bytes ≤ 256 MiB → C = 57344 (a multiple of 128), 3 chunks
    assert tl_mod.chunk_columns(2048, V, H, 2, 4, 256 << 20, 128, tl_mod.MIN_CHUNK) == 57344
    assert tl_mod.chunk_columns(16, V, H, 2, 4, 256 << 20, 128, tl_mod.MIN_CHUNK) == 128256  # one chunk


@needs_triton
@pytest.mark.parametrize("N,hdt,expected", [
    (2048, torch.bfloat16, 2048 * 57344 * 2 + 2048 * 4096 * 4),  # d(logits) chunk + fp32 d(hidden) accumulator
    (2048, torch.float32, 2048 * 32768 * 4),  # fp32 hidden: d(hidden) accumulates in place; C = 32768
    (16384, torch.bfloat16, 16384 * 4096 * 2 + 16384 * 4096 * 4),  # over budget: the MIN_CHUNK floor
    (16, torch.bfloat16, 16 * 128256 * 2)])  # one chunk: no accumulator
def test_triton_backward_extra_memory_formula(N, hdt, expected):
    # the temporaries a backward plan allocates are the module docstring's formula, within the budget but
    # where the MIN_CHUNK floor says otherwise
    H, V = 4096, 128256
    made = []
    _, bwd = _plans(N, H, V, hdt, arch=90, device="meta", bias=False, made=made)
    given = {id(a) for a in made}
    scratch = {id(a): a for launch in bwd for a in launch.args if isinstance(a, torch.Tensor) and id(a) not in given}
    assert sum(a.numel() * a.element_size() for a in scratch.values()) == expected
    assert expected <= 256 << 20 or N * (4096 * 2 + H * 4) > 256 << 20


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(backend, dtype):
    hidden, weight, b, tokens = (t.cuda() for t in _inputs((4, 33), 64, 1000, dtype=dtype, seed=18))
    got = _grads(_ours(backend, tokens, temperature=0.7), hidden, weight, b)
    exp = _grads(_ref(tokens, 0.7), hidden, weight, b)
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    _close(got[:2], exp[:2], rtol=1e-4, atol=1e-4)
    _close(got[2:], exp[2:], rtol=0, atol=atol)


@needs_gpu
def test_gpu_frozen_weight_and_determinism():
    hidden, weight, b, tokens = (t.cuda() for t in _inputs((300,), 64, 5000, dtype=torch.float32, seed=19))
    for backend in ("cuda", "triton"):
        a = _grads(_ours(backend, tokens), hidden, weight, b)
        c = _grads(_ours(backend, tokens), hidden, weight, b)
        for x, y in zip(a, c):
            assert torch.equal(x, y)
        h = hidden.clone().requires_grad_(True)
        rk.linear_logprobs(h, weight, tokens, backend=backend).sum().backward()
        assert weight.grad is None and h.grad is not None
