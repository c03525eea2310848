"""The CPU kernels are compiled once per ISA and one is chosen at load (docs/backends.md, "CPU ISA"):
the best this CPU runs by default, the one RLHF_KERNELS_CPU_ISA names otherwise. Every op is run under
every ISA this CPU supports against the reference, each ISA in its own process (the choice is made once
per process). Run as a script, this file is that sweep."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rlhf_kernels as rk

ISAS = ("baseline", "avx2", "avx512")
# the CPU flags each ISA's kernels are compiled with (setup.py ISA_FLAGS), as /proc/cpuinfo names them
ISA_CPU_FLAGS = {"baseline": set(), "avx2": {"avx2", "fma", "f16c"},
                 "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}}
HAVE_CPU = rk.available_backends()["cpu"] == "available"
# the ISA copies this build holds (all three on x86-64 unless setup.py's RLHF_KERNELS_CPU_ISAS chose fewer)
BUILT = tuple(rk._backend._C.built_cpu_isas) if HAVE_CPU else ()
OPS = sorted(n for n in rk.__all__ if n not in ("available_backends", "cpu_isa"))
# per-ISA kernel tables that serve an op without being one: batch_invariant's fixed-order GEMM tiles
HELPER_TABLES = ("fixed_gemm",)


def supported_isas():
    """The ISAs this machine runs, read from /proc/cpuinfo independently of the extension's own check."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["baseline"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to compare against")
    return [isa for isa in ISAS if ISA_CPU_FLAGS[isa] <= flags]


def run_with_isa(isa, code=None):
    # the package this process runs (the checkout's, or the instrumented copy `make sanitize` tests), not another
    # install: a script's own folder (tests/) heads sys.path, then PYTHONPATH
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(rk.__file__)))
    path = os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, RLHF_KERNELS_CPU_ISA=isa, PYTHONPATH=path)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, os.path.abspath(__file__), isa,
                                                     os.path.dirname(os.path.abspath(rk.__file__))]
    # run from the package's folder: `python -c` puts the working folder first on sys.path
    return subprocess.run(cmd, env=env, cwd=pkg_parent, capture_output=True, text=True, timeout=600)


pytestmark = pytest.mark.skipif(not HAVE_CPU, reason="native extension not built")


def test_default_is_the_best_supported_isa():
    env_isa = os.environ.get("RLHF_KERNELS_CPU_ISA")
    assert rk.cpu_isa() == (env_isa or [i for i in supported_isas() if i in BUILT][-1])


def test_the_dispatcher_offers_exactly_the_built_copies():
    """The ISAs the extension reports built are those whose kernel tables its binary holds, the baseline among
    them, and each holds one table per op (all the loops of every op are compiled per ISA)."""
    assert BUILT[0] == "baseline" and list(BUILT) == [i for i in ISAS if i in BUILT], BUILT
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert BUILT == ("baseline",)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to read the extension's symbols")
    out = subprocess.run([nm, "-D", "--defined-only", "-C", rk._backend._C.__file__], capture_output=True, text=True,
                         check=True).stdout
    tables = {}
    for isa, name in re.findall(r"\brk::cpu::(\w+)::(\w+)$", out, flags=re.M):
        tables.setdefault(isa, set()).add(name)
    assert sorted(tables) == sorted(BUILT), (sorted(tables), BUILT)
    for isa in BUILT:
        expected = set(OPS) | set(HELPER_TABLES)
        assert tables[isa] == expected, (isa, sorted(expected ^ tables[isa]))


