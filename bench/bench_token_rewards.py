"""token_rewards on CPU (KL penalty k3 + clipped dense reward + score): rk cpu vs the eager reference
and torch.compile of it.

Floor: read the mask (1 B), logp, ref_logp and dense (4 B each, fp32), write the rewards (4 B): 17 bytes
per position, plus one score per row. The kernel reads each input once (the last-valid search reads
only the mask, from the row end).
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from bench.common import copy_bandwidth, interleaved, script_main, table, timing_rows, write_csv

KW = dict(kl_coef=0.05, kl_estimator="k3", dense_coef=0.5, dense_clip=1.0, score_position="last")


def _ref(score, mask, logp, ref, dense):
    return reference.token_rewards(score, mask, logp, ref, KW["kl_coef"], KW["kl_estimator"], dense,
                                   KW["dense_coef"], KW["dense_clip"], KW["score_position"])


def run(quick=False, csv_dir=None, bandwidth=None):
    bandwidth = bandwidth or copy_bandwidth()
    compiled = torch.compile(_ref)
    cols = ["impl", "median", "spread", "speedup vs reference (eager)", "GB/s"]
    texts = []
    for B, T in [(64, 1024)] + ([] if quick else [(256, 4096)]):
        g = torch.Generator().manual_seed(0)
        score = torch.randn(B, generator=g)
        logp = -torch.rand(B, T, generator=g) * 4
        ref = logp + torch.randn(B, T, generator=g) * 0.3
        dense = torch.randn(B, T, generator=g)
        mask = torch.arange(T) < torch.randint(T // 4, T + 1, (B,), generator=g)[:, None]
        args = (score, mask, logp, ref, dense)
        fast = lambda: rk.token_rewards(score, mask, logp=logp, ref_logp=ref, dense=dense, backend="cpu", **KW)  # noqa: E731
        torch.testing.assert_close(fast(), _ref(*args))
        fns = {"reference (eager)": lambda: _ref(*args), "reference (torch.compile)": lambda: compiled(*args),
               "rk cpu": fast}
        res = interleaved(fns, repeats=5 if quick else 9)
        rows = timing_rows(res, "reference (eager)", 17 * B * T, bandwidth)
        texts.append(table(f"token_rewards k3 + dense, {B}x{T} fp32 (copy bandwidth {bandwidth / 1e9:.1f} GB/s)",
                           rows, cols))
        if csv_dir:
            write_csv(f"{csv_dir}/token_rewards_{B}x{T}.csv", rows, cols)
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
