"""TRL's GRPO loss code path as a benchmark contender: the installed TRL's own `GRPOTrainer._compute_loss`,
called on given log-probs.

TRL has no separate loss function: ratio, clipping, KL, normalisation and the logged metrics are one
method of the trainer, which starts by running the model. The contender calls that method (TRL's code,
unchanged) on a stand-in `self` whose `_get_per_token_logps_and_entropies` returns the benchmark's
log-probs, with one process and no gradient accumulation. So the timed path is everything TRL does
after the forward pass: the loss expression plus its metrics (clip ratios, KL and entropy means, each
read back to the host with `.item()`, as TRL does on every step). The entropies it is handed are zeros.
"""
import types
from collections import defaultdict

import torch


class _OneProcess:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_grpo_loss(loss_type="bnpo", *, importance_sampling_level="token", epsilon=0.2, epsilon_high=None, beta=0.0,
                  use_bias_correction_kl=False, max_completion_length=None, delta=None):
    """A function (logp, old_logp, advantages, mask, ref_logp=None, weights=None) -> loss through TRL's
    `GRPOTrainer._compute_loss` with these GRPOConfig values; `weights` go in as vLLM's importance-sampling
    ratio (a multiplier of the policy term, as `rk.ppo_policy_loss`'s weights). Raises ImportError without TRL."""
    from trl import GRPOTrainer

    stub = types.SimpleNamespace(
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, beta=beta,
        max_completion_length=max_completion_length, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, use_vllm=False, vllm_importance_sampling_correction=True,
        current_gradient_accumulation_steps=1, accelerator=_OneProcess(), model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(delta=delta, use_bias_correction_kl=use_bias_correction_kl, steps_per_generation=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})

    def loss(logp, old_logp, advantages, mask, ref_logp=None, weights=None):
        B, T = logp.shape
        stub.use_vllm = weights is not None
        stub._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp.detach()), None)
        inputs = {"prompt_ids": mask.new_zeros((B, 0), dtype=torch.long), "prompt_mask": mask.new_zeros((B, 0)),
                  "completion_ids": mask.new_zeros((B, T), dtype=torch.long), "completion_mask": mask,
                  "advantages": advantages, "old_per_token_logps": old_logp, "num_items_in_batch": mask.sum(),
                  "ref_per_token_logps": ref_logp, "importance_sampling_ratio": weights}
        stub._metrics["train"].clear()
        return GRPOTrainer._compute_loss(stub, None, inputs)

    return loss
