"""dpo_loss forward+backward: the fused cpu kernel vs the eager reference and torch.compile of it.

Floor (fp32, per pair): forward reads the four sequence log-probs (16 B) and writes the loss and
the two rewards (12 B); backward reads the upstream gradient and the four inputs (20 B) and writes
four gradients (16 B): 64 B/pair, which is what the fused kernels move. At a realistic batch
(tens to thousands of pairs) the op is pure per-call overhead; the large size shows bandwidth.
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from bench.common import copy_bandwidth, interleaved, script_main, table, timing_rows, write_csv

BYTES_PER_PAIR = 64


def run(quick=False, csv_dir=None, bandwidth=None):
    sizes = [64, 1 << 20] if quick else [64, 4096, 1 << 22]
    bandwidth = bandwidth or copy_bandwidth()
    compiled = torch.compile(reference.dpo_loss)
    texts = []
    for B in sizes:
        g = torch.Generator().manual_seed(0)
        ins = [(-torch.rand(B, generator=g) * 100).requires_grad_(True) for _ in range(4)]

        def step(fn):
            return lambda: torch.autograd.grad(fn(*ins)[0].mean(), ins)

        fns = {"reference (eager)": step(lambda *a: reference.dpo_loss(*a, 0.1, "sigmoid", 0.1)),
               "reference (torch.compile)": step(lambda *a: compiled(*a, 0.1, "sigmoid", 0.1)),
               "rk cpu": step(lambda *a: rk.dpo_loss(*a, beta=0.1, label_smoothing=0.1, backend="cpu"))}
        res = interleaved(fns, repeats=20 if quick else 30, warmup=3)
        rows = timing_rows(res, "reference (eager)", BYTES_PER_PAIR * B, bandwidth)
        cols = ["impl", "median", "spread", "speedup vs reference (eager)", "GB/s"]
        texts.append(table(f"dpo_loss sigmoid (cDPO eps=0.1), forward+backward, B={B} fp32, "
                           f"{torch.get_num_threads()} threads (copy bandwidth {bandwidth / 1e9:.1f} GB/s)", rows, cols))
        if csv_dir:
            write_csv(f"{csv_dir}/dpo_loss_{B}.csv", rows, cols)
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
