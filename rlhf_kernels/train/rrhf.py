"""RRHF (docs/algorithms.md §6, Yuan et al. 2023): rank several responses per prompt by a reward and
train the policy's length-normalised sequence log-probs to follow that ranking, plus the SFT loss
on the best response.

One step: `batch_size` prompts; for each, `samples` responses sampled from the current policy
(rollout.sample) and `demonstrations` SFT demonstrations drawn from the task's data (the paper
mixes model samples with the dataset's responses: k = 4 samples plus the 2 HH responses); every
candidate scored by the reward model or the gold reward; one optimizer step on `rrhf_loss` with
gradient accumulation over micro-batches of prompts (each micro-batch holds all the candidates of
its prompts, since the loss couples them). Policy log-probs come from models.token_logprobs
(rk.linear_logprobs on the hidden states) at temperature 1: RRHF scores the model itself, the
sampling temperature only shapes the candidates.
"""
from dataclasses import dataclass

import torch

from .._choices import NoEOSPenalty, SFTAggregation, values
from .core import models
from .core.commands import Command
from .core.config import ConfigError, topic
from .core.optim import make_optimizer
from .core.run_config import RunConfig, optim_key
from .core.runlog import Run, clip_and_step, finish, loop, step_generator
from .decode import rollout
from .tasks import sentiment

SFT_AGGREGATIONS = values(SFTAggregation)


