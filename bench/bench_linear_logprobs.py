"""linear_logprobs forward+backward: rk's tiled kernels vs the compute floor, the naive composition
(eager and torch.compile), torch's chunked linear_cross_entropy and Cut Cross-Entropy (its
torch_compile implementation, the one that runs on a CPU); then agreement with Liger-Kernel's fused
linear cross entropy (Triton, so run under the interpreter and never timed here) and CCE.

Floor: the three GEMMs any exact method runs — logits h·Wᵀ, d(hidden) = dZ·W, d(weight) = dZᵀ·h,
2·N·V·H FLOPs each. A method that never stores the [N, V] logits recomputes them in backward (a
fourth GEMM), so 4/3 = 1.33× the floor is its practical limit. Bytes that must move (hidden, weight
in; their gradients out: 2·(N + V)·H elements) are negligible next to 6·N·V·H FLOPs: compute bound,
so GFLOP/s counts those 6·N·V·H against the fp32 GEMM ceiling.
Peak memory: the naive composition holds the fp32 logits, their log-softmax and gradient
([N, V] each, 1 GiB at N=2048, V=128256); rk holds the weight gradient [V, H] and budget-capped tiles.
"""
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import rlhf_kernels as rk

from .common import DEVICE, interleaved, peak_bytes, peers, report, rk_backends, script_main, table

FULL, QUICK = (2048, 256, 128256), (256, 256, 8192)


def _lce(**kw):
    opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    return None if opts is None or not hasattr(F, "linear_cross_entropy") else opts(**kw)


FLOOR, NAIVE = "3 bare GEMMs (floor)", "naive (matmul, log_softmax, gather)"
NAIVE_COMPILED = "naive (torch.compile)"
CCE = "Cut Cross-Entropy (impl=torch_compile)"
LCE_DEFAULT = "torch linear_cross_entropy (LinearCrossEntropyOptions())"
LCE_256 = "torch linear_cross_entropy (batch_chunk_size=256)"


