"""masked_whiten: rk's kernels vs the eager reference, torch.compile of it, and the composition TRL's
PPO trainer used (masked mean, masked unbiased variance, then the whitening, one torch op at a time;
written here, as TRL 1.16 no longer ships a PPO trainer or its masked_whiten helper).

Floor: the statistics are needed before the first output, so a tensor larger than the caches is read
twice: 2 × (4 B of x + 1 B of mask) + 4 B written = 14 bytes per element (9 if it stays in cache).
The kernel does exactly that: per-chunk moments while the chunk sits in L1, then the elementwise pass.
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from .common import DEVICE, measure, report, rk_backends, script_main


def trl_style_whiten(x, mask, shift_mean=True):
    """Masked mean, then masked variance with Bessel's correction, as TRL's helpers composed them."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def run(quick=False, csv_dir=None, ceilings=None):
    compiled = torch.compile(reference.masked_whiten)
    texts = []
    for B, T in [(64, 1024)] + ([] if quick else [(256, 4096), (1024, 4096)]):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(B, T, generator=g) * 2 + 1).to(DEVICE)
        mask = (torch.arange(T) < torch.randint(T // 4, T + 1, (B,), generator=g)[:, None]).to(DEVICE)
        exp = reference.masked_whiten(x.double(), mask, True, True)
        torch.testing.assert_close(trl_style_whiten(x, mask).double(), exp, rtol=1e-4, atol=1e-4)
        fns = {"reference (eager)": lambda: reference.masked_whiten(x, mask, True, True),
               "reference (torch.compile)": lambda: compiled(x, mask, True, True),
               "TRL-style composition": lambda: trl_style_whiten(x, mask)}
        for label, b in rk_backends("masked_whiten").items():
            fns[label] = lambda b=b: rk.masked_whiten(x, mask, unbiased=True, backend=b)
            torch.testing.assert_close(fns[label]().double(), exp, rtol=1e-5, atol=1e-5)
        res, peaks = measure(fns, repeats=5 if quick else 9)
        texts.append(report(f"masked_whiten unbiased, {B}x{T} fp32", res, "reference (eager)", ceilings,
                            csv_name=f"masked_whiten_{B}x{T}", csv_dir=csv_dir, nbytes=14 * B * T, peaks=peaks))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
