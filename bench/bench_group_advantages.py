"""group_advantages: rk's kernels vs the eager torch composition GRPO trainers run (view the scores as
[groups, G], mean and std over the group, broadcast back), torch.compile of it, and for labels in any
order the eager composition through torch.unique and index_add.

Floor: read each score (4 B) and write its advantage (4 B): 8 bytes per sample (plus 8 B of label and
the sort the label path needs). The kernel reads a group three times while it sits in cache.
"""
import torch

import rlhf_kernels as rk

from .common import DEVICE, measure, report, rk_backends, script_main


def eager_grpo(scores, G, eps=1e-6):
    """The composition of TRL-style GRPO trainers (written for this benchmark): group mean and Bessel std."""
    grouped = scores.view(-1, G)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def eager_labelled(scores, ids, eps=1e-6):
    """The same for labels in any order: unique, then per-group sums through index_add (syncs on unique)."""
    _, inv = torch.unique(ids, return_inverse=True)
    k = int(inv.max()) + 1
    zeros = scores.new_zeros(k)
    n = zeros.index_add(0, inv, torch.ones_like(scores))
    mean = (zeros.index_add(0, inv, scores) / n)[inv]
    var = zeros.index_add(0, inv, (scores - mean) ** 2) / (n - 1).clamp(min=1)
    return torch.where(n[inv] > 1, (scores - mean) / (var.sqrt()[inv] + eps), 0.0)


def _check(fns, exp):
    for fn in fns.values():
        torch.testing.assert_close(fn().double(), exp, rtol=1e-4, atol=1e-4)


def run(quick=False, csv_dir=None, ceilings=None):
    compiled = torch.compile(eager_grpo)
    texts = []
    for B, G in [(4096, 8)] + ([] if quick else [(65536, 16), (1 << 20, 64)]):
        scores = torch.randn(B, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        exp = eager_grpo(scores.double(), G)
        fns = {"eager torch (view + mean/std)": lambda: eager_grpo(scores, G),
               "eager torch (torch.compile)": lambda: compiled(scores, G)}
        for label, b in rk_backends("group_advantages").items():
            fns[label] = lambda b=b: rk.group_advantages(scores, G, backend=b)
        _check(fns, exp)
        res, peaks = measure(fns, repeats=5 if quick else 9)
        texts.append(report(f"group_advantages, B={B}, G={G} (GRPO: mean, std), fp32", res,
                            "eager torch (view + mean/std)", ceilings, csv_name=f"group_advantages_{B}x{G}",
                            csv_dir=csv_dir, nbytes=8 * B, peaks=peaks))
        # the same groups under shuffled labels: the path for groups of any size in any order
        ids = (torch.arange(B) // G)[torch.randperm(B, generator=torch.Generator().manual_seed(1))].to(DEVICE)
        exp = eager_labelled(scores.double(), ids)
        fns = {"eager torch (unique + index_add)": lambda: eager_labelled(scores, ids)}
        for label, b in rk_backends("group_advantages").items():
            fns[label] = lambda b=b: rk.group_advantages(scores, group_ids=ids, backend=b)
        _check(fns, exp)
        res, peaks = measure(fns, repeats=5 if quick else 9)
        texts.append(report(f"group_advantages, B={B}, {B // G} groups under shuffled labels, fp32", res,
                            "eager torch (unique + index_add)", ceilings, csv_name=f"group_advantages_ids_{B}x{G}",
                            csv_dir=csv_dir, nbytes=16 * B, peaks=peaks))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
