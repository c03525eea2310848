"""ppo_value_loss forward+backward: the fused cpu kernel vs the eager reference and torch.compile of it.

Floor (fp32, per token): forward must read values, old_values, returns (4 B each) and the mask
(1 B): 13 B; backward must write grad_values (4 B) and read what ∂ℓ/∂V needs (our kernel re-reads
the 13 B of inputs rather than storing a [B, T] derivative in forward). The fused kernels move
13 + 17 = 30 B/token; GB/s below counts those 30 B. Compute: ~10 flops per token per pass, no
transcendental, so this op is bound by per-call overhead and memory.
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from bench.common import copy_bandwidth, interleaved, peak_bytes, script_main, table, timing_rows, write_csv

BYTES_PER_TOKEN = 30


def _inputs(B, T):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(B, T, generator=g).requires_grad_(True)
    old = values.detach() + torch.randn(B, T, generator=g) * 0.3
    returns = values.detach() + torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    return values, old, returns, mask


def run(quick=False, csv_dir=None, bandwidth=None):
    shapes = [(64, 1024)] if quick else [(64, 1024), (256, 4096)]
    bandwidth = bandwidth or copy_bandwidth()
    compiled = torch.compile(reference.ppo_value_loss)
    texts = []
    for B, T in shapes:
        values, old, returns, mask = _inputs(B, T)

        def step(fn):
            return lambda: torch.autograd.grad(fn(values, old, returns, mask)[0], values)

        fns = {"reference (eager)": step(lambda *a: reference.ppo_value_loss(*a, 0.2, "token-mean")),
               "reference (torch.compile)": step(lambda *a: compiled(*a, 0.2, "token-mean")),
               "rk cpu": step(lambda *a: rk.ppo_value_loss(*a, backend="cpu"))}
        res = interleaved(fns, repeats=20 if quick else 30, warmup=3)
        rows = timing_rows(res, "reference (eager)", BYTES_PER_TOKEN * B * T, bandwidth)
        for row, fn in zip(rows, fns.values()):
            row["peak memory"] = f"{peak_bytes(fn) / 2 ** 20:.2f} MiB"
        cols = ["impl", "median", "spread", "speedup vs reference (eager)", "GB/s", "peak memory"]
        texts.append(table(f"ppo_value_loss token-mean clip=0.2, forward+backward, {B}x{T} fp32, "
                           f"{torch.get_num_threads()} threads (copy bandwidth {bandwidth / 1e9:.1f} GB/s)", rows, cols))
        if csv_dir:
            write_csv(f"{csv_dir}/ppo_value_loss_{B}x{T}.csv", rows, cols)
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