def _naive(tok, low):
    def naive(h, w):
        logits = h @ w.T
        return torch.log_softmax(logits.float() if low else logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    return naive


CCE_GPU = "Cut Cross-Entropy (impl=cce, its Triton kernels)"
LIGER = "Liger-Kernel fused linear cross entropy (reduction=sum)"


def _cce(tok, impl="torch_compile"):
    from cut_cross_entropy import linear_cross_entropy as cce
    return lambda h, w: -cce(h, w, tok, reduction="none", impl=impl).float()


def _liger(tok):
    """−Σ logp through Liger's fused linear cross entropy (its backward needs a reduced loss), spread over the
    positions so the same upstream gradient drives it; it computes its gradients during the forward."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as L

    def liger(h, w):
        loss = L.apply(h, w, tok, None, None, -100, 0.0, 0.0, "sum")
        loss = loss[0] if isinstance(loss, tuple) else loss
        return (-loss).expand(tok.shape[0])
    return liger


def _contenders(h, w, tok, slow_ok):
    """({name: log-prob function}, {peer: reason skipped}) for hidden h, weight w (both requiring
    grad) and tokens; the floor is separate. `slow_ok`: include torch's default chunking (tens of
    times the floor here)."""
    naive = _naive(tok, h.dtype != torch.float32)
    fns = {NAIVE: naive, NAIVE_COMPILED: torch.compile(naive)}
    lce_default, lce_256 = _lce(), _lce(chunking_method=None, batch_chunk_size=256)
    if lce_default is not None and slow_ok:
        fns[LCE_DEFAULT] = lambda h, w: -F.linear_cross_entropy(h, w, tok, reduction="none",
                                                                options=lce_default).float()
    if lce_256 is not None:
        fns[LCE_256] = lambda h, w: -F.linear_cross_entropy(h, w, tok, reduction="none", options=lce_256).float()
    makers = {CCE: lambda: _cce(tok)}
    if DEVICE.type == "cuda":  # the peers' Triton kernels, timed only where they compile
        makers.update({CCE_GPU: lambda: _cce(tok, impl="cce"), LIGER: lambda: _liger(tok)})
    cce, skipped = peers(makers, trial=lambda f: torch.autograd.grad(f(h, w).sum(), (h, w)))
    fns.update(cce)
    for label, b in rk_backends("linear_logprobs").items():
        fns[label] = lambda h, w, b=b: rk.linear_logprobs(h, w, tok, backend=b)
    return fns, skipped


def _reference_logp(h, w, tok, rows=128):
    """float64 log-probs of the same (rounded) inputs, a few rows at a time."""
    out = []
    for r in range(0, h.shape[0], rows):
        z = h[r:r + rows].double() @ w.double().T
        out.append(torch.log_softmax(z, -1).gather(-1, tok[r:r + rows, None]).squeeze(-1))
    return torch.cat(out)


def _table(N, H, V, dtype, quick, csv_dir, ceilings):
    g0 = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g0).to(DEVICE, dtype).requires_grad_(True)
    w = (torch.randn(V, H, generator=g0) / H ** 0.5).to(DEVICE, dtype).requires_grad_(True)
    tok = torch.randint(0, V, (N,), generator=g0).to(DEVICE)
    g = torch.randn(N, generator=g0).to(DEVICE)
    # torch's default chunking runs at tens of times the floor on this CPU (its aspect-ratio rule gives
    # 4-row chunks at V/H = 501; over 100x in bf16): timed once at full size in fp32, skipped in bf16
    slow_ok = dtype == torch.float32
    fns, skipped = _contenders(h, w, tok, slow_ok)
    hd, wd = h.detach(), w.detach()
    buf = {"z": torch.empty(N, V, dtype=dtype, device=DEVICE), "dh": torch.empty_like(hd), "dw": torch.empty_like(wd)}

    def floor():
        torch.mm(hd, wd.T, out=buf["z"])
        torch.mm(buf["z"], wd, out=buf["dh"])
        torch.mm(buf["z"].T, hd, out=buf["dw"])

    steps = {FLOOR: floor}
    steps.update({k: (lambda f: lambda: torch.autograd.grad(f(h, w), (h, w), g))(f) for k, f in fns.items()})
    once = {} if quick else {k: steps.pop(k) for k in [LCE_DEFAULT] if k in steps}
    res = interleaved(steps, repeats=3, warmup=1)
    res.update(interleaved(once, repeats=1, warmup=0))
    buf.clear()  # the floor's [N, V] buffer must not sit in the peaks measured next
    ref = _reference_logp(hd, wd, tok)
    floor_t = res[FLOOR][0]
    extra, peaks = {}, {}
    for name, (med, *_rest) in res.items():
        extra[name] = {"× floor": f"{med / floor_t:.2f}"}
        if name in fns and name not in once:
            with torch.no_grad():
                extra[name]["max abs Δlogp vs fp64"] = f"{(fns[name](hd, wd).double() - ref).abs().max():.1e}"
            peaks[name] = peak_bytes(steps[name])
    name = str(dtype).replace("torch.", "")
    return report(f"linear_logprobs forward+backward, N={N} H={H} V={V} {name} (floor = 3 {name} GEMMs = "
                  f"{6 * N * V * H / 1e9:.0f} GFLOP; rk budget "
                  f"{os.environ.get('RLHF_KERNELS_CHUNK_BYTES', '256 MiB (default)')})", res, NAIVE, ceilings,
                  csv_name=f"linear_logprobs_{name}", csv_dir=csv_dir, flops=6 * N * V * H, peaks=peaks,
                  skipped=skipped, extra=extra, dtype={"float32": "fp32", "bfloat16": "bf16"}[name])


def _agreement():
    """Per-token log-probs and gradients of Σ logp against Liger-Kernel's fused linear cross entropy
    (Triton interpreter, fp32) and Cut Cross-Entropy (torch_compile implementation). Runs in a child
    process with TRITON_INTERPRET=1; returns {peer: {quantity: max abs diff} or reason}."""
    g0 = torch.Generator().manual_seed(1)
    N, H, V = 64, 64, 1000
    h0 = torch.randn(N, H, generator=g0)
    w0 = torch.randn(V, H, generator=g0) / H ** 0.5
    tok = torch.randint(0, V, (N,), generator=g0)
    tok[5] = -100

    def run(fn):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        lp = fn(h, w)  # per-token log-probs (0 at ignored positions)
        gh, gw = torch.autograd.grad(lp.sum(), (h, w))
        return lp.detach(), gh, gw

    ours = run(lambda h, w: rk.linear_logprobs(h, w, tok, backend="cpu"))
    out = {}

    def diff(other):
        return {k: float((a - b).abs().max()) for k, a, b in zip(("logp", "d hidden", "d weight"), ours, other)}

    try:
        # Liger's backward is only implemented for a reduced loss: compare −Σ logp and its gradients
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        s = _liger(tok)(h, w)[:1]
        gh, gw = torch.autograd.grad(s.sum(), (h, w))
        out["Liger-Kernel FLCE (interpreter)"] = {"Σ logp": float((s.detach().sum() - ours[0].sum()).abs()),
                                                   "d hidden": float((gh - ours[1]).abs().max()),
                                                   "d weight": float((gw - ours[2]).abs().max())}
    except Exception as e:  # not installed or not runnable here
        out["Liger-Kernel FLCE (interpreter)"] = f"skipped: {type(e).__name__}: {str(e)[:200]}"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["Cut Cross-Entropy (torch_compile)"] = diff(
            run(lambda h, w: -cce(h, w, tok, reduction="none", impl="torch_compile")))
    except Exception as e:
        out["Cut Cross-Entropy (torch_compile)"] = f"skipped: {type(e).__name__}: {str(e)[:200]}"
    return out


def agreement_table():
    env = dict(os.environ, TRITON_INTERPRET="1")
    # the folder holding the top-level package: the checkout (bench) or site-packages (rlhf_kernels.bench)
    root = os.path.abspath(__file__)
    for _ in range(__package__.count(".") + 2):
        root = os.path.dirname(root)
    r = subprocess.run([sys.executable, "-m", f"{__package__}.bench_linear_logprobs", "--agreement-json"], cwd=root,
                       env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        print(f"agreement run failed: {r.stderr[-2000:]}")
        return ""
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rows = []
    for peer, v in res.items():
        if isinstance(v, str):
            rows.append({"peer": peer, "max abs diff": v})
        else:
            rows.append({"peer": peer, "max abs diff": ", ".join(f"{k} {x:.1e}" for k, x in v.items())})
    return table("linear_logprobs agreement with peers (N=64 H=64 V=1000 fp32, one ignored position)", rows,
                 ["peer", "max abs diff"])


def ignored_rows_table(N, H, V, fraction=0.75, repeats=5):
    """fwd+bwd of rk.linear_logprobs (cpu backend on a CPU) with all rows valid vs `fraction` of them ignored
    (ignore_index, scattered at random), interleaved, median of `repeats`: ignored rows leave the GEMMs, so
    the time should follow the valid rows (issue target: ≤ 0.35× at 75% ignored)."""
    g0 = torch.Generator().manual_seed(2)
    h = torch.randn(N, H, generator=g0).to(DEVICE).requires_grad_(True)
    w = (torch.randn(V, H, generator=g0) / H ** 0.5).to(DEVICE).requires_grad_(True)
    tok = torch.randint(0, V, (N,), generator=g0).to(DEVICE)
    part = tok.clone()
    part[torch.randperm(N, generator=g0)[:int(N * fraction)].to(DEVICE)] = -100
    backend = "cpu" if DEVICE.type == "cpu" else None

    def step(t):
        return lambda: torch.autograd.grad(rk.linear_logprobs(h, w, t, backend=backend).sum(), (h, w))

    label = f"{int(fraction * 100)}% of rows ignored"
    res = interleaved({"all rows valid": step(tok), label: step(part)}, repeats=repeats, warmup=1)
    base = res["all rows valid"][0]
    rows = [{"rows": k, "median s": f"{v[0]:.3f}", "min s": f"{v[1]:.3f}", "max s": f"{v[2]:.3f}",
             "× all valid": f"{v[0] / base:.2f}"} for k, v in res.items()]
    return table(f"linear_logprobs fwd+bwd with ignored rows, N={N} H={H} V={V} fp32 ({DEVICE.type}, "
                 f"median of {repeats}, interleaved)", rows, ["rows", "median s", "min s", "max s", "× all valid"])


def run(quick=False, csv_dir=None, ceilings=None):
    N, H, V = QUICK if quick else FULL
    texts = [_table(N, H, V, dtype, quick, csv_dir, ceilings) for dtype in (torch.float32, torch.bfloat16)]
    texts.append(ignored_rows_table(N, H, V // 4 if not quick else V, repeats=3 if quick else 5))
    if not quick:
        texts.append(agreement_table())
    return "\n".join(texts)


if __name__ == "__main__":
    if sys.argv[1:] == ["--agreement-json"]:  # the child process of agreement_table()
        print(json.dumps(_agreement()))
    elif sys.argv[1:2] == ["--ignored-rows"]:  # only the ignored-rows comparison: [--ignored-rows N H V]
        ignored_rows_table(*(map(int, sys.argv[2:5]) if len(sys.argv) >= 5 else (1024, 256, 32768)))
    else:
        script_main(run)
