"""token_kl forward+backward: the cpu kernel vs the eager reference and torch.compile of it."""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from bench.common import copy_bandwidth, interleaved, script_main, table, timing_rows, write_csv


def run(quick=False, csv_dir=None, bandwidth=None):
    B, T = (64, 1024) if quick else (256, 4096)
    logp = (-torch.rand(B, T) * 5).requires_grad_(True)
    ref = -torch.rand(B, T) * 5
    g = torch.randn(B, T)
    compiled = torch.compile(reference.token_kl)

    def step(fn):
        return lambda: torch.autograd.backward(fn(logp, ref, "k3"), g)

    fns = {"reference (eager)": step(lambda a, b, e: reference.token_kl(a, b, e)),
           "reference (torch.compile)": step(lambda a, b, e: compiled(a, b, e)),
           "rk cpu": step(lambda a, b, e: rk.token_kl(a, b, estimator=e, backend="cpu"))}
    res = interleaved(fns, repeats=5 if quick else 9)
    # floor: fwd reads logp, ref, writes kl; bwd reads grad, logp, ref, writes two grads (fp32)
    nbytes = 4 * B * T * (3 + 5)
    bandwidth = bandwidth or copy_bandwidth()
    cols = ["impl", "median", "spread", "speedup vs reference (eager)", "GB/s"]
    rows = timing_rows(res, "reference (eager)", nbytes, bandwidth)
    text = table(f"token_kl k3, forward+backward, {B}x{T} fp32 (copy bandwidth {bandwidth / 1e9:.1f} GB/s)", rows, cols)
    if csv_dir:
        write_csv(f"{csv_dir}/token_kl.csv", rows, cols)
    return text


if __name__ == "__main__":
    script_main(run)
