"""RLHF_KERNELS_CHUNK_BYTES bounds every temporary of the cpu and cuda linear_logprobs backends: the
plan's byte count equals the formula in rlhf_kernels/ops/linear_logprobs.py and stays within the
budget, and on CPU the memory a forward and a backward pass really allocate (counted by torch's
profiler, CPU allocator events) equals it, at budgets down to one that cuts the work into many
ragged chunks."""
import json
import os
import random

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends

pytestmark = pytest.mark.skipif("cpu" not in cpu_backends("linear_logprobs"), reason="native extension not built")

LOW = (torch.bfloat16, torch.float16)


def _plan(backend, N, V, H, dtype, backward, need_h=True, need_w=True, need_b=True, budget=1 << 20, threads=1):
    acc = 8 if dtype == torch.float64 else 4
    store = 2 if dtype in LOW else acc
    nc, vc, chunks, groups, nbytes, fixed = torch.ops.rlhf_kernels._linear_logprobs_plan(
        N, V, H, acc, store, backward, need_h, need_w, need_b, budget, threads, backend == "cuda")
    return dict(nc=nc, vc=vc, chunks=chunks, groups=groups, bytes=nbytes, fixed=fixed)


def _formula(backend, N, V, H, dtype, backward, need_h, need_w, need_b, nc, vc, groups):
    """The extra-memory formula as the docstring of rlhf_kernels/ops/linear_logprobs.py states it."""
    a = 8 if dtype == torch.float64 else 4
    low = dtype in LOW
    s = 2 if low else a
    G = groups
    if backend == "cpu" and not backward:
        return 5 * N * a + 3 * (G - 1) * N * a + G * a * (nc * vc + low * (nc + vc) * H)
    if backend == "cpu":
        return (N * a + (low and need_h) * N * H * a + (G - 1) * need_h * N * H * a
                + G * a * (nc * vc + low * (nc + vc) * H + (low and need_w) * vc * H))
    if not backward:
        return 5 * N * a + nc * vc * a
    split = N > nc
    return (N * a + (low and need_h) * 4 * N * H + nc * vc * (a + low * s)
            + (low and need_w) * 4 * vc * H * (1 + split) + (low and need_h) * 4 * nc * H + (need_b and split) * vc * a)