@pytest.mark.parametrize("isa", ISAS)
def test_every_op_under_each_isa(isa):
    if isa not in BUILT:  # a build with fewer copies (RLHF_KERNELS_CPU_ISAS) refuses, naming what it has
        r = run_with_isa(isa, "import rlhf_kernels")
        assert r.returncode != 0 and f"RLHF_KERNELS_CPU_ISA={isa}: this build has no {isa} kernels" in r.stderr \
            and ",".join(BUILT) in r.stderr, r.stderr[-2000:]
        return
    if isa not in supported_isas():
        r = run_with_isa(isa, "import rlhf_kernels")
        assert r.returncode != 0 and f"RLHF_KERNELS_CPU_ISA={isa}" in r.stderr, r.stderr[-2000:]
        return
    r = run_with_isa(isa)
    assert r.returncode == 0 and r.stdout.strip().endswith(f"ok {isa}"), (r.stdout[-2000:], r.stderr[-3000:])


def test_unknown_isa_fails_the_import_with_the_allowed_values():
    r = run_with_isa("sse9", "import rlhf_kernels")
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "must be one of baseline, avx2, avx512" in r.stderr, r.stderr[-2000:]


# ---- the sweep, run in a process whose RLHF_KERNELS_CPU_ISA is set ----

def _flat(out):
    """The tensors of an op's output (tensor, tuple, or (loss, stats dict)), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = []
    for o in out:
        items += [o[k] for k in sorted(o)] if isinstance(o, dict) else _flat(o)
    return items


CHECKED = set()  # the ops the sweep ran: every op must be among them


def _check(name, fn, inputs, dtype, grad_of=(), tol_dtype=None):
    """fn(backend, *inputs) on the cpu backend in `dtype` against the reference in float64 on the same
    (rounded) values: outputs, and the gradients of a fixed random weighting of the outputs with respect
    to inputs[i] for i in grad_of. tol_dtype: the outputs' dtype when it is not `dtype` (float32 stats)."""
    CHECKED.add(name.split()[0])
    # the cpu backend computes in fp32 (fp64) on the same rounded inputs as the reference, so values agree
    # to fp32 rounding; bf16/fp16 gradients are rounded once to their dtype (half an ulp: 2^-9 / 2^-12)
    tol = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-5, atol=2e-5),
           torch.bfloat16: dict(rtol=2 ** -8, atol=1e-5),
           torch.float16: dict(rtol=2 ** -11, atol=1e-5)}[tol_dtype or dtype]
    inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    results = {}
    for backend, dt in (("reference", torch.float64), ("cpu", dtype)):
        xs = [x.to(dt) if x.is_floating_point() else x.clone() for x in inputs]
        for i in grad_of:
            xs[i].requires_grad_(True)
        outs = _flat(fn(backend, *xs))
        g = torch.Generator().manual_seed(1)
        total = sum((o.double() * torch.rand(o.shape, generator=g, dtype=torch.float64)).sum()
                    for o in outs if o.requires_grad)
        grads = list(torch.autograd.grad(total, [xs[i] for i in grad_of])) if grad_of else []
        results[backend] = [o.detach().double() for o in outs + grads]
    for k, (a, b) in enumerate(zip(results["cpu"], results["reference"])):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name} ({dtype}) output {k}: {m}")


