"""The keys every trainer shares (run directory, optimisation, evaluation, LoRA) and their checks."""
from dataclasses import dataclass
from typing import Optional

from ..._choices import LogprobImpl
from .config import ConfigError, positive, topic

run_key = topic("run")
optim_key = topic("optimisation")
evaluation_key = topic("evaluation and sampling")
lora_key = topic("LoRA (peft; docs/algorithms.md §11)")


@dataclass
class RunConfig:
    out: str = run_key("", "run directory (metrics.jsonl, checkpoint.pt, curves.png, model/); required")
    seed: int = run_key(0, "seed of initialisation, data and sampling")
    steps: int = optim_key(100, "optimizer steps (SFT, RM, DPO) or PPO iterations (PPO, RTO)")
    lr: float = optim_key(1e-3, "learning rate (AdamW unless said otherwise)")
    batch_size: int = optim_key(32, "examples (or rollouts) per step")
    micro_batch_size: int = optim_key(32, "gradient accumulation splits a batch into micro-batches of this size")
    max_grad_norm: Optional[float] = optim_key(1.0, "clip the global gradient norm to this; null: no clipping")
    anneal_lr: bool = optim_key(True, "linear decay of the learning rate to 0 over `steps` (N+ `lrnow = frac·lr`)")
    save_every: int = run_key(25, "checkpoint period in steps; the last step is always saved")
    eval_every: int = evaluation_key(25, "gold-reward evaluation period in steps (sampling is the costly part)")
    eval_prompts: int = evaluation_key(128, "held-out prompts of each evaluation")
    temperature: float = evaluation_key(1.0, "sampling temperature; every policy log-prob divides logits by it")
    max_new_tokens: int = evaluation_key(10, "longest sampled response, in tokens")
    logprob_impl: LogprobImpl = optim_key("fused", "fused: rk.linear_logprobs on hidden states; "
                                                   "naive: logits + log_softmax")
    device: str = run_key("cpu", "torch device of the run (cpu, cuda, cuda:1, ...)")
    progress: bool = run_key(True, "show a progress bar")
    fsdp: bool = run_key(False, "under torchrun: shard the policy (critic, reference) with FSDP2 fully_shard "
                                "instead of DDP replicas (docs/distributed.md)")
    tp_head: bool = run_key(False, "under torchrun with DDP: shard the policy's LM head by vocabulary rows across "
                                   "the ranks (the vocabulary-parallel head; docs/distributed.md)")
    dist_timeout_s: float = run_key(600.0, "under torchrun: timeout of every collective, so a failed rank "
                                           "stops the job")
    lora_r: int = lora_key(0, "adapter rank; 0 = off (full fine-tuning); sft/ppo/dpo/rto then train adapters only")
    lora_alpha: float = lora_key(16.0, "adapter output scaled by lora_alpha / lora_r")
    lora_dropout: float = lora_key(0.0, "N+ detail 7: off; > 0 drops adapter inputs in the update forwards only")
    lora_target_modules: str = lora_key("all-linear", "peft: every Linear/Conv1D but the LM head; "
                                                      "or \"q_proj,v_proj,...\"")

    def check(self):
        positive(self, *(k for k in ("steps", "batch_size", "micro_batch_size", "save_every", "eval_every",
                                     "eval_prompts", "max_new_tokens", "minibatches", "epochs") if hasattr(self, k)))
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        self.check_batches()
        self.check_lora()
        self.check_tp_head()
        if hasattr(self, "top_k"):
            self.check_sampler()
        if hasattr(self, "label_noise") and not 0 <= self.label_noise < 0.5:
            raise ConfigError(f"label_noise must be in [0, 0.5), got {self.label_noise}")

    def check_sampler(self):
        """top_k / top_p of the trainers that sample rollouts (PPO, GRPO and their variants)."""
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    def replay(self):
        """The sampler settings the policy's rollout log-probs replay (rk.linear_logprobs' top_k / top_p)."""
        return dict(top_k=getattr(self, "top_k", 0) or None,
                    top_p=None if getattr(self, "top_p", 1.0) == 1.0 else self.top_p)

    def check_batches(self):
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by micro_batch_size "
                              f"({self.micro_batch_size})")

    def check_tp_head(self):
        if not self.tp_head:
            return
        bad = {"fsdp=true (FSDP2 shards the head already)": self.fsdp,
               "lora_r > 0 (the head is frozen)": self.lora_r > 0,
               "logprob_impl=naive (the sharded head computes fused log-probs)": self.logprob_impl != "fused",
               "top_k/top_p (the sampler replay does not compose with the vocabulary-parallel head yet)":
                   any(v is not None for v in self.replay().values())}
        bad = [k for k, v in bad.items() if v]
        if bad:
            raise ConfigError(f"tp_head=true with {', '.join(bad)}: does not compose; the vocabulary-parallel head "
                              "runs with DDP, full fine-tuning and fused log-probs")

    def check_lora(self):
        if self.lora_r < 0:
            raise ConfigError(f"lora_r must be >= 0 (0 = LoRA off), got {self.lora_r}")
        if self.lora_r == 0:
            return
        if self.fsdp:
            raise ConfigError("lora_r > 0 with fsdp=true: LoRA adapters are not sharded with FSDP2 yet; "
                              "use DDP (fsdp=false) under torchrun")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules.strip(" ,"):
            raise ConfigError("lora_target_modules must be 'all-linear' or a comma-separated list of module names")
        if getattr(self, "ref_ema", None) is not None and not getattr(self, "ref", ""):
            raise ConfigError("ref_ema with lora_r > 0: the reference is the policy with its adapters disabled, "
                              "which has no weights of its own to average; pass --ref=DIR or turn ref_ema off")


def check_task(cfg, key):
    """PPO-C (ppo_c) and PPO-M (calibrated) need the confidence task."""
    if getattr(cfg, key) and cfg.task != "confidence":
        raise ConfigError(f"{key} needs task=confidence (responses that state a confidence), got task={cfg.task!r}")
