"""token_rewards (KL penalty k3 + clipped dense reward + score): rk's kernels vs the eager reference
and torch.compile of it.

Floor: read the mask (1 B), logp, ref_logp and dense (4 B each, fp32), write the rewards (4 B): 17 bytes
per position, plus one score per row. The kernel reads each input once (the last-valid search reads
only the mask, from the row end).
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from .common import DEVICE, measure, report, rk_backends, script_main

KW = dict(kl_coef=0.05, kl_estimator="k3", dense_coef=0.5, dense_clip=1.0, score_position="last")


def _ref(score, mask, logp, ref, dense):
    return reference.token_rewards(score, mask, logp, ref, KW["kl_coef"], KW["kl_estimator"], dense,
                                   KW["dense_coef"], KW["dense_clip"], KW["score_position"])


def run(quick=False, csv_dir=None, ceilings=None):
    compiled = torch.compile(_ref)
    texts = []
    for B, T in [(64, 1024)] + ([] if quick else [(256, 4096)]):
        g = torch.Generator().manual_seed(0)
        score = torch.randn(B, generator=g)
        logp = -torch.rand(B, T, generator=g) * 4
        ref = logp + torch.randn(B, T, generator=g) * 0.3
        dense = torch.randn(B, T, generator=g)
        mask = torch.arange(T) < torch.randint(T // 4, T + 1, (B,), generator=g)[:, None]
        score, mask, logp, ref, dense = args = tuple(t.to(DEVICE) for t in (score, mask, logp, ref, dense))
        fns = {"reference (eager)": lambda: _ref(*args), "reference (torch.compile)": lambda: compiled(*args)}
        for label, b in rk_backends("token_rewards").items():
            fns[label] = lambda b=b: rk.token_rewards(score, mask, logp=logp, ref_logp=ref, dense=dense,
                                                      backend=b, **KW)
            torch.testing.assert_close(fns[label](), _ref(*args))
        res, peaks = measure(fns, repeats=5 if quick else 9)
        texts.append(report(f"token_rewards k3 + dense, {B}x{T} fp32", res, "reference (eager)", ceilings,
                            csv_name=f"token_rewards_{B}x{T}", csv_dir=csv_dir, nbytes=17 * B * T, peaks=peaks))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