def rrhf_loss(logp, mask, rewards, *, length_penalty=1.0, rrhf_weight=1.0, sft_aggregation="padded-mean",
              padded_length=None):
    """RRHF loss of B prompts with k candidates each, averaged over the prompts.

    logp [B·k, T]: token log-probs of the responses (row b·k + i is candidate i of prompt b);
    mask [B·k, T]: valid response tokens; rewards [B, k]. Per prompt:
      p_i    = Σ_t m·logp_i,t / ‖y_i‖^length_penalty          (‖y_i‖ = number of valid tokens)
      L_rank = Σ_{r_i < r_j} max(0, p_i − p_j)                 (equal rewards: no term)
      L_ft   = −Σ_t m·logp_best,t, aggregated by `sft_aggregation`:
               "padded-mean" divides by `padded_length` (default T): the source's code, which takes
               the mean over the padded row, padding and prompt positions included;
               "token-sum" is the paper's formula; "token-mean" divides by ‖y_best‖.
      L      = rrhf_weight·L_rank + L_ft
    best = argmax_i r_i (the first candidate among equal maxima). Returns (loss, stats), stats
    being detached float32 scalars.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, k], got shape {tuple(rewards.shape)}")
    B, k = rewards.shape
    if logp.dim() != 2 or logp.shape[0] != B * k:
        raise ValueError(f"logp must be [B·k, T] = [{B * k}, T] for rewards of shape {tuple(rewards.shape)}, "
                         f"got {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask must have logp's shape {tuple(logp.shape)}, got {tuple(mask.shape)}")
    if sft_aggregation not in SFT_AGGREGATIONS:
        raise ValueError(f"sft_aggregation must be one of {', '.join(SFT_AGGREGATIONS)}, got {sft_aggregation!r}")
    T = logp.shape[1]
    padded_length = T if padded_length is None else padded_length
    if padded_length < T:
        raise ValueError(f"padded_length must be >= the number of response positions {T}, got {padded_length}")

    mask = mask.bool()
    lp = torch.where(mask, logp, torch.zeros_like(logp))
    seq = lp.sum(-1)
    lengths = mask.sum(-1).clamp(min=1).to(lp.dtype)
    p = (seq / lengths ** length_penalty).view(B, k)

    diff = p[:, :, None] - p[:, None, :]                     # [b, i, j] = p_i − p_j
    ranked = rewards[:, :, None] < rewards[:, None, :]       # r_i < r_j
    hinge = torch.relu(diff) * ranked
    rank = hinge.sum((1, 2))

    best = rewards.argmax(1)
    rows = torch.arange(B, device=logp.device) * k + best
    ft = -seq[rows]
    if sft_aggregation == "padded-mean":
        ft = ft / padded_length
    elif sft_aggregation == "token-mean":
        ft = ft / lengths[rows]
    loss = (rrhf_weight * rank + ft).mean()

    with torch.no_grad():
        pairs = ranked.sum()
        stats = {"rank_loss": rank.mean(), "sft_loss": ft.mean(),
                 # share of ordered pairs (r_i < r_j) whose log-probs disagree (p_i > p_j)
                 "rank_violations": ((diff > 0) & ranked).sum() / pairs.clamp(min=1),
                 "best_logp": p[torch.arange(B, device=p.device), best].mean()}
        stats = {name: v.detach().float() for name, v in stats.items()}
    return loss, stats


def pad_to(samples, width):
    """`samples` with its responses right-padded (masked) to `width` columns."""
    extra = width - samples.responses.shape[1]
    if extra == 0:
        return samples
    return rollout.Samples(samples.prompts, torch.nn.functional.pad(samples.responses, (0, extra), value=sentiment.PAD),
                           torch.nn.functional.pad(samples.mask, (0, extra), value=False), samples.has_eos)


def interleave(parts, B):
    """Concatenate per-prompt candidate groups: each part holds B·n_part rows, prompt-major; the
    result holds B·Σn rows, the candidates of prompt b in rows b·Σn .. (b+1)·Σn − 1, parts in order."""
    def join(name):
        ts = [getattr(s, name) for s in parts]
        return torch.cat([t.reshape(B, -1, *t.shape[1:]) for t in ts], 1).reshape(-1, *ts[0].shape[1:])
    return rollout.Samples(join("prompts"), join("responses"), join("mask"), join("has_eos"))


class RRHF:
    kind = "rrhf"

    def __init__(self, cfg):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.policy = models.load_lm(cfg.policy, cfg.device)
        self.rm = (None if cfg.reward_model == "gold" else
                   models.freeze(models.ScalarModel.load(cfg.reward_model, cfg.device)))
        self.optimizer = make_optimizer([(self.policy.parameters(), cfg.lr)])

    def candidates(self, step, g):
        """Samples of B·(samples + demonstrations) rows, prompt-major, the policy's samples first."""
        cfg = self.cfg
        prompts = sentiment.prompts(cfg.batch_size, g).to(cfg.device)
        parts = [rollout.sample(self.policy, prompts.repeat_interleave(cfg.samples, 0), temperature=cfg.temperature,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + step)]
        if cfg.demonstrations:
            demo, mask, has_eos = rollout.truncate_after_eos(sentiment.demonstrations(cfg.batch_size * cfg.demonstrations, g))
            parts.append(rollout.Samples(prompts.repeat_interleave(cfg.demonstrations, 0), demo.to(cfg.device),
                                         mask.to(cfg.device), has_eos.to(cfg.device)))
        width = max(s.responses.shape[1] for s in parts)
        return interleave([pad_to(s, width) for s in parts], cfg.batch_size)

    @torch.no_grad()
    def score(self, s, batch=256):
        """The ranking reward: gold or the reward model's score, then PPO's no-<eos> penalty (a reward model
        scores a response cut at max_new_tokens as if it were whole, and the ranking learns to never end)."""
        cfg = self.cfg
        if self.rm is None:
            raw = sentiment.gold_reward(s.responses.cpu()).to(s.prompts.device)
        else:
            ids, attn = s.ids, s.attn
            raw = torch.cat([self.rm.score(ids[r], attn[r]) for r in torch.arange(len(ids)).split(batch)]).float()
        return rollout.penalize_no_eos(raw, s.has_eos.to(raw.device), cfg.no_eos_penalty, cfg.penalty_value)

    def accumulate(self, s, rewards, step):
        """Backpropagate the batch's RRHF loss (mean over prompts) in micro-batches of prompts;
        return the loss and its stats."""
        cfg = self.cfg
        B, n = rewards.shape
        ids, attn = s.ids, s.attn
        padded = ids.shape[1] - 1  # positions with a next-token label in the source's padded row
        sums = {"loss": 0.0, "rank_loss": 0.0, "sft_loss": 0.0, "rank_violations": 0.0, "best_logp": 0.0}
        for micro in torch.arange(B, device=ids.device).split(cfg.micro_batch_size):
            rows = (micro[:, None] * n + torch.arange(n, device=ids.device)).reshape(-1)
            lp = models.token_logprobs(self.policy, ids[rows], attn[rows], s.start, s.mask[rows],
                                       impl=cfg.logprob_impl)
            loss, st = rrhf_loss(lp, s.mask[rows], rewards[micro], length_penalty=cfg.length_penalty,
                                 rrhf_weight=cfg.rrhf_weight, sft_aggregation=cfg.sft_aggregation,
                                 padded_length=padded)
            w = len(micro) / B  # rrhf_loss averages over its prompts; this makes the batch's mean
            self.run.check_finite(step, loss=loss)
            (w * loss).backward()
            sums["loss"] += w * loss.item()
            for name, v in st.items():
                sums[name] += w * v.item()
        return sums

    def step(self, step):
        cfg = self.cfg
        B, n = cfg.batch_size, cfg.samples + cfg.demonstrations
        s = self.candidates(step, step_generator(cfg, step))
        rewards = self.score(s).view(B, n)
        ids, attn = s.ids, s.attn
        sums = self.accumulate(s, rewards, step)
        grad_norm = clip_and_step(self.run, step, self.optimizer, self.policy.parameters(), cfg.max_grad_norm)
        sampled = rewards[:, :cfg.samples]
        own = torch.arange(B * n, device=ids.device).view(B, n)[:, :cfg.samples].reshape(-1)
        metrics = {**sums, "grad_norm": grad_norm,
                   "gold_reward": sentiment.gold_reward(s.responses[own].cpu()).mean().item(),
                   "score": sampled.mean().item(), "best_score": rewards.max(1).values.mean().item(),
                   "best_is_demonstration": (rewards.argmax(1) >= cfg.samples).float().mean().item(),
                   "no_eos": (~s.has_eos[own]).float().mean().item(),
                   "response_len": s.mask[own].sum(1).float().mean().item()}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["eval_gold_reward"] = rollout.evaluate_cfg(self.policy, cfg)["gold_reward"]
        generated = len(own) * cfg.max_new_tokens
        return metrics, int(attn.sum()) + generated

    def train(self):
        self.run = Run(self.cfg, self.kind)
        loop(self.run, {"policy": self.policy}, self.optimizer, self.step)
        models.save_lm(self.policy, self.run.dir / "model")
        return finish(self.run, {"model": str(self.run.dir / "model"), **rollout.evaluate_cfg(self.policy, self.cfg)})


