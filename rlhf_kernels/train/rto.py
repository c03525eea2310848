"""RTO (docs/algorithms.md §3): PPO whose per-token reward adds the DPO policy's dense token reward
clip(β1·(log π_dpo − log π_dpo_ref), ±clip) to the KL penalty −β2·KL and the reward-model score at
the last token, all assembled by rk.token_rewards."""
import copy
from dataclasses import dataclass
from typing import Optional

import rlhf_kernels as rk

from .core import models
from .core.commands import Command
from .core.config import ConfigError, topic
from .decode import rollout
from .ppo import PPO, PPOConfig


def rto_rewards(score, mask, logp, ref_logp, dpo_logratio, *, kl_coef, kl_estimator="k1",
                dpo_reward_scale=0.05, dpo_reward_clip=0.05, score_position="last"):
    """r_t = −β2·KL_t + clip(β1·dpo_logratio_t, ±clip) (+ score at the last token), with
    dpo_logratio = log π_dpo − log π_dpo_ref per token."""
    return rk.token_rewards(score, mask, logp=logp, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator,
                            dense=dpo_logratio, dense_coef=dpo_reward_scale, dense_clip=dpo_reward_clip,
                            score_position=score_position)


class RTO(PPO):
    kind = "rto"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dpo = models.freeze(models.load_lm(cfg.dpo_model, cfg.device))
        same_ref = not cfg.dpo_ref or cfg.dpo_ref == (cfg.ref or cfg.policy)
        self.dpo_ref = self.ref if same_ref else models.freeze(models.load_lm(cfg.dpo_ref, cfg.device))
        if same_ref and cfg.ref_ema is not None:  # the PPO reference moves; the DPO ratio's must not
            self.dpo_ref = copy.deepcopy(self.ref)

    def dense_reward(self, s, order):
        """log π_dpo − log π_dpo_ref per response token (0 at masked positions)."""
        mb = self.cfg.micro_batch_size
        dpo = rollout.chunked(lambda r: self.logprobs(self.dpo, s, r), order, mb)
        ref = rollout.chunked(lambda r: self.logprobs(self.dpo_ref, s, r), order, mb)
        return dpo - ref

    def rewards(self, score, mask, logp, ref_logp, dense):
        cfg = self.cfg
        return rto_rewards(score.float(), mask, logp, ref_logp, dense, kl_coef=self.state["kl_coef"],
                           kl_estimator=cfg.kl_estimator, dpo_reward_scale=cfg.dpo_reward_scale,
                           dpo_reward_clip=cfg.dpo_reward_clip, score_position=cfg.score_position)


def train(cfg):
    return RTO(cfg).train()


dense_key = topic("RTO dense reward (docs/algorithms.md §3)")


@dataclass
class RTOConfig(PPOConfig):
    dpo_model: str = dense_key("", "the DPO policy whose log-ratio gives the dense token reward; required")
    dpo_ref: str = dense_key("", "reference of that ratio; \"\": the PPO reference")
    dpo_reward_scale: float = dense_key(0.05, "β1: scale of the dense reward")
    dpo_reward_clip: Optional[float] = dense_key(0.05, "clip of the scaled dense reward, ±; null: no clip")
    kl_coef: float = 0.01  # β2

    def check(self):
        super().check()
        if not self.dpo_model:
            raise ConfigError("rto needs dpo_model (a saved DPO policy directory)")


COMMAND = Command("train rto", RTOConfig, train, "RTO: PPO with the DPO policy's dense token reward",
                  print_result=True, data_parallel=True)
