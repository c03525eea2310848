import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu, ragged_masks

BACKENDS = cpu_backends("logprobs_from_logits")
HAVE_CPU = "cpu" in BACKENDS
LEADING = [(1,), (257,), (3, 1), (2, 3, 5)]


def _inputs(lead, V, dtype=torch.float64, seed=0, ignore_index=-100, ignore_frac=0.25, scale=3.0):
    """Fresh logits (never zeros, a wide spread) and token ids with some positions ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    tokens = torch.randint(0, V, lead, generator=g)
    drop = torch.rand(lead, generator=g) < ignore_frac
    tokens[drop] = ignore_index
    return logits, tokens


def _fp64_tol(backend):
    # the interpreter computes in fp64 with 1/T as an fp64 scalar: it agrees with the reference to ~1e-15
    # (the worst of these sweeps, V = 50257, to ~1e-14); on a GPU the compiled kernel gets 1/T as fp32 (the GPU
    # tests allow for it)
    return dict(rtol=1e-12, atol=1e-12) if backend == "triton" else dict(rtol=1e-10, atol=1e-10)


def _value_and_grads(fn, logits, g_lp, g_ent):
    """Forward outputs and d(Σ g_lp·logp + Σ g_ent·entropy)/d logits."""
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = fn(x)
    grad, = torch.autograd.grad((lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum(), x)
    return lp.detach(), ent.detach(), grad


def _ref(logits, tokens, temperature=1.0, ignore_index=-100):
    return lambda x: reference.logprobs_from_logits(x, tokens, temperature, ignore_index, True)


def _rk(backend, tokens, temperature=1.0, ignore_index=-100, validate=True):
    return lambda x: rk.logprobs_from_logits(x, tokens, temperature=temperature, ignore_index=ignore_index,
                                             return_entropy=True, validate=validate, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("V", [1, 3, 1271])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_fp64(backend, lead, V, temperature):
    if backend == "triton" and lead == (257,):
        # the interpreter runs one program per row, each alike: 17 rows cover the kernel's row paths (257 is for
        # the CPU's split of rows over threads) at a fifteenth of the cost
        lead = (17,)
    logits, tokens = _inputs(lead, V, seed=V + len(lead))
    g = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(lead, generator=g, dtype=torch.float64), torch.randn(lead, generator=g,
                                                                                   dtype=torch.float64)
    lp, ent, grad = _value_and_grads(_rk(backend, tokens, temperature), logits, g_lp, g_ent)
    elp, eent, egrad = _value_and_grads(_ref(logits, tokens, temperature), logits, g_lp, g_ent)
    assert lp.dtype == torch.float64 and lp.shape == tokens.shape and ent.shape == tokens.shape
    tol = _fp64_tol(backend)
    torch.testing.assert_close(lp, elp, **tol)
    torch.testing.assert_close(ent, eent, **tol)
    torch.testing.assert_close(grad, egrad, **tol)
    ignored = tokens == -100
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0) and torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab(backend):
    # 50257 (GPT-2) is not a multiple of any tile size; a few rows, one of them ignored
    logits, tokens = _inputs((3,), 50257, seed=7, ignore_frac=0.0, scale=4.0)
    tokens[1] = -100
    g_lp, g_ent = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64), torch.tensor([0.3, 1.0, 2.0],
                                                                                    dtype=torch.float64)
    lp, ent, grad = _value_and_grads(_rk(backend, tokens, 0.9), logits, g_lp, g_ent)
    elp, eent, egrad = _value_and_grads(_ref(logits, tokens, 0.9), logits, g_lp, g_ent)
    tol = _fp64_tol(backend)
    torch.testing.assert_close(lp, elp, **tol)
    torch.testing.assert_close(ent, eent, **tol)
    torch.testing.assert_close(grad, egrad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [3, 1271, 50257])
def test_low_precision_inputs_compute_in_fp32(backend, dtype, V):
    lead = (2,) if V == 50257 else (4, 9)
    logits, tokens = _inputs(lead, V, dtype=dtype, seed=11)
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(lead, generator=g), torch.randn(lead, generator=g)
    lp, ent, grad = _value_and_grads(_rk(backend, tokens, 0.8), logits, g_lp, g_ent)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and grad.dtype == dtype
    # the exact answer for the very same (rounded) input values
    x64 = logits.double()
    elp, eent, egrad = _value_and_grads(_ref(x64, tokens, 0.8), x64, g_lp.double(), g_ent.double())
    # fp32 accumulation over V terms: a few ulp of the log-sum-exp (|lse| ≲ 15 here)
    torch.testing.assert_close(lp, elp.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent, eent.float(), rtol=1e-5, atol=2e-5)
    # the gradient is rounded once to the logits dtype: half an ulp of that dtype, plus fp32 error
    eps = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    torch.testing.assert_close(grad.double(), egrad, rtol=eps, atol=1e-6)
    # without the entropy: the old/ref log-prob hot path, a code path of its own (values and gradient)
    x = logits.clone().requires_grad_(True)
    lp_only = rk.logprobs_from_logits(x, tokens, temperature=0.8, backend=backend)
    grad_only, = torch.autograd.grad((lp_only * g_lp).sum(), x)
    x64 = x64.clone().requires_grad_(True)
    egrad_only, = torch.autograd.grad((reference.logprobs_from_logits(x64, tokens, 0.8) * g_lp.double()).sum(), x64)
    assert lp_only.dtype == torch.float32
    torch.testing.assert_close(lp_only.detach(), elp.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad_only.double(), egrad_only, rtol=eps, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_through_logp_and_entropy(backend):
    logits, tokens = _inputs((3, 4), 7, seed=5)
    tokens[0, 1] = -100
    x = logits.requires_grad_(True)

    def f(x):
        lp, ent = rk.logprobs_from_logits(x, tokens, temperature=1.3, return_entropy=True, backend=backend)
        return lp, ent

    # the Jacobian of both outputs at once (Triton's temperature is an fp32 scalar, the same in both passes);
    # one output alone is test_gradient_through_one_output_only
    # triton: one random projection (fast_mode); the sweeps compare its gradients with the reference elementwise
    assert torch.autograd.gradcheck(f, (x,), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_one_output_only(backend):
    logits, tokens = _inputs((5,), 33, seed=9)
    for pick in (0, 1):
        x = logits.clone().requires_grad_(True)
        out = rk.logprobs_from_logits(x, tokens, return_entropy=True, backend=backend)[pick]
        out.sum().backward()
        xr = logits.clone().requires_grad_(True)
        reference.logprobs_from_logits(xr, tokens, 1.0, -100, True)[pick].sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, **_fp64_tol(backend))
    # without return_entropy, the single output
    x = logits.clone().requires_grad_(True)
    rk.logprobs_from_logits(x, tokens, backend=backend).sum().backward()
    xr = logits.clone().requires_grad_(True)
    reference.logprobs_from_logits(xr, tokens).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **_fp64_tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    logits, tokens = _inputs((6,), 10, seed=3, ignore_frac=0.0)
    tokens[2] = 4  # ignore_index=4 is also a valid id: it is ignored all the same
    lp, ent = rk.logprobs_from_logits(logits, tokens, ignore_index=4, return_entropy=True, backend=backend)
    elp, eent = reference.logprobs_from_logits(logits, tokens, 1.0, 4, True)
    torch.testing.assert_close(lp, elp, **_fp64_tol(backend))
    torch.testing.assert_close(ent, eent, **_fp64_tol(backend))
    assert lp[tokens == 4].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["shifted", "leading-transposed", "vocab-strided"])
def test_non_contiguous(backend, layout):
    g = torch.Generator().manual_seed(4)
    B, T, V = 3, 6, 37
    if layout == "shifted":  # logits[:, :-1] of a [B, T, V] tensor: leading dims that do not merge
        full = torch.randn(B, T, V, generator=g, dtype=torch.float64)
        logits = full[:, :-1]
    elif layout == "leading-transposed":
        logits = torch.randn(T, B, V, generator=g, dtype=torch.float64).transpose(0, 1)
    else:  # the vocabulary dim itself is strided: the op makes a contiguous copy
        logits = torch.randn(V, B, generator=g, dtype=torch.float64).T
    tokens = torch.randint(0, V, logits.shape[:-1], generator=g)
    tokens.view(-1)[::4] = -100
    w = torch.randn(logits.shape[:-1], generator=g, dtype=torch.float64)
    lp, ent, grad = _value_and_grads(_rk(backend, tokens, 0.6), logits, w, w.flip(-1))
    elp, eent, egrad = _value_and_grads(_ref(logits, tokens, 0.6), logits.contiguous(), w, w.flip(-1))
    tol = _fp64_tol(backend)
    torch.testing.assert_close(lp, elp, **tol)
    torch.testing.assert_close(ent, eent, **tol)
    torch.testing.assert_close(grad, egrad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_tokens(backend):
    logits, tokens = _inputs((4,), 9, seed=6)
    a = rk.logprobs_from_logits(logits, tokens.int(), backend=backend)
    b = rk.logprobs_from_logits(logits, tokens, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_tokens_without_validation_give_nan(backend):
    V = 11
    logits, tokens = _inputs((6,), V, seed=8, ignore_frac=0.0)
    tokens[1], tokens[3], tokens[4] = V, -7, 2 ** 40  # far outside: any read there would crash or give garbage
    tokens[5] = -100
    with pytest.raises(ValueError, match="tokens"):
        rk.logprobs_from_logits(logits, tokens, backend=backend)
    x = logits.clone().requires_grad_(True)
    lp, ent = rk.logprobs_from_logits(x, tokens, return_entropy=True, validate=False, backend=backend)
    bad = torch.zeros(6, dtype=torch.bool)
    bad[[1, 3, 4]] = True
    assert torch.isnan(lp[bad]).all() and torch.isfinite(lp[~bad]).all()
    assert torch.isfinite(ent).all()
    # Decision: an out-of-range position's logp is a NaN constant, so no gradient flows through it (as in the
    # reference); its entropy is that of a valid row and keeps its gradient. The gradient is never NaN.
    (lp.nan_to_num(0.0).sum() + ent.sum()).backward()
    xr = logits.clone().requires_grad_(True)
    elp, eent = reference.logprobs_from_logits(xr, tokens, 1.0, -100, True)
    (elp.nan_to_num(0.0).sum() + eent.sum()).backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, xr.grad, **_fp64_tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_offsets_beyond_int32(backend):
    # Row 1 starts 2^31 + 5 elements past row 0: a 32-bit offset would wrap. The storage is reserved but only
    # the two rows are ever touched, so this needs a few KB of real memory.
    V, gap = 1271, 2 ** 31 + 5
    big = torch.empty(gap + V, dtype=torch.float32)
    logits = big.as_strided((2, V), (gap, 1))
    g = torch.Generator().manual_seed(12)
    logits.copy_(torch.randn(2, V, generator=g) * 3)
    tokens = torch.tensor([5, V - 1])
    x = logits.requires_grad_(False)
    lp, ent = rk.logprobs_from_logits(x, tokens, return_entropy=True, backend=backend)
    elp, eent = reference.logprobs_from_logits(logits.clone().double(), tokens, 1.0, -100, True)
    torch.testing.assert_close(lp, elp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, eent.float(), rtol=1e-5, atol=1e-5)


def test_backward_keeps_nothing_of_size_vocab():
    if not HAVE_CPU:
        pytest.skip("native extension not built")
    N, V = 8, 1000
    logits, tokens = _inputs((N,), V, dtype=torch.float32, seed=14)

    def big_saved(backend):
        x = logits.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
            lp, ent = rk.logprobs_from_logits(x, tokens, return_entropy=True, backend=backend)
        # anything of size [N, V] other than the caller's logits themselves is a new [N, V] tensor kept alive
        return [t for t in saved if t.numel() >= N * V and t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]

    assert big_saved("cpu") == []
    assert len(big_saved("reference")) > 0  # the reference keeps log_softmax's [N, V] output: the check can fail


@settings(max_examples=12, deadline=None)
@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=3), V=st.integers(1, 300),
       kind=st.sampled_from(["right", "left", "holes"]), temperature=st.floats(0.25, 4.0),
       seed=st.integers(0, 2 ** 16))
def test_property_against_reference(lead, V, kind, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead)
    logits = torch.randn(*lead, V, generator=g, dtype=torch.float64) * 5
    tokens = torch.randint(0, V, lead, generator=g)
    # ignored positions laid out like the padding of real batches
    R, T = (lead[0] if len(lead) > 1 else 1), lead[-1]
    mask = ragged_masks(max(R, 1), T, generator=g)[kind]
    rows = 1
    for d in lead[:-1]:
        rows *= d
    mask = mask.repeat((rows + R - 1) // R, 1)[:rows].reshape(lead)
    tokens[~mask] = -100
    w = torch.randn(lead, generator=g, dtype=torch.float64)
    elp, eent, egrad = _value_and_grads(_ref(logits, tokens, temperature), logits, w, 1 - w)
    for backend in BACKENDS:
        if backend == "triton" and logits.numel() > 4000:
            continue  # the interpreter is slow
        lp, ent, grad = _value_and_grads(_rk(backend, tokens, temperature), logits, w, 1 - w)
        tol = _fp64_tol(backend)
        torch.testing.assert_close(lp, elp, **tol)
        torch.testing.assert_close(ent, eent, **tol)
        torch.testing.assert_close(grad, egrad, **tol)


@pytest.mark.skipif(not HAVE_CPU, reason="native extension not built")
def test_opcheck():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        logits, tokens = _inputs((3, 4), 17, dtype=dtype, seed=15)
        logits.requires_grad_(True)
        for ent in (False, True):
            torch.library.opcheck(torch.ops.rlhf_kernels.logprobs_from_logits_fwd.default,
                                  (logits, tokens, 0.7, -100, ent))
    acc = torch.float32
    logits, tokens = _inputs((5,), 17, dtype=torch.float32, seed=16)
    lp, ent, lse = torch.ops.rlhf_kernels.logprobs_from_logits_fwd(logits, tokens, 1.0, -100, True)
    torch.library.opcheck(torch.ops.rlhf_kernels.logprobs_from_logits_bwd.default,
                          (torch.randn(5, dtype=acc), torch.randn(5, dtype=acc), logits, tokens, lse, ent, 1.0, -100))
    torch.library.opcheck(torch.ops.rlhf_kernels.logprobs_from_logits_bwd.default,
                          (torch.randn(5, dtype=acc), None, logits, tokens, lse, ent, 1.0, -100))


@pytest.mark.skipif(not HAVE_CPU, reason="native extension not built")
def test_torch_compile_fullgraph():
    logits, tokens = _inputs((2, 5), 50, dtype=torch.float32, seed=17)

    def f(x, t):
        lp, ent = rk.logprobs_from_logits(x, t, temperature=0.8, return_entropy=True, validate=False, backend="cpu")
        return (lp * 2).sum() + ent.mean()

    x = logits.clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True, backend="inductor")(x, tokens)
    out.backward()
    xr = logits.double().requires_grad_(True)
    lp, ent = reference.logprobs_from_logits(xr, tokens, 0.8, -100, True)
    exp = (lp * 2).sum() + ent.mean()
    exp.backward()
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("V", [1, 3, 1271, 50257])
def test_gpu_matches_reference(backend, dtype, V):
    lead = (4,) if V == 50257 else (3, 257)
    logits, tokens = _inputs(lead, V, dtype=dtype, seed=18)
    g_lp, g_ent = torch.randn(lead), torch.randn(lead)
    lp, ent, grad = _value_and_grads(_rk(backend, tokens.cuda(), 0.7), logits.cuda(), g_lp.cuda(), g_ent.cuda())
    x64 = logits.double()
    elp, eent, egrad = _value_and_grads(_ref(x64, tokens, 0.7), x64, g_lp.double(), g_ent.double())
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lp.cpu().double(), elp, **tol)
    torch.testing.assert_close(ent.cpu().double(), eent, **tol)
    eps = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(grad.cpu().double(), egrad, rtol=eps, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_out_of_range_and_no_sync(backend):
    logits, tokens = _inputs((8,), 100, dtype=torch.float32, seed=19, ignore_frac=0.0)
    tokens[2], tokens[5] = 100, -3
    x, t = logits.cuda(), tokens.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp = rk.logprobs_from_logits(x, t, validate=False, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lp = lp.cpu()
    assert torch.isnan(lp[[2, 5]]).all() and torch.isfinite(lp[[0, 1, 3, 4, 6, 7]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_and_empty_shapes(backend):
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    lp, ent = rk.logprobs_from_logits(x, torch.tensor(3), return_entropy=True, backend=backend)
    assert lp.shape == () and ent.shape == ()
    torch.testing.assert_close(lp.detach(), torch.log_softmax(x.detach(), -1)[3], **_fp64_tol(backend))
    (lp + ent).backward()
    assert torch.isfinite(x.grad).all()
    x = torch.randn(0, 5, 7, requires_grad=True)
    lp, ent = rk.logprobs_from_logits(x, torch.zeros(0, 5, dtype=torch.long), return_entropy=True, backend=backend)
    assert lp.shape == (0, 5) and ent.shape == (0, 5)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape
