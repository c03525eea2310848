"""The public ops: validation, backend choice, autograd and torch.library registration."""
from .dpo_loss import dpo_loss
from .gae import gae
from .group_advantages import group_advantages
from .linear_logprobs import linear_logprobs
from .logprobs_from_logits import logprobs_from_logits
from .masked_whiten import masked_whiten
from .ppo_policy_loss import ppo_policy_loss
from .ppo_value_loss import ppo_value_loss
from .rollout_correction import rollout_correction
from .token_kl import token_kl
from .token_rewards import token_rewards

__all__ = ["dpo_loss", "gae", "group_advantages", "linear_logprobs", "logprobs_from_logits", "masked_whiten",
           "ppo_policy_loss", "ppo_value_loss", "rollout_correction", "token_kl", "token_rewards"]
