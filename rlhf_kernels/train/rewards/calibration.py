"""PPO-C, calibrated reward calculation (docs/algorithms.md §8, Leng et al. 2024), on the confidence
task (tasks/confidence.py). Per rollout batch:

    r  = clamp(RM(x, y without its confidence), ±10)
    r̄ ← α·mean_batch(r) + (1 − α)·r̄          (updated before the adjustment)
    ĉ  = c/10
    difference: r' = r + w·(r − r̄)·(ĉ − 0.5)
    threshold:  r' = r + w·|r|·(ĉ − 0.5) if r ≥ r̄ else r − w·|r|·(ĉ − 0.5)

r' replaces the score; PPO's no-EOS penalty, score clip and KL penalty then apply as usual. r̄ lives
in the trainer's checkpointed state (`ppo_c_rbar`), so a resumed run continues the same average.
r̄_0 (`ppo_c_rbar_init`, default 0): the source starts from the RM's stored mean; our RMs subtract
that mean (their `offset`, the mean score on SFT demonstrations) from every score, so in the units
PPO sees it is 0. Setting it to the RM's raw offset reproduces the source's raw/normalised quirk.
"""
import torch

from ..._choices import PPOCAdjustment, values
from ..decode import rollout
from ..tasks import confidence

SCORE_CLAMP = 10.0


def update_rbar(rbar, r, alpha):
    """r̄ ← α·mean(r) + (1 − α)·r̄."""
    return alpha * float(r.float().mean()) + (1 - alpha) * rbar


def adjust(r, rbar, c_hat, w, adjustment="difference"):
    """The calibrated score r' of scores r [B] with stated confidences ĉ [B] in [0, 1]."""
    if adjustment == "difference":
        return r + w * (r - rbar) * (c_hat - 0.5)
    if adjustment == "threshold":
        delta = w * r.abs() * (c_hat - 0.5)
        return torch.where(r >= rbar, r + delta, r - delta)
    raise ValueError(f"ppo_c_adjustment must be one of {', '.join(values(PPOCAdjustment))}, got {adjustment!r}")


def without_confidence(s):
    """The rollout `s` with every confidence token removed from its responses (mask recomputed)."""
    responses, mask, has_eos = rollout.truncate_after_eos(confidence.strip_confidence(s.responses))
    return rollout.Samples(s.prompts, responses, mask, has_eos)


def ppo_c_score(score_fn, s, state, cfg):
    """(r' [B], stats): PPO-C's score of rollout `s`, `score_fn` scoring the content (RM or gold);
    updates state["ppo_c_rbar"]."""
    r = score_fn(without_confidence(s)).float().clamp(-SCORE_CLAMP, SCORE_CLAMP)
    state["ppo_c_rbar"] = update_rbar(state["ppo_c_rbar"], r, cfg.ppo_c_alpha)
    c, _ = confidence.confidence(s.responses)
    adjusted = adjust(r, state["ppo_c_rbar"], c.to(r.device).float() / 10, cfg.ppo_c_w, cfg.ppo_c_adjustment)
    return adjusted, {"ppo_c_rbar": state["ppo_c_rbar"], "ppo_c_content_score": r.mean().item()}
