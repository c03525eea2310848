"""python -m bench.batch_invariant [--n N --h H --v V --dtype float32 --repeats R --backend cpu --top_k K --top_p P]:
the cost of rk.linear_logprobs(batch_invariant=True) next to the default mode, forward + backward (hidden and
weight gradients), the two modes interleaved in one process; prints the medians, their ratio and the load average.
With --top_k / --top_p both modes run the sampler replay (its row blocks: BLAS vs the fixed-order fixed_gemm)."""
import argparse
import os
import statistics
import time

import torch

import rlhf_kernels as rk


def _step(h, w, tok, backend, invariant, replay):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    t0 = time.perf_counter()
    lp, ent = rk.linear_logprobs(h, w, tok, return_entropy=True, backend=backend, batch_invariant=invariant, **replay)
    (lp.masked_fill(lp == float("-inf"), 0).sum() + 0.1 * ent.sum()).backward()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.batch_invariant")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--top_k", type=int, default=None, help="run the sampler replay with this top_k")
    p.add_argument("--top_p", type=float, default=None, help="run the sampler replay with this top_p")
    a = p.parse_args(argv)
    replay = {k: v for k, v in (("top_k", a.top_k), ("top_p", a.top_p)) if v is not None}
    dt = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.n, a.h, generator=g).to(dt)
    w = (torch.randn(a.v, a.h, generator=g) / a.h ** 0.5).to(dt)
    tok = torch.randint(0, a.v, (a.n,), generator=g)
    times = {False: [], True: []}
    for mode in (False, True):  # warm-up, not timed
        _step(h[:8], w, tok[:8], a.backend, mode, replay)
    for _ in range(a.repeats):
        for mode in (False, True):
            times[mode].append(_step(h, w, tok, a.backend, mode, replay))
    base, inv = statistics.median(times[False]), statistics.median(times[True])
    print(f"linear_logprobs fwd+bwd N={a.n} H={a.h} V={a.v} {a.dtype} backend={a.backend} {replay or ''}, "
          f"{torch.get_num_threads()} threads, {a.repeats} interleaved repeats, load average {os.getloadavg()}")
    print(f"default          median {base:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times[False])})")
    print(f"batch_invariant  median {inv:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times[True])})")
    print(f"batch_invariant / default = {inv / base:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
