"""PPO for language models as in docs/algorithms.md §1 (N+ / OpenRLHF conventions, each choice a knob).

One iteration: sample responses (fixed length, truncated after the first <eos>), score them (reward
model or gold reward; no-EOS penalty), take old/reference log-probs and values in the same
micro-batches as the first update epoch, build per-token rewards with rk.token_rewards (KL penalty,
optional dense reward, score at the last token or one past it), optionally whiten rewards, run
rk.gae (returns before advantage whitening), whiten advantages with rk.masked_whiten, then
`epochs` × `minibatches` clipped policy + value updates (rk.ppo_policy_loss, rk.ppo_value_loss)
with gradient accumulation over micro-batches, grad-norm clipping and linear LR annealing.
Optional, off by default: the PPO-max tricks (ppo_max.py), the reference EMA (ref_ema.py) and the
RMSprop optimizer of A2C (core/optim.py); `--preset ppo-max` / `--preset a2c` set them (presets.py).
"""
import copy
import functools
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

import rlhf_kernels as rk

from .._choices import (
    Aggregation,
    CriticInit,
    EnsembleReduce,
    KLEstimator,
    NoEOSPenalty,
    Optimizer,
    PPOCAdjustment,
    RewardNorm,
    ScorePosition,
    Task,
    WhitenLevel,
)
from . import ppo_max, ref_ema, tasks
from .core import lora, models, parallel
from .core.commands import Command
from .core.config import ConfigError, topic
from .core.optim import make_ppo_optimizer
from .core.run_config import RunConfig, check_task, optim_key
from .core.runlog import Run, clip_and_step, finish, loop, step_generator
from .decode import rollout
from .presets import PRESETS
from .rewards import calibration, ensemble
from .tasks import sentiment


class AdaptiveKL:
    """Ziegler et al.: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), KL the mean sequence-summed k1."""

    def __init__(self, cfg):
        self.cfg = cfg

    def update(self, state, kl, n):
        if self.cfg.kl_target is not None:
            e = max(-0.2, min(0.2, kl / self.cfg.kl_target - 1))
            state["kl_coef"] = state["kl_coef"] * (1 + e * n / self.cfg.kl_horizon)


def micro_weight(aggregation, mask_micro, mask_mb, par=None):
    """Share of a minibatch's aggregated loss carried by one micro-batch, so that accumulating
    micro-batch losses gives exactly the minibatch's aggregate (token counts for token-mean,
    counts of non-empty rows for the seq-mean forms, 1 for token-sum). Under torchrun `mask_mb` is
    this rank's part of the minibatch and the count is the job's (all-reduced)."""
    par = par or parallel.Single()
    if aggregation == "token-sum":
        return 1.0
    if aggregation == "token-mean":
        return float(mask_micro.sum()) / max(par.sum(float(mask_mb.sum())), 1.0)
    return float(mask_micro.any(-1).sum()) / max(par.sum(float(mask_mb.any(-1).sum())), 1.0)


def check_parallel(cfg, par):
    """The PPO options that do not run data-parallel yet (their statistics are per rank)."""
    if par.world == 1:
        return
    unsupported = {"reward_norm": cfg.reward_norm != "none", "ptx_coef": cfg.ptx_coef > 0,
                   "critic_pretrain_steps": cfg.critic_pretrain_steps > 0, "ppo_c": cfg.ppo_c,
                   "advantage_whiten_level=minibatch": cfg.advantage_whiten_level == "minibatch",
                   "ref_ema with fsdp": cfg.ref_ema is not None and cfg.fsdp,
                   "ref_ema with tp_head": cfg.ref_ema is not None and cfg.tp_head}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not supported under torchrun yet (world size {par.world}); "
                          "run on one process")


def value_mask(mask, score_position):
    """Positions the critic is trained on: the response, plus one past its end for "eos+1" (N+
    padding_mask_p1), where that score lands."""
    if score_position == "last":
        return mask
    T = mask.shape[1]
    last = torch.where(mask, torch.arange(T, device=mask.device), torch.full_like(mask, -1, dtype=torch.long)).amax(1)
    p1 = torch.nn.functional.one_hot((last + 1).clamp(max=T - 1), T).bool() & (last >= 0)[:, None]
    return mask | p1


