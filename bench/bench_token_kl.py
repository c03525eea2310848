"""token_kl forward+backward: rk's kernels vs the eager reference and torch.compile of it.

Floor (fp32): forward reads logp and ref and writes kl; backward reads the upstream gradient, logp
and ref and writes two gradients: 8 × 4 bytes per token.
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from .common import DEVICE, measure, report, rk_backends, script_main


def run(quick=False, csv_dir=None, ceilings=None):
    B, T = (64, 1024) if quick else (256, 4096)
    logp = (-torch.rand(B, T, device=DEVICE) * 5).requires_grad_(True)
    ref = -torch.rand(B, T, device=DEVICE) * 5
    g = torch.randn(B, T, device=DEVICE)
    compiled = torch.compile(reference.token_kl)

    def step(fn):
        return lambda: torch.autograd.backward(fn(logp, ref, "k3"), g)

    fns = {"reference (eager)": step(lambda a, b, e: reference.token_kl(a, b, e)),
           "reference (torch.compile)": step(lambda a, b, e: compiled(a, b, e))}
    for label, b in rk_backends("token_kl").items():
        fns[label] = step(lambda x, y, e, b=b: rk.token_kl(x, y, estimator=e, backend=b))
    res, peaks = measure(fns, repeats=5 if quick else 9)
    return report(f"token_kl k3, forward+backward, {B}x{T} fp32", res, "reference (eager)", ceilings,
                  csv_name="token_kl", csv_dir=csv_dir, nbytes=4 * B * T * (3 + 5), peaks=peaks)


if __name__ == "__main__":
    script_main(run)
