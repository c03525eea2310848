"""Reward-model ensembles (docs/algorithms.md §7, Coste et al.): k reward models trained on the same
preference data with different seeds (initialisation and data order), whose scores [k, B] are
aggregated per response by

    mean: (1/k) Σ_i R_i        wco: min_i R_i        uwo: (1/k) Σ_i R_i − λ·Var_i(R_i)

UWO's variance is biased (/k) by default: it is the formula of the paper and of the authors'
best-of-n code, and it is defined for every k (a single RM gives Var = 0, so UWO reduces to it).
`unbiased=True` divides by k − 1 as their PPO code does (torch.var); that equals the biased form
with λ scaled by k/(k − 1).

An ensemble on disk is a directory written by `rlhf-kernels train rm --ensemble=k` (member_0 ...
member_{k-1}, each a full RM run with its model/), or a comma-separated list of saved RM dirs.
"""
import re
from pathlib import Path

import torch

from ..._choices import EnsembleReduce, values
from ..core.config import ConfigError
from ..core.models import HEAD_FILE, ScalarModel

REDUCES = values(EnsembleReduce)


def reduce_scores(scores, reduce="mean", uwo_lambda=0.1, unbiased=False):
    """Aggregate member scores [k, B] into one score per response [B] (float32 or the input's float type)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores must be a [k, B] tensor with k >= 1, got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if reduce not in REDUCES:
        raise ValueError(f"ensemble_reduce must be one of {', '.join(REDUCES)}, got {reduce!r}")
    k = scores.shape[0]
    if reduce == "mean":
        return scores.mean(0)
    if reduce == "wco":
        return scores.amin(0)
    if unbiased and k < 2:
        raise ValueError("uwo_unbiased=True needs at least 2 ensemble members (the unbiased variance divides "
                         "by k - 1), got k=1; use uwo_unbiased=False or more reward models")
    return scores.mean(0) - uwo_lambda * scores.var(0, correction=1 if unbiased else 0)


class EnsembleRM(torch.nn.Module):
    """k reward models scored together; `score` is their aggregate, and `stats` describes the last
    batch scored (member mean and member disagreement, for the logs)."""

    def __init__(self, members, reduce="mean", uwo_lambda=0.1, unbiased=False):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one reward model")
        reduce_scores(torch.zeros(len(members), 1), reduce, uwo_lambda, unbiased)  # validate up front
        self.members = torch.nn.ModuleList(members)
        self.reduce, self.uwo_lambda, self.unbiased = reduce, uwo_lambda, unbiased
        self.stats = {}

    def scores(self, ids, attn):
        return torch.stack([m.score(ids, attn) for m in self.members])

    def score(self, ids, attn):
        s = self.scores(ids, attn)
        self.stats = {"proxy_member_mean": s.mean().item(),
                      "proxy_member_std": s.std(0, correction=0).mean().item()}
        return reduce_scores(s, self.reduce, self.uwo_lambda, self.unbiased)


def _member_index(path):
    m = re.fullmatch(r"member_(\d+)", Path(path).parent.name)
    return int(m.group(1)) if m else -1


def member_dirs(spec):
    """The saved RM directories named by `spec`: comma-separated dirs, or an ensemble dir (its
    member_i/model in order of i), or one RM dir."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"reward_model must name one or more saved reward models, got {spec!r}")
    if len(parts) == 1 and not Path(parts[0], HEAD_FILE).is_file():
        found = sorted(Path(parts[0]).glob("member_*/model"), key=_member_index)
        if found:
            return [str(p) for p in found]
    return parts


def load_reward(cfg, device="cpu"):
    """The reward of a PPO/BoN config: a ScalarModel when `reward_model` names one RM (and the
    reduction is defined for one), else an EnsembleRM over all of them."""
    dirs = member_dirs(cfg.reward_model)
    if cfg.ensemble_reduce == "uwo" and cfg.uwo_unbiased and len(dirs) < 2:
        raise ConfigError(f"uwo_unbiased=true needs at least 2 reward models (the unbiased variance divides by "
                          f"k - 1), but reward_model={cfg.reward_model!r} names {len(dirs)}")
    members = [ScalarModel.load(d, device) for d in dirs]
    if len(members) == 1:
        return members[0]
    return EnsembleRM(members, cfg.ensemble_reduce, cfg.uwo_lambda, cfg.uwo_unbiased).to(device)


def first_member(rm):
    """The RM a critic is initialised from (N+ critic_init="reward"): member 0 of an ensemble."""
    return rm.members[0] if isinstance(rm, EnsembleRM) else rm


