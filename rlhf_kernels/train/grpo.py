"""GRPO and its variants (docs/grpo.md): G responses per prompt, advantages relative to the group
(rk.group_advantages), no critic, the clipped policy loss with the variant's options (rk.ppo_policy_loss:
ratio level, CISPO, KL in the loss, the aggregation's denominator), and the trainer-sampler mismatch of
bf16 rollouts corrected by rk.rollout_correction.

One iteration: `batch_size` prompts, each repeated `group_size` times; responses sampled by the Sampler
(the policy, or its bf16 copy with `rollout_dtype=bf16`); old log-probs recomputed by the fp32 policy in
the same micro-batches as the first update epoch (so the first minibatch's ratio is exactly 1), the
sampler's own log-probs when it is a separate model, reference log-probs when kl_coef > 0; scores by the
gold reward or a reward model; group advantages, one per response; then `epochs` × `minibatches`
optimizer steps with gradient accumulation over micro-batches.

The denominator of each minibatch's loss (`denominator`):
  global   the minibatch's count (valid tokens for token-mean, non-empty rows for the seq-mean forms),
           passed to every micro-batch, so the accumulated gradient is the minibatch's exactly;
  local    each micro-batch divides by its own count and the micro-batch losses are averaged, as
           frameworks that accumulate per-micro-batch means do (the bias of trl#3823);
  max_len  Dr. GRPO's constant: rows × max_new_tokens, with aggregation token-mean.
"""
import functools
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

import rlhf_kernels as rk

from .._choices import (
    Aggregation,
    GroupBaseline,
    GroupScale,
    GRPODenominator,
    KLEstimator,
    NoEOSPenalty,
    PolicyLossType,
    RatioLevel,
    RCLevel,
    RolloutCorrection,
    RolloutDtype,
    Task,
)
from . import tasks
from .core import lora, models, parallel
from .core.commands import Command
from .core.config import ConfigError, topic
from .core.optim import make_optimizer
from .core.run_config import RunConfig, optim_key
from .core.runlog import Run, clip_and_step, finish, loop, step_generator
from .decode import rollout
from .presets import GRPO_PRESETS
from .tasks import sentiment

# rollout_correction -> (rk.rollout_correction mode, default level, low, high): TIS truncates token ratios
# at 2; MIS drops whole sequences whose ratio leaves (0, 2]; IcePop drops tokens outside [0.5, 5]
CORRECTIONS = {"tis": ("truncate", "token", None, 2.0), "mis": ("mask", "sequence", None, 2.0),
               "icepop": ("mask", "token", 0.5, 5.0)}
STATS = ("pg_loss", "clipfrac", "approx_kl", "ratio_mean", "kl", "weight_mean")


def correction_args(cfg):
    """Keyword arguments of rk.rollout_correction for the run's correction (its stats are logged even
    with `none`: they measure the mismatch)."""
    mode, level, low, high = CORRECTIONS.get(cfg.rollout_correction, ("truncate", "token", None, None))
    return {"mode": mode, "level": cfg.rc_level or level, "low": low if cfg.rc_low is None else cfg.rc_low,
            "high": high if cfg.rc_high is None else cfg.rc_high}


def minibatch_denominator(cfg, mask, par=None):
    """The divisor `denominator` passes to rk.ppo_policy_loss for the minibatch whose mask is `mask`
    (None: each micro-batch's own count). Under torchrun `mask` is this rank's part of the minibatch
    and the count is the job's (all-reduced)."""
    par = par or parallel.Single()
    if cfg.denominator == "local" or cfg.aggregation == "token-sum":
        return None
    if cfg.denominator == "max_len":
        return par.sum(float(mask.shape[0] * cfg.max_new_tokens))
    if cfg.aggregation == "token-mean":
        return par.sum(float(mask.sum()))
    return par.sum(float(mask.any(-1).sum()))