class PPO:
    """The PPO trainer; RTO subclasses it to add the dense DPO reward (rto.py)."""
    kind = "ppo"

    def __init__(self, cfg):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.par = par = parallel.setup(cfg)  # under torchrun: sets cfg.device to this rank's GPU
        check_parallel(cfg, par)
        dev = cfg.device
        self.task = tasks.get(cfg.task)
        self.policy = lora.wrap(models.load_lm(cfg.policy, dev, len(self.task.WORDS)), cfg)  # lora_r > 0: adapters only train
        self.ref = models.freeze(models.load_reference(cfg.ref, self.policy, dev))
        self.rm = None if cfg.reward_model == "gold" else models.freeze(ensemble.load_reward(cfg, dev))
        if cfg.critic_init == "reward" and self.rm is not None:
            self.critic = copy.deepcopy(ensemble.first_member(self.rm))  # N+: value model initialised from the RM
            for p in self.critic.parameters():
                p.requires_grad_(True)
        else:  # critic_init="policy", or no reward model to start from
            self.critic = models.ScalarModel(lora.base_copy(self.policy)).to(dev)  # LoRA: a full critic
        self.critic.lm.get_output_embeddings().weight.requires_grad_(False)
        # DDP or FSDP2 around every model whose forward builds a graph (the optimizer then sees FSDP2's shards)
        self.forward = par.wrap_lm(self.policy)
        self.forwards = {id(self.policy): self.forward,
                         id(self.ref): par.wrap_lm(self.ref, trainable=False)}
        self.critic_net = par.wrap(self.critic)
        self.sampler = par.sampler(self.forward, self.policy)
        self.optimizer = make_ppo_optimizer(cfg, [(self.policy.parameters(), cfg.lr),
                                                  (self.critic.parameters(), cfg.critic_lr)])
        self.state = {"kl_coef": cfg.kl_coef}
        if cfg.ppo_c:
            self.state["ppo_c_rbar"] = cfg.ppo_c_rbar_init
        self.kl_ctl = AdaptiveKL(cfg)
        # PPO-max (ppo_max.py) and the reference EMA (ref_ema.py); both off by default
        self.moments = ppo_max.RunningMoments()
        self.ptx_data = ppo_max.ptx_corpus(cfg) if cfg.ptx_coef > 0 else None
        if cfg.ref_ema is not None:
            ref_ema.check_compatible(self.ref, self.policy)

    # rollout -------------------------------------------------------------------------------------
    def logprobs(self, model, s, rows, entropy=False):
        """Token log-probs of `model` (through its DDP/FSDP2 wrapper when it has one). The policy's log-probs
        replay the sampler's top-k / top-p cut; the reference keeps its full distribution (its own cut could leave
        out a sampled token, and the KL regularises towards the whole reference)."""
        replay = self.cfg.replay() if model is not self.ref else {}
        forward = self.forwards.get(id(model), functools.partial(models.token_logprobs, model))
        return forward(s.ids[rows], s.attn[rows], s.start, s.mask[rows], temperature=self.cfg.temperature,
                       impl=self.cfg.logprob_impl, entropy=entropy, **replay)

    def values(self, s, rows):
        return self.critic_net(s.ids[rows], s.attn[rows])[:, s.start - 1:-1]

    def score(self, s):
        if self.rm is None:
            return self.task.gold_reward(s.responses.cpu()).to(s.prompts.device)
        with torch.no_grad():
            return self.rm.score(s.ids, s.attn)

    def dense_reward(self, s, order):
        """Extra per-token reward (RTO's DPO log-ratio); None for plain PPO."""
        return None

    @torch.no_grad()
    def make_experience(self, step, g):
        cfg, par = self.cfg, self.par
        s = self.sample(step, g)
        order = torch.randperm(len(s.prompts), generator=g).to(cfg.device)  # also the first epoch's order
        mb = cfg.micro_batch_size
        old_logp, entropy = rollout.chunked(lambda r: self.logprobs(self.policy, s, r, entropy=True), order, mb)
        s.mask = rollout.replayable(s.mask, old_logp)
        ref_logp = rollout.chunked(lambda r: self.logprobs(self.ref, s, r), order, mb)
        values = rollout.chunked(lambda r: self.values(s, r), order, mb)
        dense = self.dense_reward(s, order)
        if cfg.ppo_c:  # PPO-C: the content is scored without its confidence, then adjusted by it
            raw_score, calib_stats = calibration.ppo_c_score(self.score, s, self.state, cfg)
        else:
            raw_score, calib_stats = self.score(s), {}
        score = rollout.penalize_no_eos(raw_score, s.has_eos, cfg.no_eos_penalty, cfg.penalty_value)
        score = ppo_max.normalize_score(score, self.moments, cfg.reward_norm)
        if cfg.score_clip is not None:
            score = score.clamp(-cfg.score_clip, cfg.score_clip)
        rewards = self.rewards(score, s.mask, old_logp, ref_logp, dense)
        vmask = value_mask(s.mask, cfg.score_position)
        if cfg.whiten_rewards:  # whitening statistics of the job's batch (par.masked_whiten)
            rewards = par.masked_whiten(rewards, vmask, shift_mean=False)
        advantages, returns = rk.gae(rewards, values, vmask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages and cfg.advantage_whiten_level == "batch":
            advantages = par.masked_whiten(advantages, s.mask, shift_mean=True, unbiased=cfg.advantage_unbiased)
        kl_seq = torch.where(s.mask, old_logp - ref_logp, torch.zeros_like(old_logp)).sum(1)
        # statistics of the job's batch: every rank's rows gathered (the identity on one process)
        g_resp, g_mask, g_kl = par.gather(s.responses).cpu(), par.gather(s.mask), par.gather(kl_seq)
        stats = {"gold_reward": self.task.gold_reward(g_resp).mean().item(),
                 "score": par.gather(raw_score.float()).mean().item(), "kl": g_kl.mean().item(),
                 "entropy": (par.gather(entropy).sum() / g_mask.sum()).item(),
                 "no_eos": (~par.gather(s.has_eos)).float().mean().item(),
                 "response_len": g_mask.sum(1).float().mean().item(), "kl_coef": self.state["kl_coef"],
                 "return_mean": (par.gather(returns).sum() / par.gather(vmask).sum()).item(),
                 **self.task.metrics(g_resp), **calib_stats}
        if cfg.reward_norm != "none":
            stats.update(reward_running_mean=self.moments.mean, reward_running_std=self.moments.std)
        if dense is not None:
            stats["dpo_logratio"] = par.gather((dense * s.mask).sum(1)).mean().item()
        stats.update(getattr(self.rm, "stats", {}))  # a reward-model ensemble: member mean and spread (rank 0's rows)
        return dict(samples=s, order=order, old_logp=old_logp, values=values, advantages=advantages,
                    returns=returns, vmask=vmask, stats=stats, kl=g_kl.mean().item())

    def sample(self, step, g):
        """This rank's rollouts of iteration `step`: its share of the batch's prompts (drawn from `g`, the
        same on every rank), sampled with its own seed (rank 0: the single-process seed)."""
        cfg = self.cfg
        prompts = sentiment.prompts(cfg.batch_size, g)[self.par.rows(cfg.batch_size)].to(cfg.device)
        return rollout.sample(self.sampler, prompts, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, seed=self.par.seed(cfg.seed * 1_000_003 + step))

    def rewards(self, score, mask, logp, ref_logp, dense):
        cfg = self.cfg
        return rk.token_rewards(score.float(), mask, logp=logp, ref_logp=ref_logp, kl_coef=self.state["kl_coef"],
                                kl_estimator=cfg.kl_estimator, score_position=cfg.score_position)

    # update --------------------------------------------------------------------------------------
    def step(self, step):
        cfg = self.cfg
        g = step_generator(cfg, step)
        ex = self.make_experience(step, g)
        s, par = ex["samples"], self.par
        n = len(s.prompts)  # this rank's rows
        mb_size = n // cfg.minibatches
        sums = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "vf_clipfrac": 0.0}
        n_mb, first_dev = 0, None
        critic_only = ppo_max.actor_frozen(cfg, step)
        g_ptx = step_generator(cfg, step, salt=ppo_max.PTX_SALT)
        for epoch in range(cfg.epochs):
            order = ex["order"] if epoch == 0 else torch.randperm(n, generator=g).to(cfg.device)
            for mb in order.split(mb_size):
                advantages = ppo_max.minibatch_advantages(ex["advantages"], mb, s.mask, cfg)
                micros = mb.split(cfg.micro_batch_size)
                for i, micro in enumerate(micros):
                    par.sync_grads(self.forward, self.critic_net, last=i == len(micros) - 1)
                    logp = self.logprobs(self.policy, s, micro)
                    v = self.values(s, micro)
                    # a token the updated policy's cut leaves out has logp = −inf: it leaves the policy loss
                    mask, vmask = s.mask[micro] & torch.isfinite(logp), ex["vmask"][micro]
                    pg, pst = rk.ppo_policy_loss(logp, ex["old_logp"][micro], advantages[micro], mask,
                                                 clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                                 dual_clip=cfg.dual_clip, aggregation=cfg.aggregation)
                    vf, vst = rk.ppo_value_loss(v, ex["values"][micro], ex["returns"][micro], vmask,
                                                clip=cfg.vf_clip, aggregation=cfg.aggregation)
                    wp = micro_weight(cfg.aggregation, mask, s.mask[mb], par)
                    wv = micro_weight(cfg.aggregation, vmask, ex["vmask"][mb], par)
                    loss = (0.0 if critic_only else wp * pg) + cfg.vf_coef * wv * vf
                    self.run.check_finite(step, policy_loss=pg, value_loss=vf)
                    par.scale(loss).backward()
                    if first_dev is None:  # the rollout forward and this one must agree exactly
                        d = (logp.detach() - ex["old_logp"][micro]).abs().masked_fill(~mask, 0)
                        first_dev = d.max().item()
                    for k, val in (("pg_loss", pg), ("vf_loss", vf), ("clipfrac", pst["clipfrac"]),
                                   ("approx_kl", pst["approx_kl"]), ("vf_clipfrac", vst["vf_clipfrac"])):
                        sums[k] += float(val.detach()) * (wv if k.startswith("vf") else wp)
                if self.ptx_data is not None and not critic_only:
                    sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + ppo_max.ptx_backward(self, step, g_ptx)
                n_mb += 1
                params = list(self.policy.parameters()) + list(self.critic.parameters())
                sums.setdefault("grad_norm", 0.0)
                sums["grad_norm"] += clip_and_step(self.run, step, self.optimizer, params, cfg.max_grad_norm)
        if cfg.ref_ema is not None and not critic_only:
            ref_ema.ema_update(self.ref, self.policy, cfg.ref_ema)
        self.kl_ctl.update(self.state, ex["kl"], cfg.batch_size)
        sums = par.sum_metrics(sums, keep=("grad_norm",))  # each rank holds its share of each minibatch's loss
        metrics = {**ex["stats"], **{k: v / n_mb for k, v in sums.items()},
                   "ratio_dev_first_minibatch": par.max(first_dev)}
        if cfg.critic_pretrain_steps:
            metrics["critic_only"] = float(critic_only)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = rollout.evaluate_cfg(self.sampler, cfg)
            metrics.update({f"eval_{k}": ev[k] for k in ("gold_reward", *self.task.METRICS)})
        tokens = int(s.attn.sum()) * (1 + cfg.epochs)
        return metrics, tokens

    def train(self):
        self.run = Run(self.cfg, self.kind, self.par)
        modules = {"policy": self.policy, "critic": self.critic}
        if self.cfg.reward_norm != "none":
            modules["reward_moments"] = self.moments
        if self.cfg.ref_ema is not None:  # the reference moves, so it is part of the state
            modules["ref"] = self.ref
        loop(self.run, modules, self.optimizer, self.step, self.state)
        self.par.save(self.forward, lambda m: models.save_lm(m.lm, self.run.dir / "model"))
        self.par.save(self.critic_net, lambda m: m.save(self.run.dir / "critic"))
        return finish(self.run, {"model": str(self.run.dir / "model"), **rollout.evaluate_cfg(self.sampler, self.cfg),
                                 **lora.summary(self.policy)})


