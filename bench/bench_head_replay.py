"""The cost of the head's options: rk.linear_logprobs forward+backward with a per-token temperature, softcap and
top_k / top_p (the sampler replay) against the plain head (one scalar temperature), timed interleaved in one
process (python -m bench.bench_head_replay [--quick]).

The replay runs the head in row blocks over the whole vocabulary (rlhf_kernels/ops/_replay_head.py): the same
GEMMs as the plain head plus, per row, the threshold's bisection passes over the row's logits in memory.
"""
import argparse
import os

import torch

import rlhf_kernels as rk

from .common import interleaved


def run(quick=False, csv_dir=None, ceilings=None, backend=None, shape=None):
    N, H, V = shape or ((256, 256, 8192) if quick else (1024, 512, 32000))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5 * 4).requires_grad_()
    tok = torch.randint(0, V, (N,), generator=g)
    temps = 0.5 + torch.rand(N, generator=g)

    def step(temperature=temps, **kw):
        def fn():
            lp, ent = rk.linear_logprobs(h, w, tok, temperature=temperature, return_entropy=True, backend=backend,
                                         **kw)
            (torch.where(torch.isfinite(lp), lp, 0).sum() + ent.sum()).backward()
            h.grad = w.grad = None
        return fn

    cases = {"plain (scalar temperature)": step(temperature=0.8), "per-token temperature": step(),
             "per-token temperature, softcap=30": step(softcap=30.0),
             "per-token temperature, top_k=50": step(top_k=50), "per-token temperature, top_p=0.9": step(top_p=0.9),
             "per-token temperature, top_k=50, top_p=0.9": step(top_k=50, top_p=0.9)}
    res = interleaved(cases, repeats=3)
    base = res["plain (scalar temperature)"][0]
    load = os.getloadavg()[0]
    print(f"linear_logprobs fwd+bwd N={N} H={H} V={V} fp32, backend={backend or 'auto'} "
          f"(load average {load:.1f}, {torch.get_num_threads()} threads)")
    print("| variant | median | min – max | × plain |")
    print("|---|---|---|---|")
    for k, (med, lo, hi, _) in res.items():
        print(f"| {k} | {med * 1e3:.1f} ms | {lo * 1e3:.1f} – {hi * 1e3:.1f} ms | {med / base:.2f}x |")
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--backend", default=None)
    p.add_argument("--shape", type=int, nargs=3, metavar=("N", "H", "V"), default=None)
    a = p.parse_args()
    run(quick=a.quick, backend=a.backend, shape=a.shape)
