"""The vocabulary-parallel head (process_group=...) on 2 CPU processes over gloo, against the single-process op on
the gathered vocabulary. One pair of processes runs every case (tests/vocab_parallel_worker.py); the tests below
check its outputs, so the whole module pays one start-up of two interpreters."""
import os
import subprocess
import sys
import time

import pytest
import torch

import rlhf_kernels as rk

from conftest import cpu_backends

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2
FAST = [b for b in cpu_backends("linear_logprobs", reference=True) if b != "triton"]  # cpu and the reference
TRITON = "triton" in cpu_backends("linear_logprobs")


def _case(name, op, backend, V, shards, *, explicit=True, H=16, lead=(3, 5), dtype=torch.float32, bias=True,
          temperature=1.0, softcap=None, return_entropy=True, ignore=(1, 7), validate=True, seed=0, tokens=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 2 / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tok = torch.randint(0, V, lead, generator=g) if tokens is None else tokens
    for i in ignore:
        tok.view(-1)[i] = -100
    if isinstance(temperature, str):  # one temperature per token
        temperature = torch.rand(lead, generator=g, dtype=torch.float64) + 0.5
    cast = (lambda t: None if t is None else t.to(dtype))
    c = dict(name=name, op=op, backend=backend, shards=shards, explicit=explicit, tokens=tok,
             temperature=temperature if not isinstance(temperature, torch.Tensor) else cast(temperature),
             softcap=softcap, ignore_index=-100, return_entropy=return_entropy, validate=validate,
             c1=torch.randn(lead, generator=g, dtype=torch.float64).to(torch.float64 if dtype == torch.float64
                                                                         else torch.float32),
             hidden=None, weight=None, bias=None, logits=None)
    c["c2"] = torch.randn(lead, generator=g).to(c["c1"].dtype)
    if op == "linear":
        c.update(hidden=cast(hidden), weight=cast(weight), bias=cast(b))
    else:
        c["logits"] = cast(hidden @ weight.T + (b if bias else 0))
    return c


EVEN = [(0, 7), (7, 7)]          # V = 14, the default offsets rank·V_r
UNEVEN = [(6, 7), (0, 6)]        # V = 13, rank 0 holds the upper part: offsets not in rank order


def cases():
    out = []
    for be in FAST:
        out += [
            _case(f"linear-even-{be}", "linear", be, 14, EVEN, explicit=False, temperature=0.7),
            _case(f"linear-uneven-{be}", "linear", be, 13, UNEVEN, temperature="per-token", softcap=4.0, seed=1),
            _case(f"linear-fp64-{be}", "linear", be, 13, UNEVEN, dtype=torch.float64, bias=False, seed=2,
                  return_entropy=False),
            _case(f"logits-uneven-{be}", "logits", be, 13, UNEVEN, temperature="per-token", softcap=3.0, seed=3),
            _case(f"logits-even-{be}", "logits", be, 14, EVEN, explicit=False, return_entropy=False, seed=4,
                  dtype=torch.float64),
        ]
    # only the entropy takes a gradient (no log-prob gradient reaches backward), and a frozen weight
    only_ent = _case("linear-entropy-only", "linear", "cpu", 13, UNEVEN, temperature=1.3, seed=9)
    only_ent.update(c1=None, frozen=True)
    out.append(only_ent)
    uncompacted = _case("linear-uncompacted", "linear", "cpu", 13, UNEVEN, temperature=0.9, softcap=5.0, seed=13)
    uncompacted["uncompacted"] = True
    out.append(uncompacted)
    # every row ignored (nothing left after the compaction), and a single row
    out.append(_case("linear-all-ignored", "linear", "cpu", 13, UNEVEN, lead=(4,), ignore=(0, 1, 2, 3), seed=10))
    out.append(_case("logits-all-ignored", "logits", "cpu", 13, UNEVEN, lead=(4,), ignore=(0, 1, 2, 3), seed=11))
    out.append(_case("linear-one-row", "linear", "cpu", 13, UNEVEN, lead=(1,), ignore=(), seed=12))
    bf16 = _case("linear-bf16-cpu", "linear", "cpu", 14, EVEN, dtype=torch.bfloat16, seed=5)
    bf16["rows_per_step"] = 4
    out.append(bf16)
    # validate=False, a token outside the whole vocabulary: NaN log-prob and no log-prob gradient, as one process
    bad = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(6))
    bad[0, 3] = 13
    out.append(_case("linear-out-of-range", "linear", "cpu", 13, UNEVEN, validate=False, tokens=bad, seed=6))
    if TRITON:  # the interpreter is slow: one small case per op
        out.append(_case("linear-triton", "linear", "triton", 13, UNEVEN, lead=(5,), H=8, temperature="per-token",
                         softcap=4.0, ignore=(2,), seed=7))
        out.append(_case("logits-triton", "logits", "triton", 13, UNEVEN, lead=(5,), temperature=0.8, ignore=(2,),
                         seed=8))
    # bad layouts: every rank must raise alike
    out.append(_case("gap", "linear", "cpu", 14, [(0, 7), (8, 6)]))
    out.append(_case("overlap", "linear", "cpu", 14, [(0, 7), (0, 7)]))
    out.append(_case("negative-offset", "linear", "cpu", 14, [(0, 7), (-1, 7)]))
    out.append(_case("token-past-V", "logits", "cpu", 14, EVEN, tokens=torch.full((3, 5), 14)))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """({case name: case}, [rank 0 results, rank 1 results]) of one gloo job running every case."""
    tmp = tmp_path_factory.mktemp("vp")
    cs = cases()
    torch.save(cs, tmp / "cases.pt")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    logs = [open(tmp / f"log{r}.txt", "w+") for r in range(WORLD)]  # files, not pipes: a full pipe would block a rank
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "vocab_parallel_worker.py"), str(tmp / "cases.pt"),
                               str(r), str(WORLD), str(tmp / "store"), str(tmp / f"out{r}.pt")], env=env, cwd=ROOT,
                              stdout=logs[r], stderr=subprocess.STDOUT) for r in range(WORLD)]
    deadline = time.monotonic() + 300  # the whole job; each collective also times out after 60 s in the worker
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # a rank that failed leaves the other waiting: never let it outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        if p.returncode != 0:
            text = []
            for q, f in enumerate(logs):
                f.seek(0)
                text.append(f"--- rank {q} (exit {procs[q].returncode}):\n" + f.read()[-6000:])
            pytest.fail(f"rank {r} failed:\n" + "\n".join(text))
    return {c["name"]: c for c in cs}, [torch.load(tmp / f"out{r}.pt", weights_only=True) for r in range(WORLD)]


