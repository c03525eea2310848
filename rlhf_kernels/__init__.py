"""rlhf_kernels: fused CPU, Triton and CUDA kernels for RLHF (see README.md and DESIGN.md)."""
from ._backend import available_backends, cpu_isa
from .ops import (
    dpo_loss,
    gae,
    group_advantages,
    linear_logprobs,
    logprobs_from_logits,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    rollout_correction,
    token_kl,
    token_rewards,
)

__version__ = "0.1.0"
__all__ = ["available_backends", "cpu_isa", "dpo_loss", "gae", "group_advantages", "linear_logprobs",
           "logprobs_from_logits", "masked_whiten", "ppo_policy_loss", "ppo_value_loss", "rollout_correction",
           "token_kl", "token_rewards"]