def _never_split(N, H, dtype, backward, need_h):
    a = 8 if dtype == torch.float64 else 4
    return ((4 * N * H if dtype in LOW and need_h else 0) if backward else 4 * N * a) + N * a  # + 1/τ per row


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_plan_matches_formula_and_budget(backend):
    rng = random.Random(0)
    for _ in range(400):
        N, V, H = rng.choice([1, 7, 300, 4097, 20000]), rng.choice([1, 37, 1000, 32000, 128256]), rng.choice([8, 64, 4096])
        dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
        backward, h, w, b = (rng.random() < 0.5 for _ in range(4))
        budget = rng.choice([1 << 10, 1 << 16, 1 << 20, 64 << 20, 256 << 20])
        threads = rng.choice([1, 2, 8])
        p = _plan(backend, N, V, H, dtype, backward, h, w, b, budget, threads)
        case = (backend, N, V, H, dtype, backward, h, w, b, budget, threads, p)
        assert p["bytes"] == _formula(backend, N, V, H, dtype, backward, h, w, b, p["nc"], p["vc"], p["groups"]), case
        assert 1 <= p["nc"] <= N and 1 <= p["vc"] <= V and p["chunks"] == -(-V // p["vc"]), case
        assert 1 <= p["groups"] <= max(1, min(threads, p["chunks"])), case
        assert p["fixed"] == _never_split(N, H, dtype, backward, h), case
        one = _formula(backend, N, V, H, dtype, backward, h, w, b, 1, 1, 1) - p["fixed"]  # a 1 × 1 chunk
        if one <= budget:
            assert p["bytes"] - p["fixed"] <= budget, case  # everything chunked fits the budget
        else:
            assert (p["nc"], p["vc"], p["groups"]) == (1, 1, 1), case  # not even a 1 × 1 chunk fits


def test_cuda_plan_uses_the_budget():
    # the default budget at a large head: long GEMMs (4096 rows), a vocabulary chunk a multiple of 128
    p = _plan("cuda", 16384, 128256, 4096, torch.bfloat16, True, budget=256 << 20)
    assert p["nc"] == 4096 and p["vc"] % 128 == 0 and p["vc"] >= 1024
    chunked = p["bytes"] - p["fixed"]
    assert p["fixed"] == 4 * 16384 * 4096 + 16384 * 4 and chunked <= 256 << 20  # d(hidden) accumulator, 1/τ per row
    assert (256 << 20) - chunked < 128 * (4096 * 6 + 8 * 4096 + 4)  # within one step of vc


def _extra_peak(fn):
    """Peak of (bytes allocated − bytes of the returned tensors allocated so far) while fn runs, from
    the CPU allocator events of torch's profiler. Single-threaded: the events are per thread."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"rk_mem_{os.getpid()}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    os.remove(path)
    keep = {t.untyped_storage().data_ptr() for t in out if t.numel()}
    last_alloc = {e["Addr"]: i for i, e in enumerate(events) if e["Bytes"] > 0 and e["Addr"] in keep}
    assert set(last_alloc) == keep, "an output's allocation was not seen"
    live = outputs = peak = 0
    for i, e in enumerate(events):
        live += e["Bytes"]
        if last_alloc.get(e["Addr"]) == i:
            outputs += e["Bytes"]
        peak = max(peak, live - outputs)
    return peak


def _inputs(N, V, H, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    b = torch.randn(V, generator=g).to(acc)
    tok = torch.randint(0, V, (N,), generator=g)
    tok[1] = -100
    return h, w, b, tok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("budget", [48 << 10, 200 << 10, 4 << 20])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True)])
def test_cpu_measured_extra_memory_equals_formula(dtype, budget, need):
    N, V, H = 301, 1000, 24  # several ragged row and vocabulary chunks at the smaller budgets
    h, w, b, tok = _inputs(N, V, H, dtype, seed=budget % 97)
    ops = torch.ops.rlhf_kernels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fwd = _extra_peak(lambda: ops.linear_logprobs_fwd(h, w, b, tok, 0.7, -100, budget))
        logp, ent, lse = ops.linear_logprobs_fwd(h, w, b, tok, 0.7, -100, budget)
        glp, gent = torch.randn_like(logp), torch.randn_like(ent)
        bwd = _extra_peak(lambda: ops.linear_logprobs_bwd(glp, gent, h, w, b, tok, lse, ent, 0.7, -100, *need, budget))
    finally:
        torch.set_num_threads(threads)
    pf = _plan("cpu", N, V, H, dtype, False, budget=budget)
    pb = _plan("cpu", N, V, H, dtype, True, *need, budget=budget)
    assert fwd == pf["bytes"] == _formula("cpu", N, V, H, dtype, False, *need, pf["nc"], pf["vc"], 1)
    assert bwd == pb["bytes"] == _formula("cpu", N, V, H, dtype, True, *need, pb["nc"], pb["vc"], 1)
    assert fwd - pf["fixed"] <= budget and bwd - pb["fixed"] <= budget
    if budget < 1 << 20:
        assert pb["chunks"] > 1 and N % pb["nc"] and V % pb["vc"], pb  # ragged row and vocabulary chunks


@pytest.mark.parametrize("budget", [48 << 10, 200 << 10])
def test_cpu_small_budget_matches_reference(monkeypatch, budget):
    # the chunk boundaries of the plans above, end to end through autograd, against the reference
    monkeypatch.setenv("RLHF_KERNELS_CHUNK_BYTES", str(budget))
    h, w, b, tok = _inputs(301, 1000, 24, torch.float64, seed=5)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    lp, ent = rk.linear_logprobs(*leaves[:2], tok, bias=leaves[2], temperature=0.7, return_entropy=True, backend="cpu")
    got = torch.autograd.grad((lp * 1.3 + ent * 0.4).sum(), leaves)
    ref = [t.clone().requires_grad_(True) for t in (h, w, b)]
    lp_r, ent_r = reference.linear_logprobs(ref[0], ref[1], tok, ref[2], 0.7, -100, True)
    exp = torch.autograd.grad((lp_r * 1.3 + ent_r * 0.4).sum(), ref)
    torch.testing.assert_close(lp, lp_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ent_r, rtol=1e-10, atol=1e-10)
    for x, y in zip(got, exp):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
