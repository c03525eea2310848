"""LoRA through peft (docs/algorithms.md §11, Hu/Somayajula et al.: LoRA-only SFT and PPO).

With `lora_r > 0` the sft, ppo, dpo and rto trainers wrap the policy with `peft.get_peft_model`
and train its low-rank adapters only. The reference model is the same network with its adapters
disabled (`AdaptersOff`), so no second copy of the weights exists. The LM head is never adapted:
it stays frozen, and `rk.linear_logprobs` then computes no weight gradient. The critic stays a
separate, fully trained ScalarModel (copied from the base weights, or from the reward model).

The final `model/` of a LoRA run is the policy with its adapters merged into the weights, a plain
Transformers model (`models.load_lm` and `from_pretrained` read it); `model/adapter/` holds the
adapter alone in peft's format. Checkpoints hold the whole policy state (base and adapters).

Keys (core/run_config.py): lora_r, lora_alpha (the adapter output is scaled by lora_alpha / lora_r),
lora_dropout, lora_target_modules ("all-linear" is peft's every Linear/Conv1D layer except the
output layer: Llama's q/k/v/o/gate/up/down_proj, GPT-2's c_attn/c_proj/c_fc; or a comma-separated
list of module names).
"""
import contextlib
import copy
import sys
import warnings
from pathlib import Path

import torch

from .config import ConfigError

ADAPTER_DIR = "adapter"


def enabled(cfg):
    return getattr(cfg, "lora_r", 0) > 0


def is_peft(model):
    """Whether `model` is a peft wrapper (without importing peft when nothing used it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


class GradOnlyDropout(torch.nn.Module):
    """Dropout on the adapter input in forwards that build a graph, i.e. the updates. The trainer
    keeps every module in eval mode (N+ detail 7), and sampling, old/reference log-probs and
    evaluation run under no_grad: they see the whole adapter, like the model that is saved."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return torch.nn.functional.dropout(x, self.p, training=torch.is_grad_enabled())


def target_modules(spec):
    spec = spec.strip()
    return spec if spec == "all-linear" else [t.strip() for t in spec.split(",") if t.strip()]


def wrap(model, cfg):
    """The policy with LoRA adapters on `cfg.lora_target_modules` (only they train), or `model`
    itself when LoRA is off."""
    if not enabled(cfg):
        return model
    try:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as e:
        raise ConfigError(f"lora_r={cfg.lora_r} needs peft: pip install 'rlhf-kernels[train]' ({e})") from e
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                    target_modules=target_modules(cfg.lora_target_modules), task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself, and says so
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            peft_model = get_peft_model(model, lc)
    except ValueError as e:  # peft: no module matched
        raise ConfigError(f"lora_target_modules={cfg.lora_target_modules!r} does not fit this model: {e}") from e
    head = peft_model.get_output_embeddings()
    if isinstance(head, BaseTunerLayer) or head.weight.requires_grad:
        # token_logprobs reads lm_head.weight directly; an adapter there would be silently ignored
        raise ConfigError(f"lora_target_modules={cfg.lora_target_modules!r} adapts the LM head; "
                          "list the attention/MLP projections only (or use all-linear)")
    if cfg.lora_dropout > 0:
        for m in peft_model.modules():
            if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_dropout"):
                for name in list(m.lora_dropout):
                    m.lora_dropout[name] = GradOnlyDropout(cfg.lora_dropout)
    return peft_model


class AdaptersOff:
    """The reference model of a LoRA run: the policy's own network with its adapters disabled,
    i.e. the initial weights (peft starts every adapter at B = 0), at no memory cost. It owns no
    parameters (the base weights are the policy's, frozen by peft), so `models.freeze` is a no-op
    on it and nothing can update the reference through it."""

    def __init__(self, policy):
        self.policy = policy

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    @property
    def device(self):
        return self.policy.device

    def parameters(self):
        return iter(())

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def body(model):
    """(transformer body that gives last_hidden_state, context to run it in). On a PeftModel
    `model.base_model` is peft's LoraModel (the whole causal LM), so go through get_base_model()."""
    if isinstance(model, AdaptersOff):
        return model.policy.get_base_model().base_model, model.policy.disable_adapter()
    if is_peft(model):
        return model.get_base_model().base_model, contextlib.nullcontext()
    return model.base_model, contextlib.nullcontext()


def base_copy(model):
    """A trainable copy of the model's base weights without adapters (the critic's backbone)."""
    if not is_peft(model):
        return copy.deepcopy(model)
    plain = copy.deepcopy(model).unload()
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain


def merged(model):
    """A plain Transformers copy of a LoRA policy with the adapters merged into its weights."""
    return copy.deepcopy(model).merge_and_unload()


def save_pretrained(model, path):
    """`model.save_pretrained(path)`; a LoRA policy is saved merged, its adapter alone in adapter/."""
    if not is_peft(model):
        return model.save_pretrained(path)
    merged(model).save_pretrained(path)
    model.save_pretrained(Path(path, ADAPTER_DIR))


def summary(model):
    """Parameter counts of a LoRA policy for result.json ({} without LoRA)."""
    if not is_peft(model):
        return {}
    return {"lora_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "policy_params": sum(p.numel() for p in model.parameters())}
