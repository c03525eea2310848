"""Rollouts: sampling with `generate`, EOS truncation, scoring (reward model or gold), the no-EOS
penalty (docs/algorithms.md §1.9), and micro-batched forwards in a given row order."""
from dataclasses import dataclass

import torch

from .. import tasks
from ..tasks import sentiment


@dataclass
class Samples:
    prompts: torch.Tensor    # [B, P]
    responses: torch.Tensor  # [B, R], <pad> after the first <eos>
    mask: torch.Tensor       # [B, R] bool: response tokens up to and including the first <eos>
    has_eos: torch.Tensor    # [B] bool

    @property
    def ids(self):
        return torch.cat([self.prompts, self.responses], 1)

    @property
    def attn(self):
        return torch.cat([torch.ones_like(self.prompts, dtype=torch.bool), self.mask], 1).long()

    @property
    def start(self):
        return self.prompts.shape[1]


def truncate_after_eos(responses, eos=sentiment.EOS, pad=sentiment.PAD):
    """Keep each row up to and including its first <eos>; pad the rest (N+ detail 23)."""
    is_eos = responses == eos
    has_eos = is_eos.any(1)
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first <eos>
    mask = ~after
    return torch.where(mask, responses, torch.full_like(responses, pad)), mask, has_eos


@torch.no_grad()
def sample(policy, prompts, *, temperature, max_new_tokens, seed, top_k=0, top_p=1.0):
    """Fixed-length sampling (no early stop at <eos>, so every row costs the same and the EOS trick
    applies), from the temperature-scaled distribution cut by top_k / top_p (0 / 1: off), seeded. The policy's
    log-probs of such rollouts must replay the same cut (models.token_logprobs' top_k / top_p)."""
    torch.manual_seed(seed)
    out = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                          temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                          min_new_tokens=0, eos_token_id=None, pad_token_id=sentiment.PAD)
    responses = out[:, prompts.shape[1]:]
    if responses.shape[1] < max_new_tokens:  # a model that stopped early anyway: pad to the fixed length
        responses = torch.nn.functional.pad(responses, (0, max_new_tokens - responses.shape[1]), value=sentiment.PAD)
    responses, mask, has_eos = truncate_after_eos(responses)
    return Samples(prompts, responses, mask, has_eos)


def replayable(mask, logp):
    """The mask without the positions whose replayed log-prob is −inf. A sampled token is inside the cut it was
    drawn from, so this drops nothing unless the replay's logits round a token at the cut's edge to the other
    side of it (the sampler's logits and the fused head's are different GEMMs); such a position is left out
    rather than given an infinite ratio."""
    return mask & torch.isfinite(logp)


def penalize_no_eos(score, has_eos, mode, value):
    """N+ replaces the score of a response without <eos> by `value`; TRL subtracts `|value|`."""
    if mode == "replace":
        return torch.where(has_eos, score, torch.full_like(score, value))
    if mode == "subtract":
        return torch.where(has_eos, score, score - abs(value))
    return score


def chunked(fn, order, size):
    """Apply `fn(rows)` to consecutive chunks of `order` (row indices) and scatter the outputs (tensors
    with the batch first, or tuples of them) back to row order. Running the rollout forwards over
    the same chunks as the first update epoch makes both see identical micro-batches, so their
    log-probs agree bit for bit."""
    outs, rows = [], []
    for idx in order.split(size):
        out = fn(idx)
        outs.append(out if isinstance(out, tuple) else (out,))
        rows.append(idx)
    rows = torch.cat(rows)
    result = []
    for parts in zip(*outs):
        cat = torch.cat(parts)
        full = torch.empty_like(cat)
        full[rows] = cat
        result.append(full)
    return tuple(result) if len(result) > 1 else result[0]


@torch.no_grad()
def evaluate(policy, *, n, seed, temperature, max_new_tokens, batch=128, task=sentiment):
    """Mean gold reward of the policy's samples on a fixed prompt set (same prompts and sampling
    seed for every model compared), with the share of responses lacking <eos>, their length and
    the task's own metrics (task.metrics, e.g. calibration on the confidence task)."""
    g = torch.Generator().manual_seed(seed)
    prompts = sentiment.prompts(n, g).to(policy.device)
    responses, no_eos, length = [], [], []
    for i, p in enumerate(prompts.split(batch)):
        s = sample(policy, p, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + i)
        responses.append(s.responses.cpu())
        no_eos.append((~s.has_eos).float().cpu())
        length.append(s.mask.sum(1).float().cpu())
    responses = torch.cat(responses)
    return {"gold_reward": task.gold_reward(responses).mean().item(), "no_eos": torch.cat(no_eos).mean().item(),
            "response_len": torch.cat(length).mean().item(), **task.metrics(responses)}


EVAL_SEED = 424_242


def evaluate_cfg(policy, cfg, n=None):
    """`evaluate` on the shared eval prompt set with the run's sampling settings."""
    return evaluate(policy, n=n or cfg.eval_prompts, seed=EVAL_SEED, temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens, task=tasks.get(getattr(cfg, "task", "sentiment")))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Sampler:
    """The model rollouts are sampled from: the policy itself (`dtype="fp32"`), or a copy of it in a
    lower precision (`"bf16"`) refreshed from the policy before each rollout, as an inference engine
    serving the trainer's weights in bf16 would be. The copy's log-probs then differ from the
    policy's by the rounding of every weight and activation: the trainer-sampler mismatch that
    rk.rollout_correction corrects (docs/grpo.md)."""

    def __init__(self, policy, dtype="fp32"):
        import copy
        self.policy, self.dtype = policy, DTYPES[dtype]
        self.copy = None if self.dtype == torch.float32 else copy.deepcopy(policy).to(self.dtype)
        if self.copy is not None:
            for p in self.copy.parameters():
                p.requires_grad_(False)

    @property
    def separate(self):
        """Whether the sampler is a model of its own, whose log-probs must be computed separately."""
        return self.copy is not None

    @torch.no_grad()
    def sync(self):
        """The model to sample from, holding the policy's current weights."""
        if self.copy is None:
            return self.policy
        src = self.policy.state_dict()
        for name, dst in self.copy.state_dict().items():
            dst.copy_(src[name])  # casts to the sampler's dtype
        return self.copy