class GRPO:
    kind = "grpo"

    def __init__(self, cfg):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.par = par = parallel.setup(cfg)  # under torchrun: sets cfg.device to this rank's GPU
        if par.mode == "fsdp" and cfg.rollout_dtype != "fp32":
            raise ConfigError("rollout_dtype=bf16 with fsdp: the sampler copy is refreshed from whole weights; "
                              "use DDP (fsdp=false) or fp32 rollouts")
        if cfg.tp_head and cfg.rollout_dtype != "fp32":
            raise ConfigError("rollout_dtype=bf16 with tp_head: the sampler copy is refreshed from the whole head; "
                              "use fp32 rollouts or tp_head=false")
        dev = cfg.device
        self.task = tasks.get(cfg.task)
        self.policy = lora.wrap(models.load_lm(cfg.policy, dev, len(self.task.WORDS)), cfg)
        self.ref = models.freeze(models.load_reference(cfg.ref, self.policy, dev)) if cfg.kl_coef > 0 else None
        self.rm = (None if cfg.reward_model == "gold" else
                   models.freeze(models.ScalarModel.load(cfg.reward_model, dev)))
        self.sampler = rollout.Sampler(self.policy, cfg.rollout_dtype)
        # DDP or FSDP2 around the policy (and FSDP2 around the reference); the optimizer then sees the shards
        self.forward = par.wrap_lm(self.policy)
        self.forwards = {id(self.policy): self.forward}
        if self.ref is not None:
            self.forwards[id(self.ref)] = par.wrap_lm(self.ref, trainable=False)
        self.policy_sampler = par.sampler(self.forward, self.policy)
        self.optimizer = make_optimizer([(self.policy.parameters(), cfg.lr)])

    def logprobs(self, model, s, rows):
        """Token log-probs of `model` (through its DDP/FSDP2 wrapper when it has one). The policy's (and the
        rollout copy's) log-probs replay the sampler's top-k / top-p cut; the reference keeps its full distribution."""
        replay = self.cfg.replay() if model is not self.ref else {}
        forward = self.forwards.get(id(model), functools.partial(models.token_logprobs, model))
        return forward(s.ids[rows], s.attn[rows], s.start, s.mask[rows], temperature=self.cfg.temperature,
                       impl=self.cfg.logprob_impl, **replay)

    def score(self, s):
        if self.rm is None:
            return self.task.gold_reward(s.responses.cpu()).to(s.prompts.device)
        return self.rm.score(s.ids, s.attn).float()

    @torch.no_grad()
    def make_experience(self, step, g):
        cfg, par = self.cfg, self.par
        G = cfg.group_size
        # this rank's share of the prompts, whole groups (G rows each), sampled with its own seed
        prompts = sentiment.prompts(cfg.batch_size, g)[par.rows(cfg.batch_size)].to(cfg.device)
        prompts = prompts.repeat_interleave(G, 0)
        n = len(prompts)
        sampler = self.sampler.sync() if self.sampler.separate else self.policy_sampler
        s = rollout.sample(sampler, prompts, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           max_new_tokens=cfg.max_new_tokens, seed=par.seed(cfg.seed * 1_000_003 + step))
        order = torch.randperm(n, generator=g).to(cfg.device)  # also the first epoch's order
        mb = cfg.micro_batch_size
        old_logp = rollout.chunked(lambda r: self.logprobs(self.policy, s, r), order, mb)
        s.mask = rollout.replayable(s.mask, old_logp)
        rollout_logp = (rollout.chunked(lambda r: self.logprobs(self.sampler.copy, s, r), order, mb).float()
                        if self.sampler.separate else old_logp)
        ref_logp = rollout.chunked(lambda r: self.logprobs(self.ref, s, r), order, mb) if self.ref is not None else None
        raw = self.score(s)
        score = rollout.penalize_no_eos(raw, s.has_eos, cfg.no_eos_penalty, cfg.penalty_value)
        advantages = rk.group_advantages(score.float(), G, baseline=cfg.baseline, scale=cfg.scale)
        weights, mask, rc = rk.rollout_correction(old_logp, rollout_logp, s.mask, **correction_args(cfg))
        if cfg.rollout_correction == "none":
            weights, mask = None, s.mask
        if par.world > 1:  # the mismatch statistics of the job's batch
            _, _, rc = rk.rollout_correction(par.gather(old_logp), par.gather(rollout_logp), par.gather(s.mask),
                                             **correction_args(cfg))
        # statistics of the job's batch: every rank's rows gathered (the identity on one process)
        g_resp, g_mask = par.gather(s.responses).cpu(), par.gather(s.mask)
        groups = par.gather(score).view(cfg.batch_size, G)
        stats = {"gold_reward": self.task.gold_reward(g_resp).mean().item(),
                 "score": par.gather(raw.float()).mean().item(), "score_group_std": groups.std(1).mean().item(),
                 "uniform_groups": (groups == groups[:, :1]).all(1).float().mean().item(),
                 "no_eos": (~par.gather(s.has_eos)).float().mean().item(),
                 "response_len": g_mask.sum(1).float().mean().item(),
                 **{f"rollout_{k}": float(v) for k, v in rc.items()}, **self.task.metrics(g_resp)}
        return dict(samples=s, order=order, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages,
                    weights=weights, mask=mask, stats=stats)

    def micro_loss(self, ex, micro, denominator):
        cfg, s = self.cfg, ex["samples"]
        logp = self.logprobs(self.policy, s, micro)
        pick = (lambda t: None if t is None else t[micro])
        # a token the updated policy's cut leaves out has logp = −inf: it leaves the loss
        mask = ex["mask"][micro] & torch.isfinite(logp)
        loss, st = rk.ppo_policy_loss(logp, ex["old_logp"][micro], ex["advantages"][micro], mask,
                                      clip_low=cfg.clip_low, clip_high=cfg.clip_high, aggregation=cfg.aggregation,
                                      ratio_level=cfg.ratio_level, loss_type=cfg.loss_type,
                                      weights=pick(ex["weights"]), ref_logp=pick(ex["ref_logp"]),
                                      kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, denominator=denominator)
        return logp, loss, st

    def step(self, step):
        cfg = self.cfg
        g = step_generator(cfg, step)
        ex = self.make_experience(step, g)
        s, par = ex["samples"], self.par
        n = len(s.prompts)  # this rank's rows
        mb_size = n // cfg.minibatches
        sums, ratio_max, first_dev, n_mb = {"pg_loss": 0.0}, 0.0, None, 0
        local_mean = cfg.denominator == "local" and cfg.aggregation != "token-sum"  # see minibatch_denominator
        for epoch in range(cfg.epochs):
            order = ex["order"] if epoch == 0 else torch.randperm(n, generator=g).to(cfg.device)
            for mb in order.split(mb_size):
                micros = mb.split(cfg.micro_batch_size)
                denominator = minibatch_denominator(cfg, ex["mask"][mb], par)
                for i, micro in enumerate(micros):
                    par.sync_grads(self.forward, last=i == len(micros) - 1)
                    logp, loss, st = self.micro_loss(ex, micro, denominator)
                    # local: the mean of the micro-batch means; otherwise the shared divisor already sums
                    # the micro-batch losses to the minibatch's (token-sum needs none)
                    w = 1.0 / len(micros) if denominator is None and cfg.aggregation != "token-sum" else 1.0
                    self.run.check_finite(step, policy_loss=loss)
                    # a shared divisor (or token-sum) makes each rank's loss its share of the job's, scaled
                    # because DDP/FSDP2 average gradients; `local` means of means are averaged as they are
                    (w * (loss if local_mean else par.scale(loss))).backward()
                    if first_dev is None:  # the rollout forward and this one must agree exactly
                        d = (logp.detach() - ex["old_logp"][micro]).abs().masked_fill(~s.mask[micro], 0)
                        first_dev = d.max().item()
                    share = len(micro) / len(mb)  # stats are local means: weight them by rows
                    sums["pg_loss"] += w * float(loss.detach())
                    for k in STATS[1:]:
                        if k in st:  # kl with a reference, weight_mean with a correction
                            sums[k] = sums.get(k, 0.0) + share * float(st[k])
                    ratio_max = max(ratio_max, float(st["ratio_max"]))
                n_mb += 1
                sums.setdefault("grad_norm", 0.0)
                sums["grad_norm"] += clip_and_step(self.run, step, self.optimizer, self.policy.parameters(),
                                                   cfg.max_grad_norm)
        if par.world > 1:  # pg_loss: shares of the job's loss (or a mean of means); stats: per-rank means
            summed = par.sum_metrics(sums, keep=("grad_norm",))
            sums = {k: v if k == "grad_norm" or (k == "pg_loss" and not local_mean) else v / par.world
                    for k, v in summed.items()}
        metrics = {**ex["stats"], **{k: v / n_mb for k, v in sums.items()}, "ratio_max": par.max(ratio_max),
                   "ratio_dev_first_minibatch": par.max(first_dev)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = rollout.evaluate_cfg(self.policy_sampler, cfg)
            metrics.update({f"eval_{k}": ev[k] for k in ("gold_reward", *self.task.METRICS)})
        forwards = 1 + cfg.epochs + self.sampler.separate + (self.ref is not None)
        return metrics, int(s.attn.sum()) * forwards

    def train(self):
        self.run = Run(self.cfg, self.kind, self.par)
        loop(self.run, {"policy": self.policy}, self.optimizer, self.step)
        self.par.save(self.forward, lambda m: models.save_lm(m.lm, self.run.dir / "model"))
        return finish(self.run, {"model": str(self.run.dir / "model"),
                                 **rollout.evaluate_cfg(self.policy_sampler, self.cfg),
                                 **lora.summary(self.policy)})


def train(cfg):
    return GRPO(cfg).train()


model_key = topic("models and reward")
group_key = topic("groups and advantages")
loss_key = topic("GRPO loss (rk.ppo_policy_loss)")
rollout_key = topic("rollout precision and correction (rk.rollout_correction)")


@dataclass
class GRPOConfig(RunConfig):
    PRESETS: ClassVar[dict] = GRPO_PRESETS
    policy: str = model_key("tiny-llama", "initial policy (saved SFT model dir); also the reference unless `ref`")
    ref: str = model_key("", "reference policy of the KL term; \"\": the initial policy")
    reward_model: str = model_key("gold", "a saved RM dir, or \"gold\" for the programmatic reward")
    task: Task = model_key("sentiment", "the embedded task, or confidence (responses state a confidence)")
    no_eos_penalty: NoEOSPenalty = model_key("none", "responses without <eos>: replace (N+) or subtract (TRL) "
                                                     "penalty_value, or none (the gold reward gives them 0)")
    penalty_value: float = model_key(-1.0, "the no-<eos> penalty")
    steps: int = optim_key(30, "GRPO iterations (rollout + update)")
    batch_size: int = optim_key(16, "prompts per iteration (each sampled group_size times)")
    micro_batch_size: int = optim_key(32, "responses per micro-batch (gradient accumulation)")
    minibatches: int = optim_key(2, "minibatches per epoch (each one optimizer step)")
    epochs: int = optim_key(1, "update epochs over each batch of rollouts (1: on-policy up to the first step)")
    lr: float = 5e-4
    eval_every: int = 10
    preset: str = loss_key("", "a published variant: grpo, dr_grpo, dapo, gspo, cispo (GRPO_PRESETS, "
                               "docs/grpo.md), applied under the config file and the overrides")
    group_size: int = group_key(8, "G: responses per prompt")
    baseline: GroupBaseline = group_key("mean", "group baseline: mean (GRPO), leave_one_out (RLOO) or none")
    scale: GroupScale = group_key("std", "divide by the group's std (GRPO) or none (Dr. GRPO)")
    loss_type: PolicyLossType = loss_key("ppo", "ppo: the clipped surrogate; cispo: the detached clipped ratio "
                                                "weighs the log-prob")
    ratio_level: RatioLevel = loss_key("token", "token, or sequence (GSPO: the row's length-normalised ratio)")
    clip_low: float = loss_key(0.2, "ε_low of the clipped ratio (unused by cispo)")
    clip_high: Optional[float] = loss_key(None, "ε_high of the clipped ratio; null: clip_low")
    aggregation: Aggregation = loss_key("seq-mean-token-mean", "how per-token losses reduce (rk.ppo_policy_loss)")
    denominator: GRPODenominator = loss_key("global", "global (the minibatch's count), local (each micro-batch's "
                                                      "own, then averaged) or max_len (rows × max_new_tokens)")
    kl_coef: float = loss_key(0.0, "β of the KL to the reference added to each token's loss; 0: no reference")
    kl_estimator: KLEstimator = loss_key("k3", "estimator of that KL (rk.token_kl)")
    top_k: int = rollout_key(0, "sample from the top k tokens only (0: off); the policy's log-probs replay the cut")
    top_p: float = rollout_key(1.0, "nucleus sampling: keep the most probable tokens up to mass p (1: off); replayed "
                                    "like top_k")
    rollout_dtype: RolloutDtype = rollout_key("fp32", "sample with the policy (fp32) or a bf16 copy of it")
    rollout_correction: RolloutCorrection = rollout_key("none", "tis (truncate token ratios), mis (mask sequences), "
                                                                "icepop (mask tokens) or none")
    rc_level: Optional[RCLevel] = rollout_key(None, "ratio level of the correction; null: the method's (tis, "
                                                    "icepop: token; mis: sequence)")
    rc_low: Optional[float] = rollout_key(None, "lower bound of the ratio; null: the method's (icepop 0.5, else none)")
    rc_high: Optional[float] = rollout_key(None, "upper bound of the ratio; null: the method's (tis, mis 2; icepop 5)")

    def check_batches(self):
        if self.group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {self.group_size}")
        n = self.batch_size * self.group_size
        if n % self.minibatches:
            raise ConfigError(f"batch_size × group_size ({n} responses) must be divisible by minibatches "
                              f"({self.minibatches})")
        if (n // self.minibatches) % self.micro_batch_size:
            raise ConfigError(f"the minibatch size batch_size × group_size / minibatches ({n // self.minibatches}) "
                              f"must be divisible by micro_batch_size ({self.micro_batch_size})")

    def check(self):
        super().check()
        if self.group_size < 2 and self.baseline != "none":
            raise ConfigError(f"group_size must be >= 2 with baseline={self.baseline!r} (a group of one gets "
                              "advantage 0), got 1")
        if self.denominator == "max_len" and self.aggregation != "token-mean":
            raise ConfigError(f"denominator=max_len (Dr. GRPO) needs aggregation=token-mean, got {self.aggregation!r}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.rollout_correction == "none" and any(v is not None for v in (self.rc_level, self.rc_low, self.rc_high)):
            raise ConfigError("rc_level, rc_low and rc_high set the rollout correction: pass --rollout_correction")


COMMAND = Command("train grpo", GRPOConfig, train, "GRPO and its variants (Dr. GRPO, DAPO, GSPO, CISPO): group "
                  "advantages, no critic, bf16 rollouts with mismatch correction", print_result=True, data_parallel=True)
