"""`rlhf-kernels generate`: decode the embedded task's held-out prompts with a trained policy,
greedily, by sampling, or by PPO-MCTS guided by the PPO critic (mcts.py), and report the mean gold
reward (the same prompts for every method: `prompt_seed` defaults to rollout.EVAL_SEED)."""
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..._choices import KLPenalty
from ..core import models
from ..core.commands import Command
from ..core.config import ConfigError, positive, to_dict, topic
from ..core.run_config import run_key
from ..tasks import sentiment
from . import mcts, rollout


@torch.no_grad()
def greedy(policy, prompts, max_new_tokens):
    """Fixed-length argmax decoding, truncated after the first <eos> like rollout.sample."""
    out = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=None,
                          pad_token_id=sentiment.PAD, top_k=None, top_p=None, temperature=None)
    responses = out[:, prompts.shape[1]:]
    responses = torch.nn.functional.pad(responses, (0, max_new_tokens - responses.shape[1]), value=sentiment.PAD)
    return rollout.truncate_after_eos(responses)[0]


def method(cfg):
    return "mcts" if cfg.mcts else ("sample" if cfg.do_sample else "greedy")


def run(cfg):
    """Decode, score with the gold reward, write `cfg.out` (summary + every response) if set;
    returns the summary."""
    from tqdm.auto import tqdm
    dev = cfg.device
    torch.manual_seed(cfg.seed)
    policy = models.load_lm(cfg.policy, dev)
    critic = rm = ref = None
    if cfg.mcts:
        critic = models.ScalarModel.load(cfg.critic, dev)
        rm = models.ScalarModel.load(cfg.reward_model, dev) if cfg.reward_model else None
        ref = models.load_lm(cfg.ref, dev) if cfg.kl_coef > 0 else None
    prompts = sentiment.prompts(cfg.prompts, torch.Generator().manual_seed(cfg.prompt_seed)).to(dev)
    generator = torch.Generator(device=dev).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    responses = []
    for i, p in enumerate(tqdm(prompts.split(cfg.batch_size), desc=method(cfg), disable=not cfg.progress)):
        if cfg.mcts:
            r = mcts.generate(policy, critic, p, cfg, reward_model=rm, ref=ref, generator=generator)
        elif cfg.do_sample:
            r = rollout.sample(policy, p, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                               seed=cfg.seed + i).responses
        else:
            r = greedy(policy, p, cfg.max_new_tokens)
        responses.append(r.cpu())
    wall = time.perf_counter() - t0
    responses = torch.cat(responses)
    gold = sentiment.gold_reward(responses)
    _, mask, has_eos = rollout.truncate_after_eos(responses)
    summary = {"method": method(cfg), "policy": cfg.policy, "prompts": cfg.prompts,
               "gold_reward": gold.mean().item(), "no_eos": (~has_eos).float().mean().item(),
               "response_len": mask.sum(1).float().mean().item(), "wall_s": round(wall, 2)}
    if cfg.mcts:
        summary["simulations"] = cfg.simulations
    if cfg.out:
        tok = sentiment.tokenizer()
        rows = [{"prompt": p, "response": r, "gold_reward": g}
                for p, r, g in zip(sentiment.decode(prompts.cpu(), tok), sentiment.decode(responses, tok), gold.tolist())]
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({**summary, "settings": to_dict(cfg), "samples": rows}, indent=2) + "\n")
    return summary


models_key = topic("models")
search_key = topic("MCTS search (PPO-MCTS, docs/algorithms.md §9)")
value_key = topic("MCTS values")
decode_key = topic("decoding")


@dataclass
class GenerateConfig:
    """`rlhf-kernels generate`: plain or PPO-MCTS value-guided decoding. Not a trainer: no run
    directory, no checkpoint."""
    policy: str = models_key("", "saved policy dir (a PPO run's model/) or a tiny arch name; required")
    critic: str = models_key("", "saved value model (a PPO run's critic/): V(prefix) at its last position")
    mcts: bool = search_key(False, "value-guided search; else plain greedy / sampled decoding")
    reward_model: str = models_key("", "saved RM: value of terminal <eos> nodes = reward_gain·RM + reward_bias")
    ref: str = models_key("", "reference policy of the KL step penalty (needed when kl_coef > 0)")
    simulations: int = search_key(10, "S per generated token (released code's default)")
    c_puct: float = search_key(8.0, "exploration weight of PUCT")
    top_k: int = search_key(10, "children kept per node (the k highest priors)")
    te: float = search_key(1.0, "prior temperature: P = softmax(z / te)")
    td: float = search_key(1.0, "decision temperature: π(a) ∝ N(root, a)^(1/td)")
    anneal_td: bool = search_key(True, "td·(1 − t/max_new_tokens) at token t")
    do_sample: bool = decode_key(False, "sample the decision (MCTS: from N^(1/td); else: at `temperature`)")
    top_p: float = decode_key(1.0, "nucleus filter of the sampled MCTS decision")
    kl_coef: float = value_key(0.0, "> 0: backup Q = γ·V(s') + klpen(s, a)")
    klpen: KLPenalty = value_key("logratio", "logratio: −β·log(π/π_ref)(a|s) (paper); probdiff: −β·(π − π_ref)(a|s) "
                                             "(code)")
    clamp_kl: bool = value_key(False, "clamp the log-ratio / probability difference at >= 0 (code's clamp_kl)")
    gamma: float = value_key(1.0, "discount γ of the backup")
    reward_gain: float = value_key(1.0, "scale of the reward model's score at <eos> nodes")
    reward_bias: float = value_key(0.0, "offset of the reward model's score at <eos> nodes")
    no_eos_value: Optional[float] = value_key(-1.0, "value of a node at max_new_tokens without <eos> (PPO's "
                                                    "penalty_value); null: the critic's V")
    temperature: float = decode_key(1.0, "sampling temperature of plain (non-MCTS) sampled decoding")
    max_new_tokens: int = decode_key(10, "longest response, in tokens")
    prompts: int = decode_key(128, "held-out prompts, drawn with prompt_seed")
    prompt_seed: int = decode_key(424_242, "rollout.EVAL_SEED: the prompts every trainer evaluates on")
    seed: int = run_key(0, "sampling seed")
    batch_size: int = decode_key(128, "prompts decoded (and searched) together")
    out: str = run_key("", "JSON file for the summary and every response")
    device: str = run_key("cpu", "torch device")
    progress: bool = run_key(True, "show a progress bar")

    def check(self):
        positive(self, "simulations", "top_k", "max_new_tokens", "prompts", "batch_size")
        for key in ("c_puct", "te", "td", "temperature", "reward_gain"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not self.policy:
            raise ConfigError("generate needs policy (a saved model directory, e.g. runs/ppo/model)")
        if self.mcts and not self.critic:
            raise ConfigError("generate --mcts needs critic (the PPO run's value model, e.g. runs/ppo/critic)")
        if self.mcts and self.kl_coef > 0 and not self.ref:
            raise ConfigError("generate --mcts with kl_coef > 0 needs ref (the PPO run's reference policy, "
                              "e.g. runs/sft/model)")


COMMAND = Command("generate", GenerateConfig, run, "greedy, sampled or PPO-MCTS decoding of a saved policy",
                  print_result=True)