def _single(c):
    """The single-process op on the whole vocabulary: (logp, entropy, gradients by leaf)."""
    kw = dict(temperature=c["temperature"], softcap=c["softcap"], ignore_index=c["ignore_index"],
              return_entropy=c["return_entropy"], validate=c["validate"], backend=c["backend"])
    if c["op"] == "linear":
        leaves = dict(dh=c["hidden"].clone().requires_grad_(), dw=c["weight"].clone().requires_grad_(not c.get("frozen")))
        if c["bias"] is not None:
            leaves["db"] = c["bias"].clone().requires_grad_()
        out = rk.linear_logprobs(leaves["dh"], leaves["dw"], c["tokens"], bias=leaves.get("db"), **kw)
    else:
        leaves = dict(dx=c["logits"].clone().requires_grad_())
        out = rk.logprobs_from_logits(leaves["dx"], c["tokens"], **kw)
    logp, ent = out if c["return_entropy"] else (out, None)
    ((0 if c["c1"] is None else (c["c1"] * logp).nansum()) + (0 if ent is None else (c["c2"] * ent).sum())).backward()
    return logp.detach(), None if ent is None else ent.detach(), {k: t.grad for k, t in leaves.items()}


def _tol(c):
    return {torch.float64: (1e-10, 1e-10), torch.bfloat16: (2e-2, 2e-2)}.get(
        (c["hidden"] if c["op"] == "linear" else c["logits"]).dtype, (2e-5, 2e-5))


VALUE_CASES = [c["name"] for c in cases() if c["name"] not in ("gap", "overlap", "negative-offset", "token-past-V")]


@pytest.mark.parametrize("name", VALUE_CASES)
def test_equals_single_process(run, name):
    """Values, entropy, the hidden gradient and each rank's weight/bias (logits) shard gradient."""
    cs, res = run
    c = cs[name]
    logp, ent, grads = _single(c)
    rtol, atol = _tol(c)
    for r in range(WORLD):
        got = res[r][name]
        assert "error" not in got, got
        torch.testing.assert_close(got["logp"], logp, rtol=rtol, atol=atol, equal_nan=True)
        if ent is not None:
            torch.testing.assert_close(got["ent"], ent, rtol=rtol, atol=atol)
        off, rows = c["shards"][r]
        if c["op"] == "linear":
            torch.testing.assert_close(got["dh"], grads["dh"], rtol=rtol, atol=atol)
            if c.get("frozen"):
                assert got["dw"] is None and grads["dw"] is None
            else:
                torch.testing.assert_close(got["dw"], grads["dw"][off:off + rows], rtol=rtol, atol=atol)
            if c["bias"] is not None:
                torch.testing.assert_close(got["db"], grads["db"][off:off + rows], rtol=rtol, atol=atol)
        else:
            torch.testing.assert_close(got["dx"][..., off:off + rows], grads["dx"][..., off:off + rows], rtol=rtol,
                                       atol=atol)
            others = torch.ones(c["logits"].shape[-1], dtype=torch.bool)
            others[off:off + rows] = False
            assert not got["dx"][..., others].any()  # nothing flows into the columns of other ranks


@pytest.mark.parametrize("name", VALUE_CASES)
def test_bitwise_identical_across_ranks(run, name):
    _, res = run
    a, b = res[0][name], res[1][name]
    for k in ("logp", "ent", "dh"):
        if a.get(k) is not None:
            assert torch.equal(a[k].nan_to_num(), b[k].nan_to_num()), k


@pytest.mark.parametrize("name,match", [("gap", "gap at 7"), ("overlap", "overlap at 0"),
                                        ("negative-offset", r"vocab_offset must be >= 0; .* = \[\(1, -1\)\]"),
                                        ("token-past-V", r"\[0, 14\).*found 14")])
def test_bad_layout_raises_on_every_rank(run, name, match):
    import re
    _, res = run
    for r in range(WORLD):
        got = res[r][name]
        assert got.get("error") == "ValueError", got
        assert re.search(match, got["message"]), got["message"]


def test_bad_arguments_without_a_group():
    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="vocab_offset needs process_group"):
        rk.linear_logprobs(h, w, t, vocab_offset=0)
    with pytest.raises(ValueError, match="vocab_offset needs process_group"):
        rk.logprobs_from_logits(torch.randn(3, 5), t, vocab_offset=0)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="torch.distributed to be initialized"):
            rk.linear_logprobs(h, w, t, process_group=object())