def train(cfg):
    return RRHF(cfg).train()


model_key = topic("model and reward")
rank_key = topic("RRHF ranking")


@dataclass
class RRHFConfig(RunConfig):
    policy: str = model_key("tiny-llama", "initial policy (a saved SFT model dir)")
    reward_model: str = model_key("gold", "a saved RM dir, or \"gold\" for the programmatic reward")
    no_eos_penalty: NoEOSPenalty = model_key("replace", "candidates without <eos>: their score replaced by "
                                                        "(replace) or lowered by (subtract) penalty_value, or none")
    penalty_value: float = model_key(-10.0, "the no-<eos> penalty; a ranking needs it below the reward's range "
                                            "(EasyLM's value: -10), so that cut-off candidates rank last")
    batch_size: int = optim_key(16, "prompts per step (each with samples + demonstrations candidates)")
    micro_batch_size: int = optim_key(4, "prompts per micro-batch; a prompt's candidates stay together")
    samples: int = rank_key(4, "k responses per prompt sampled from the current policy (paper: 4)")
    demonstrations: int = rank_key(2, "SFT demonstrations per prompt as extra candidates (paper: the 2 HH responses)")
    length_penalty: float = rank_key(1.0, "α in p_i = Σ_t log π / ‖y_i‖^α (1: length-normalised)")
    rrhf_weight: float = rank_key(1.0, "L = rrhf_weight·L_rank + L_ft (paper and train.sh: 1)")
    sft_aggregation: SFTAggregation = rank_key("padded-mean", "L_ft: padded-mean (source code), token-sum (paper), "
                                                          "token-mean")
    steps: int = 30
    lr: float = 1e-3
    eval_every: int = 10

    def check(self):
        super().check()
        if self.samples < 1 or self.demonstrations < 0 or self.samples + self.demonstrations < 2:
            raise ConfigError(f"rrhf ranks at least 2 candidates per prompt: samples must be >= 1 and "
                              f"demonstrations >= 0 with samples + demonstrations >= 2, got samples={self.samples}, "
                              f"demonstrations={self.demonstrations}")
        for key in ("length_penalty", "rrhf_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")


COMMAND = Command("train rrhf", RRHFConfig, train, "RRHF: rank sampled and demonstrated responses by reward",
                  print_result=True)
