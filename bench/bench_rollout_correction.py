"""rollout_correction: rk's kernels vs the eager torch composition a trainer writes for TIS / MIS
(masked log-ratio, exp, clamp or mask, then the masked-mean stats one op at a time) and torch.compile of it.

Floor: read old_logp and rollout_logp (4 B each) and the mask (1 B), write the weights (4 B) and mask_out
(1 B): 14 bytes per token. The token level is one pass; the sequence level reads each row twice (its
sum must be known before any weight), from cache for rows of a few thousand tokens.
"""
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from .common import DEVICE, measure, report, rk_backends, script_main


def eager_correction(old, roll, mask, level="token", mode="truncate", low=0.0, high=2.0):
    """Written for this benchmark as a trainer would: weights, mask_out and the four stats."""
    m = mask.to(old.dtype)
    d = (old - roll) * m
    if level == "token":
        lr = d
    else:
        lr = d.sum(-1, keepdim=True)
        if level == "geometric":
            lr = lr / m.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(lr).expand_as(d)
    if mode == "truncate":
        w, keep = ratio.clamp(low, high) * m, mask
    else:
        keep = mask & (ratio >= low) & (ratio <= high)
        w = ratio * keep
    n = m.sum().clamp(min=1)
    stats = {"mismatch_k1": d.sum() / n, "mismatch_k3": ((torch.exp(-d) - 1 + d) * m).sum() / n,
             "masked_fraction": (mask.sum() - keep.sum()) / n, "weight_mean": w.sum() / n}
    return w, keep, stats


def run(quick=False, csv_dir=None, ceilings=None):
    compiled = torch.compile(eager_correction)
    texts = []
    for B, T in [(64, 1024)] + ([] if quick else [(256, 4096)]):
        g = torch.Generator().manual_seed(0)
        old = -torch.rand(B, T, generator=g) * 3
        roll = old + torch.randn(B, T, generator=g) * 0.02
        mask = torch.arange(T) < torch.randint(T // 4, T + 1, (B,), generator=g)[:, None]
        old, roll, mask = old.to(DEVICE), roll.to(DEVICE), mask.to(DEVICE)
        for level, mode, low, name in (("token", "truncate", 0.0, "TIS, token"),
                                       ("geometric", "mask", 0.5, "MIS, geometric")):
            exp = reference.rollout_correction(old.double(), roll.double(), mask, level, mode, low, 2.0)[0]
            fns = {"eager torch": lambda: eager_correction(old, roll, mask, level, mode, low),
                   "eager torch (torch.compile)": lambda: compiled(old, roll, mask, level, mode, low)}
            for label, b in rk_backends("rollout_correction").items():
                fns[label] = lambda b=b: rk.rollout_correction(old, roll, mask, level=level, mode=mode, low=low,
                                                               backend=b)
            for fn in fns.values():
                torch.testing.assert_close(fn()[0].double(), exp, rtol=1e-4, atol=1e-4)
            res, peaks = measure(fns, repeats=5 if quick else 9)
            texts.append(report(f"rollout_correction {name}, {B}x{T} fp32, right-padded", res, "eager torch",
                                ceilings, csv_name=f"rollout_correction_{level}_{B}x{T}", csv_dir=csv_dir,
                                nbytes=14 * B * T, peaks=peaks))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