def sweep():
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    # masks with an all-masked row, a full row and holes
    mask = torch.rand(4, 37, generator=g) > 0.3
    mask[0] = False
    mask[1] = True
    # heads: V past one 2048-entry chunk and not a multiple of any vector width; ignored positions
    V = 2100
    tokens = torch.randint(0, V, (2, 3), generator=g)
    tokens[0, 1] = -100
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        _check("logprobs_from_logits", lambda b, x: rk.logprobs_from_logits(
            x, tokens, temperature=0.9, return_entropy=True, backend=b), [randn(2, 3, V, scale=3)], dt, (0,))
    N, H, Vl = 7, 24, 301
    tok = torch.randint(0, Vl, (N,), generator=g)
    tok[2] = -100
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        _check("linear_logprobs", lambda b, h, w, bias: rk.linear_logprobs(
            h, w, tok, bias=bias.float() if h.dtype != torch.float64 else bias, temperature=1.3,
            return_entropy=True, backend=b), [randn(N, H), randn(Vl, H, scale=0.3), randn(Vl)], dt, (0, 1, 2))
    x = [randn(4, 37), randn(4, 37)]
    for dt in (torch.float32, torch.float64):
        for est in ("k1", "k2", "k3"):
            _check(f"token_kl {est}", lambda b, lp, ref: rk.token_kl(lp, ref, estimator=est, clamp=1.5, backend=b),
                   x, dt, (0, 1))
        _check("token_rewards", lambda b, s, lp, ref, dn: rk.token_rewards(
            s, mask, logp=lp, ref_logp=ref, kl_coef=0.1, kl_estimator="k3", dense=dn, dense_coef=0.5,
            dense_clip=1.0, score_position="eos+1", backend=b), [randn(4), *x, randn(4, 37)], dt)
        dones = torch.rand(4, 37, generator=g) > 0.9
        _check("gae", lambda b, r, v: rk.gae(r, v, mask, gamma=0.99, lam=0.9, dones=dones, backend=b),
               [randn(4, 37), randn(4, 37)], dt)
        for shift in (True, False):
            _check("masked_whiten", lambda b, v: rk.masked_whiten(v, mask, shift_mean=shift, backend=b),
                   [randn(4, 37, scale=3) + 1], dt)
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"):
            _check(f"ppo_policy_loss {agg}", lambda b, lp, old, adv: rk.ppo_policy_loss(
                lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, aggregation=agg, backend=b),
                [randn(4, 37, scale=0.3), randn(4, 37, scale=0.3), randn(4, 37)], dt, (0, 1, 2))
            _check(f"ppo_value_loss {agg}", lambda b, v, old, ret: rk.ppo_value_loss(
                v, old, ret, mask, clip=0.2, aggregation=agg, backend=b),
                [randn(4, 37), randn(4, 37), randn(4, 37)], dt, (0, 1, 2))
        for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
            eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
            _check(f"dpo_loss {loss_type}", lambda b, *lps: rk.dpo_loss(
                *lps, beta=0.5, loss_type=loss_type, label_smoothing=eps, backend=b),
                [randn(9, scale=2) for _ in range(4)], dt, (0, 1, 2, 3))
        # groups of 4 in blocks, and by label with groups of 1, 2, 4 and 5 (a group of one gets 0)
        labels = torch.tensor([3, 1, 3, 7, 1, 3, 9, 3, 0, 0, 0, 0])
        for baseline in ("mean", "leave_one_out", "none"):
            for scale in ("std", "none"):
                _check(f"group_advantages {baseline} {scale}", lambda b, s: (
                    rk.group_advantages(s, 4, baseline=baseline, scale=scale, backend=b),
                    rk.group_advantages(s, group_ids=labels, baseline=baseline, scale=scale, backend=b)),
                    [randn(12, scale=2)], dt)
        for level in ("token", "sequence", "geometric"):
            for mode in ("truncate", "mask"):
                def rc(b, old, roll, level=level, mode=mode):
                    return rk.rollout_correction(old, roll, mask, level=level, mode=mode, low=0.8, high=1.25, backend=b)
                old = -randn(4, 37).abs()
                roll = old + randn(4, 37, scale=0.2)
                _check(f"rollout_correction {level} {mode}", lambda b, o, r: rc(b, o, r)[:2], [old, roll], dt)
                # the stats are float32 whatever the inputs' dtype
                _check(f"rollout_correction {level} {mode} stats", lambda b, o, r: rc(b, o, r)[2:], [old, roll], dt,
                       tol_dtype=torch.float32)
    assert CHECKED == set(OPS), f"ops the sweep does not run: {sorted(set(OPS) - CHECKED)}"


if __name__ == "__main__":
    want, pkg = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None  # pkg: the caller's package, to check
    assert rk.cpu_isa() == want, (rk.cpu_isa(), want)
    assert pkg in (None, os.path.dirname(os.path.abspath(rk.__file__))), (rk.__file__, pkg)
    sweep()
    print(f"ok {want}")
