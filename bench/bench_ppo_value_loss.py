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

from .common import DEVICE, measure, report, rk_backends, script_main

BYTES_PER_TOKEN = 30


def _inputs(B, T):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(B, T, generator=g)
    old = values + torch.randn(B, T, generator=g) * 0.3
    returns = values + torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    values, old, returns, mask = (t.to(DEVICE) for t in (values, old, returns, mask))
    return values.requires_grad_(True), old, returns, mask


def run(quick=False, csv_dir=None, ceilings=None):
    compiled = torch.compile(reference.ppo_value_loss)
    texts = []
    for B, T in [(64, 1024)] + ([] if quick else [(256, 4096)]):
        values, old, returns, mask = _inputs(B, T)

        def step(fn):
            return lambda: torch.autograd.grad(fn(values, old, returns, mask)[0], values)

        fns = {"reference (eager)": step(lambda *a: reference.ppo_value_loss(*a, 0.2, "token-mean")),
               "reference (torch.compile)": step(lambda *a: compiled(*a, 0.2, "token-mean"))}
        for label, b in rk_backends("ppo_value_loss").items():
            fns[label] = step(lambda *a, b=b: rk.ppo_value_loss(*a, backend=b))
        res, peaks = measure(fns, repeats=20 if quick else 30, warmup=3)
        texts.append(report(f"ppo_value_loss token-mean clip=0.2, forward+backward, {B}x{T} fp32", res,
                            "reference (eager)", ceilings, csv_name=f"ppo_value_loss_{B}x{T}", csv_dir=csv_dir,
                            nbytes=BYTES_PER_TOKEN * B * T, peaks=peaks))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
