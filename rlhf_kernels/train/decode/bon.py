"""Best-of-n against a proxy reward (one RM or an ensemble aggregated as in ensemble.py,
docs/algorithms.md §7): draw n responses per prompt from the policy, keep the one the proxy scores
highest, and report its mean gold and proxy reward for n = 1, 2, 4, ..., n, with the analytic
KL_bon = log n − (n − 1)/n of the best-of-n policy from the sampling one.

Every subset size m ≤ n is estimated from the same n samples with the unbiased estimator over all
size-m subsets: after sorting a prompt's samples by proxy (ascending), the i-th of them (1-based)
is the best of a uniformly drawn m-subset with probability C(i−1, m−1)/C(n, m).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..._choices import EnsembleReduce
from ..core import models
from ..core.commands import Command
from ..core.config import ConfigError, positive, topic
from ..core.plots import _pyplot, _save
from ..core.run_config import RunConfig
from ..core.runlog import Run
from ..rewards import ensemble
from ..tasks import sentiment
from . import rollout


def kl_bon(n):
    return math.log(n) - (n - 1) / n


def subset_weights(n, m):
    """[n] probabilities that the i-th smallest of n values is the largest of a random m-subset."""
    return torch.tensor([math.comb(i, m - 1) for i in range(n)], dtype=torch.float64) / math.comb(n, m)


def bon_table(proxy, gold, sizes):
    """Expected gold and proxy of the proxy-best of m samples, for each m in `sizes`, from
    proxy/gold [n, P] (n samples of each of P prompts)."""
    n = proxy.shape[0]
    order = proxy.double().argsort(0)
    p_sorted, g_sorted = proxy.double().gather(0, order), gold.double().gather(0, order)
    rows = []
    for m in sizes:
        w = subset_weights(n, m)[:, None]
        rows.append({"n": m, "gold_reward": (w * g_sorted).sum(0).mean().item(),
                     "proxy_reward": (w * p_sorted).sum(0).mean().item(), "kl_bon": kl_bon(m)})
    return rows


def sizes_up_to(n):
    out = [2 ** i for i in range(int(math.log2(n)) + 1)]
    return out if out[-1] == n else out + [n]


@torch.no_grad()
def sample_and_score(policy, rm, cfg, batch=256):
    """proxy and gold [n, P] for n samples of each of cfg.eval_prompts held-out prompts."""
    prompts = sentiment.prompts(cfg.eval_prompts, torch.Generator().manual_seed(rollout.EVAL_SEED))
    rows = prompts.repeat(cfg.n, 1).to(cfg.device)  # sample j of prompt p is row j·P + p
    proxy, gold = [], []
    for i, p in enumerate(rows.split(batch)):
        s = rollout.sample(policy, p, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                           seed=cfg.seed * 1_000_003 + i)
        proxy.append(rm.score(s.ids, s.attn).float().cpu())
        gold.append(sentiment.gold_reward(s.responses.cpu()))
    P = cfg.eval_prompts
    return torch.cat(proxy).view(cfg.n, P), torch.cat(gold).view(cfg.n, P)


def run_bon(cfg):
    if not cfg.reward_model:
        raise ConfigError("bon needs reward_model (a saved RM dir, comma-separated dirs or an ensemble dir)")
    run = Run(cfg, "bon")
    run.write_config()
    torch.manual_seed(cfg.seed)
    policy = models.load_lm(cfg.policy, cfg.device)
    rm = models.freeze(ensemble.load_reward(cfg, cfg.device))
    proxy, gold = sample_and_score(policy, rm, cfg)
    rows = bon_table(proxy, gold, sizes_up_to(cfg.n))
    run.metrics.write_text("".join(json.dumps({"step": r["n"], **r}) + "\n" for r in rows))
    label = f"{len(ensemble.member_dirs(cfg.reward_model))} RM(s), {cfg.ensemble_reduce}"
    plot_bon(rows, run.dir / "curves.png", title=f"best-of-n: {label}")
    result = {"rows": rows, "reward_model": cfg.reward_model, "ensemble_reduce": cfg.ensemble_reduce}
    (run.dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, label))
    return result


def table(rows, label=""):
    lines = [f"best-of-n ({label}): mean over held-out prompts", "",
             "| n | KL_bon | gold reward | proxy reward |", "|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['kl_bon']:.2f} | {r['gold_reward']:.3f} | {r['proxy_reward']:.3f} |" for r in rows]
    return "\n".join(lines)


def plot_bon(rows, path, title=""):
    """Gold (solid, left axis) and proxy (dashed, right axis) against KL_bon."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    kl = [r["kl_bon"] for r in rows]
    ax.plot(kl, [r["gold_reward"] for r in rows], "o-", color="C0", label="gold")
    ax.set_xlabel("KL_bon = log n - (n-1)/n  (nats)")
    ax.set_ylabel("gold reward")
    ax2 = ax.twinx()
    ax2.plot(kl, [r["proxy_reward"] for r in rows], "s--", color="C1", label="proxy")
    ax2.set_ylabel("proxy reward")
    fig.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


bon_key = topic("best-of-n")


@dataclass
class BoNConfig(RunConfig):
    policy: str = bon_key("tiny-llama", "the policy to sample from (a saved SFT model dir)")
    reward_model: str = bon_key("", "proxy: a saved RM dir, comma-separated dirs or an ensemble dir; required")
    n: int = bon_key(16, "largest n; gold and proxy are reported at n = 1, 2, 4, ..., n")
    ensemble_reduce: EnsembleReduce = bon_key("mean", "mean, wco (min over members) or uwo (mean − λ·variance)")
    uwo_lambda: float = bon_key(0.5, "λ of UWO (Coste et al.'s BoN default)")
    uwo_unbiased: bool = bon_key(False, "variance /(k−1) instead of /k")

    def check(self):
        super().check()
        positive(self, "n")
        if self.uwo_lambda < 0:
            raise ConfigError(f"uwo_lambda must be >= 0, got {self.uwo_lambda}")


COMMAND = Command("bon", BoNConfig, run_bon, "best-of-n sampling scored by a reward model or an ensemble")
