"""`rlhf-kernels generate`: decode the embedded task's held-out prompts with a trained policy,
greedily, by sampling, or by PPO-MCTS guided by the PPO critic (mcts.py), and report the mean gold
reward (the same prompts for every method: `prompt_seed` defaults to rollout.EVAL_SEED)."""
import json
import time
from pathlib import Path

import torch

from . import mcts, models, rollout, tasks
from .config import to_dict


@torch.no_grad()
def greedy(policy, prompts, max_new_tokens):
    """Fixed-length argmax decoding, truncated after the first <eos> like rollout.sample."""
    out = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=None,
                          pad_token_id=tasks.PAD, top_k=None, top_p=None, temperature=None)
    responses = out[:, prompts.shape[1]:]
    responses = torch.nn.functional.pad(responses, (0, max_new_tokens - responses.shape[1]), value=tasks.PAD)
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
    prompts = tasks.prompts(cfg.prompts, torch.Generator().manual_seed(cfg.prompt_seed)).to(dev)
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
    gold = tasks.gold_reward(responses)
    _, mask, has_eos = rollout.truncate_after_eos(responses)
    summary = {"method": method(cfg), "policy": cfg.policy, "prompts": cfg.prompts,
               "gold_reward": gold.mean().item(), "no_eos": (~has_eos).float().mean().item(),
               "response_len": mask.sum(1).float().mean().item(), "wall_s": round(wall, 2)}
    if cfg.mcts:
        summary["simulations"] = cfg.simulations
    if cfg.out:
        tok = tasks.tokenizer()
        rows = [{"prompt": p, "response": r, "gold_reward": g}
                for p, r, g in zip(tasks.decode(prompts.cpu(), tok), tasks.decode(responses, tok), gold.tolist())]
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({**summary, "settings": to_dict(cfg), "samples": rows}, indent=2) + "\n")
    return summary
