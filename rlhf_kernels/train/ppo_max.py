"""The PPO-max tricks (Secrets of RLHF Part I, docs/algorithms.md §2) that the PPO trainer can switch on
one by one: running reward scaling or normalisation, minibatch-level advantage whitening and
advantage clipping, critic pretraining, and the PPO-ptx pretraining loss. The small experience
buffer is `batch_size`/`minibatches`/`epochs` and global grad-norm clipping is `max_grad_norm`.
"""
import torch

import rlhf_kernels as rk

from .._choices import RewardNorm, values
from .core import models
from .core.config import ConfigError
from .tasks.data import demonstration_set

PTX_SALT = 104_729  # separates the ptx draws from the rollout stream of the same step


class RunningMoments:
    """Mean and variance of every score seen so far, merged batch by batch (the parallel form of
    Welford's algorithm, as in the MOSS code): the prior is mean 0, variance 1 with a count of
    1e-24, so it weighs nothing after the first batch; `std` is the unbiased (Bessel) one.
    It has `state_dict`/`load_state_dict` so the trainer checkpoints it like a module."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    @property
    def std(self):
        return (self.var * self.count / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    @torch.no_grad()
    def update(self, x):
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        var, mean = torch.var_mean(x, unbiased=False)
        mean, var = float(mean), float(var)
        delta = mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state):
        self.mean, self.var, self.count = (float(state[k]) for k in ("mean", "var", "count"))


MIN_STD = 1e-8  # a batch of identical first scores has σ = 0; dividing by it would only give inf


def normalize_score(score, moments, mode):
    """Update `moments` with this batch of scores, then PPO-max reward scaling ("scale": r/σ, the
    mean kept because advantages are whitened later) or normalisation ("normalize": (r − μ)/σ),
    with the running μ and σ including this batch. "none" returns the score untouched. The clip
    (±δ) that follows is the trainer's `score_clip`."""
    if mode == "none":
        return score
    moments.update(score)
    std = max(moments.std, MIN_STD)
    if mode == "scale":
        return score / std
    if mode == "normalize":
        return (score - moments.mean) / std
    raise ValueError(f"reward_norm must be one of {', '.join(values(RewardNorm))}, got {mode!r}")


def minibatch_advantages(advantages, rows, mask, cfg):
    """The advantages one minibatch (`rows`) trains on: whitened over that minibatch when
    `advantage_whiten_level="minibatch"` (batch-level whitening happens at rollout time), then
    clamped to ±`advantage_clip`. Returned as a full [B, T] tensor indexed by row, and the very
    same tensor when neither applies, so the default update is unchanged bit for bit."""
    per_mb = cfg.whiten_advantages and cfg.advantage_whiten_level == "minibatch"
    if not per_mb and cfg.advantage_clip is None:
        return advantages
    out = advantages.clone()
    a = out[rows]
    if per_mb:
        a = rk.masked_whiten(a, mask[rows], shift_mean=True, unbiased=cfg.advantage_unbiased)
    if cfg.advantage_clip is not None:
        a = clip_advantages(a, cfg.advantage_clip)
    out[rows] = a
    return out


def clip_advantages(advantages, c):
    return advantages.clamp(-c, c)


def actor_frozen(cfg, step):
    """Critic pretraining: the first `critic_pretrain_steps` iterations update the critic only
    (the actor is neither stepped nor given the ptx loss)."""
    return step <= cfg.critic_pretrain_steps


def ptx_corpus(cfg):
    """The pretraining corpus of PPO-ptx on the embedded task: SFT demonstrations (prompt and
    response), drawn with a seed of their own."""
    return demonstration_set(cfg.ptx_examples, cfg.seed + 7_777)


def ptx_nll(policy, ids, attn, impl="fused"):
    """(sum, count) of the next-token negative log-likelihood of every attended token after the
    first, at temperature 1 (the LM's own distribution), through models.token_logprobs, i.e.
    rk.linear_logprobs on hidden states: no [B, T, V] logits."""
    mask = attn[:, 1:].bool()
    logp = models.token_logprobs(policy, ids, attn, 1, mask, impl=impl)
    return -(logp * mask).sum(), mask.sum()


def ptx_backward(trainer, step, generator):
    """Backpropagate ptx_coef·(token-mean CE) of one batch of the corpus, in micro-batches, and
    return the CE."""
    cfg, data = trainer.cfg, trainer.ptx_data
    idx = torch.randint(0, len(data.prompts), (cfg.ptx_batch_size,), generator=generator)
    ids, attn = data.ids[idx].to(cfg.device), data.attn[idx].to(cfg.device)
    total = attn[:, 1:].sum().clamp(min=1)
    ce = 0.0
    for micro in torch.arange(len(idx)).split(cfg.micro_batch_size):
        nll, _ = ptx_nll(trainer.policy, ids[micro], attn[micro], cfg.logprob_impl)
        loss = nll / total
        trainer.run.check_finite(step, ptx_loss=loss)
        (cfg.ptx_coef * loss).backward()
        ce += float(loss.detach())
    return ce


def check(cfg):
    """The PPO-max, A2C and reference-EMA keys (docs/algorithms.md §2, §5, §1.12)."""
    if cfg.advantage_clip is not None and cfg.advantage_clip <= 0:
        raise ConfigError(f"advantage_clip must be > 0 or null, got {cfg.advantage_clip}")
    if not 0 <= cfg.critic_pretrain_steps < cfg.steps:
        raise ConfigError(f"critic_pretrain_steps must be in [0, steps={cfg.steps}), got {cfg.critic_pretrain_steps}")
    if cfg.ptx_coef < 0:
        raise ConfigError(f"ptx_coef must be >= 0, got {cfg.ptx_coef}")
    for key in ("ptx_batch_size", "ptx_examples"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.optimizer_eps <= 0:
        raise ConfigError(f"optimizer_eps must be > 0, got {cfg.optimizer_eps}")
    if not 0 <= cfg.rmsprop_alpha < 1:
        raise ConfigError(f"rmsprop_alpha must be in [0, 1), got {cfg.rmsprop_alpha}")
    if cfg.ref_ema is not None and not 0 <= cfg.ref_ema <= 1:
        raise ConfigError(f"ref_ema must be in [0, 1] or null, got {cfg.ref_ema}")
    if cfg.reward_norm != "none" and cfg.batch_size < 2:
        raise ConfigError(f"reward_norm={cfg.reward_norm!r} needs batch_size >= 2 (an unbiased std), "
                          f"got {cfg.batch_size}")