def train(cfg):
    return PPO(cfg).train()


model_key = topic("models and reward")
kl_key = topic("KL penalty")
reward_key = topic("reward shaping")
adv_key = topic("advantages (GAE)")
update_key = topic("PPO update")
max_key = topic("PPO-max, A2C, reference EMA (docs/algorithms.md §2, §5, §1.12)")
ppoc_key = topic("PPO-C, calibrated reward calculation (docs/algorithms.md §8)")
ens_key = topic("reward-model ensembles (docs/algorithms.md §7)")
rollout_key = topic("rollout sampling (replayed by the policy's log-probs)")


@dataclass
class PPOConfig(RunConfig):
    PRESETS: ClassVar[dict] = PRESETS
    policy: str = model_key("tiny-llama", "initial policy (saved SFT model dir); also the reference unless `ref`")
    ref: str = model_key("", "reference policy; \"\": the initial policy")
    reward_model: str = model_key("gold", "a saved RM dir (several: comma-separated, or a `train rm --ensemble` dir), "
                                          "or \"gold\" for the programmatic reward")
    critic_init: CriticInit = model_key("reward", "critic backbone: reward (N+: from the RM) or policy")
    task: Task = model_key("sentiment", "the embedded task, or confidence (responses state a confidence)")
    steps: int = optim_key(30, "PPO iterations (rollout + update)")
    batch_size: int = optim_key(64, "rollouts (episodes) per iteration")
    minibatches: int = update_key(2, "minibatches per epoch (each one optimizer step)")
    micro_batch_size: int = 16
    epochs: int = update_key(4, "update epochs over each batch of rollouts")
    lr: float = 5e-4
    critic_lr: float = optim_key(1e-3, "learning rate of the critic")
    kl_coef: float = kl_key(0.05, "β: weight of the per-token KL penalty in the reward")
    kl_estimator: KLEstimator = kl_key("k1", "estimator of the per-token KL (rk.token_kl)")
    kl_target: Optional[float] = kl_key(None, "set: adaptive controller (Ziegler et al.) towards this KL; "
                                              "null: fixed kl_coef")
    kl_horizon: int = kl_key(10000, "horizon of the adaptive KL controller")
    score_position: ScorePosition = reward_key("last", "token that gets the score: last (OpenRLHF) or eos+1 (N+/TRL)")
    score_clip: Optional[float] = reward_key(10.0, "clip the score to ±this; null: no clip")
    no_eos_penalty: NoEOSPenalty = reward_key("replace", "responses without <eos>: replace (N+) or subtract (TRL) "
                                                         "penalty_value, or none")
    penalty_value: float = reward_key(-1.0, "the no-<eos> penalty")
    whiten_rewards: bool = reward_key(False, "whiten the per-token rewards before GAE")
    whiten_advantages: bool = adv_key(True, "whiten advantages (after the returns are taken)")
    advantage_unbiased: bool = adv_key(False, "Bessel-corrected variance (TRL, EasyLM) or biased (N+)")
    gamma: float = adv_key(1.0, "discount γ")
    lam: float = adv_key(0.95, "GAE λ")
    clip_low: float = update_key(0.2, "ε_low of the clipped ratio")
    clip_high: Optional[float] = update_key(None, "ε_high of the clipped ratio; null: clip_low")
    dual_clip: Optional[float] = update_key(None, "dual clip c > 1 for negative advantages; null: off")
    vf_clip: Optional[float] = update_key(0.2, "value clip ε_v; null: unclipped value loss")
    vf_coef: float = update_key(0.1, "weight of the value loss")
    aggregation: Aggregation = update_key("token-mean", "how per-token losses reduce (rk.ppo_policy_loss)")
    eval_every: int = 10
    top_k: int = rollout_key(0, "sample from the top k tokens only (0: off); the policy's log-probs replay the cut")
    top_p: float = rollout_key(1.0, "nucleus sampling: keep the most probable tokens up to mass p (1: off); replayed "
                                    "like top_k")
    preset: str = max_key("", "a name in PRESETS (ppo-max, a2c), applied under the config file and the overrides")
    reward_norm: RewardNorm = max_key("none", "running score moments: scale r/σ, normalize (r−μ)/σ, then score_clip")
    advantage_whiten_level: WhitenLevel = max_key("batch", "batch (N+) or minibatch (PPO-max: whiten each minibatch)")
    advantage_clip: Optional[float] = max_key(None, "clamp(A, ±c) after whitening (PPO-max code default 0.5)")
    critic_pretrain_steps: int = max_key(0, "the first N of `steps` iterations update the critic only")
    ptx_coef: float = max_key(0.0, "PPO-ptx: + coef·token-mean CE on SFT demonstrations (the pretraining corpus)")
    ptx_batch_size: int = max_key(32, "demonstrations per optimizer step for the ptx loss")
    ptx_examples: int = max_key(4000, "size of that corpus")
    optimizer: Optimizer = max_key("adamw", "adamw or rmsprop (A2C)")
    optimizer_eps: float = max_key(1e-5, "eps of either optimizer (N+ AdamW 1e-5, SB3 A2C RMSprop 1e-5)")
    rmsprop_alpha: float = max_key(0.99, "RMSprop smoothing constant (SB3 A2C)")
    ref_ema: Optional[float] = max_key(None, "η: θ_ref ← (1−η)θ_ref + η·θ_actor after each PPO iteration")
    ppo_c: bool = ppoc_key(False, "score the content without its confidence, then adjust by the confidence")
    ppo_c_alpha: float = ppoc_key(0.1, "EMA rate of the running reward mean r̄")
    ppo_c_w: float = ppoc_key(2.0, "adjustment weight w (the paper's script; code default 0.5)")
    ppo_c_adjustment: PPOCAdjustment = ppoc_key("difference", "difference (script) or threshold (code default)")
    ppo_c_rbar_init: float = ppoc_key(0.0, "r̄_0: the stored mean of a normalised RM, 0 once its offset is "
                                           "subtracted")
    ensemble_reduce: EnsembleReduce = ens_key("mean", "mean, wco (min over members) or uwo (mean − λ·variance)")
    uwo_lambda: float = ens_key(0.1, "λ of UWO (Coste et al.'s PPO config)")
    uwo_unbiased: bool = ens_key(False, "variance /(k−1) (their PPO code) instead of /k (paper, BoN code)")

    def check_batches(self):
        if self.batch_size % self.minibatches:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by minibatches ({self.minibatches})")
        mb = self.batch_size // self.minibatches
        if mb % self.micro_batch_size:
            raise ConfigError(f"the minibatch size batch_size/minibatches ({mb}) must be divisible by "
                              f"micro_batch_size ({self.micro_batch_size})")

    def check(self):
        super().check()
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1, got {self.dual_clip}")
        ppo_max.check(self)
        check_task(self, "ppo_c")
        if not 0 < self.ppo_c_alpha <= 1:
            raise ConfigError(f"ppo_c_alpha must be in (0, 1], got {self.ppo_c_alpha}")
        if self.uwo_lambda < 0:
            raise ConfigError(f"uwo_lambda must be >= 0, got {self.uwo_lambda}")


COMMAND = Command("train ppo", PPOConfig, train, "PPO on the task's prompts (N+ / OpenRLHF conventions, every "
                  "choice a key)", print_result=True, data_parallel=True)
