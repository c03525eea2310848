"""TRL drop-in: a `GRPOTrainer` whose log-probs come from `rk.linear_logprobs`, whose loss is
`rk.ppo_policy_loss` and whose group advantages come from `rk.group_advantages`.

The seams TRL 1.16 offers, smallest first:
- log-probs: `GRPOTrainer.__init__` installs TRL's fused LM head with `add_fused_lm_head` (a name it
  imports from trl.trainer.utils) on the policy and the reference; `RKGRPOTrainer` swaps that name for
  `add_rk_lm_head` (python/examples/trl_dpo.py) while the parent constructor runs, as the DPO drop-in does.
- loss: TRL computes it inline in `_compute_loss` (log-probs, ratio, clipping, KL, normalisation and the
  metrics in one method), so that method is overridden. It calls TRL's own
  `_get_per_token_logps_and_entropies` (which now goes through our head), maps the TRL config onto
  `rk.ppo_policy_loss`'s arguments (`rk_loss_arguments`) and makes one call.
- advantages: TRL computes them inline in `_generate_and_score_completions` from the rewards that
  `_calculate_rewards` returns. The subclass keeps those rewards, lets TRL finish, and replaces the
  advantages by `rk.group_advantages` of the same rewards (the check below compares the two).

Configurations the op does not express (loss_type "sapo" or "vespo", the entropy bonus, a MoE auxiliary
loss, CISPO with epsilon_high < 1, `delta` below 1 + epsilon_high) keep TRL's own loss on our log-probs;
`rk_loss_arguments` returns the reason, logged once. docs/grpo.md ("Using the ops inside TRL's
GRPOTrainer") gives the mapping and where TRL departs from the published methods.

Runs offline: the word-level tokenizer and the tiny Llama are built here, as in trl_dpo.py.

    python python/examples/trl_grpo.py
"""
import copy
import importlib.util
import os
import tempfile
import warnings

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import grpo_trainer as grpo_module

import rlhf_kernels as rk
from rlhf_kernels.reference import aggregate


def _sibling(name):
    """A module of this folder, loaded by path: works when run as a script and when a test loads this file."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                      f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_dpo = _sibling("trl_dpo")
add_rk_lm_head, build_tokenizer, WORDS = _dpo.add_rk_lm_head, _dpo.build_tokenizer, _dpo.WORDS

# the optional inputs TRL's _compute_loss forwards to _get_per_token_logps_and_entropies (vision models)
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                   "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class RKGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with rk's head, loss and group advantages (see the module docstring).

    `rk_use_trl_loss = True` routes `_compute_loss` to TRL's own; `use_trl_head(True)` routes the fused
    head of the policy and the reference to TRL's; `rk_group_advantages = False` keeps TRL's advantages."""

    def __init__(self, *args, **kwargs):
        self.rk_models, self.rk_use_trl_loss, self.rk_group_advantages = [], False, True
        self.rk_fallback_reason, self.rk_advantages_pair, self._rk_rewards = None, None, None

        def install(model, **kw):
            add_rk_lm_head(model, **kw)
            self.rk_models.append(model)

        saved, grpo_module.add_fused_lm_head = grpo_module.add_fused_lm_head, install
        try:
            super().__init__(*args, **kwargs)
        finally:
            grpo_module.add_fused_lm_head = saved

    def use_trl_head(self, on):
        for m in self.rk_models:
            m.rk_use_trl_head = on

    # ---- advantages -------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rk_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rk_rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        per_func = self._rk_rewards  # [all processes' samples, reward functions], gathered by TRL
        scale = {"group": "std", "none": "none"}.get(self.scale_rewards)
        # what group_advantages expresses: summed weighted rewards, a per-group mean and (optionally) the
        # group's std; TRL's "batch" std, "normalize_then_sum" and unscorable (all-None) samples stay TRL's
        if (not self.rk_group_advantages or scale is None or self.multi_objective_aggregation != "sum_then_normalize"
                or torch.isnan(per_func).all(1).any()):
            return out
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(1)
        adv = rk.group_advantages(rewards, G, baseline="mean", scale=scale, eps=1e-4)  # TRL divides by std + 1e-4
        n = out["advantages"].shape[0]
        adv = adv[self.accelerator.process_index * n:(self.accelerator.process_index + 1) * n]
        self.rk_advantages_pair = (adv, out["advantages"])  # (ours, TRL's) for the check in main()
        out["advantages"] = adv
        return out

    # ---- loss -------------------------------------------------------------------------------------
    def rk_loss_arguments(self, inputs, rows, train):
        """(keyword arguments of rk.ppo_policy_loss, divisor applied after it) for this config, or
        (None, reason) when the op does not express it."""
        lt, a = self.loss_type, self.args
        if lt not in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo"):
            return None, f"loss_type={lt!r}"
        if self._entropy_bonus_enabled or self.aux_loss_enabled:
            return None, "the entropy bonus / MoE auxiliary loss"
        if lt == "cispo" and self.epsilon_high < 1:
            return None, f"cispo with epsilon_high={self.epsilon_high} < 1 (TRL caps the ratio itself at epsilon_high)"
        if lt != "cispo" and a.delta is not None and a.delta < 1 + self.epsilon_high:
            return None, f"delta={a.delta} below 1 + epsilon_high"
        accum = self.current_gradient_accumulation_steps if train else 1.0
        kw = {"ratio_level": self.importance_sampling_level}
        if lt == "cispo":  # TRL's CISPO weight is min(ratio, epsilon_high): our 1 + clip_high
            kw.update(loss_type="cispo", clip_high=self.epsilon_high - 1)
        else:  # TRL's delta caps the ratio of negative-advantage tokens: the dual clip
            kw.update(clip_low=self.epsilon_low, clip_high=self.epsilon_high, dual_clip=a.delta)
        if lt == "grpo":  # mean over the micro-batch's rows, empty rows included, per accumulation step
            kw.update(aggregation="seq-mean-token-mean", denominator=rows)
        elif lt == "luspo":
            kw.update(aggregation="seq-mean-token-sum", denominator=rows)
        elif lt == "bnpo":  # the micro-batch's own token count
            kw.update(aggregation="token-mean")
        elif lt == "dr_grpo":
            kw.update(aggregation="token-mean", denominator=rows * self.max_completion_length)
        else:  # dapo, cispo: the generation batch's token count, spread over its accumulation steps
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                n = n * self.current_gradient_accumulation_steps / a.steps_per_generation
            kw.update(aggregation="token-mean", denominator=n)
            accum = 1.0
        return kw, accum

    def _compute_loss(self, model, inputs):
        train = self.model.training
        kw, accum = self.rk_loss_arguments(inputs, inputs["completion_ids"].shape[0], train)
        if kw is None or self.rk_use_trl_loss:
            if kw is None and self.rk_fallback_reason != accum:
                self.rk_fallback_reason = accum
                warnings.warn(f"RKGRPOTrainer: TRL's own loss is used for {accum} (rk.ppo_policy_loss does not "
                              "express it); the log-probs are still rk's", stacklevel=2)
            return super()._compute_loss(model, inputs)
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        logp, entropies, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), completion_ids.shape[1],
            compute_entropy=True, **{k: inputs.get(k) for k in MULTIMODAL_KEYS})
        adv = inputs["advantages"]  # [B] (TRL's) or [B, T] (a subclass's): both are ppo_policy_loss inputs
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old

        # TRL's multiplicative masks and the sampler correction weigh the policy term only: `weights`
        weights = None
        if self.top_entropy_quantile < 1.0:
            weights = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile).to(logp.dtype)
        if self.off_policy_mask_threshold is not None:
            keep = self.get_off_policy_mask(adv if adv.dim() == 2 else adv[:, None], logp,
                                            inputs.get("sampling_per_token_logps", old), mask,
                                            self.off_policy_mask_threshold)
            weights = keep if weights is None else weights * keep
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
            weights = ratio if weights is None else weights * ratio
        if weights is not None:
            weights = weights.to(logp.dtype).expand_as(logp)

        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        extra = 0.0
        if ref is not None and self.args.use_bias_correction_kl:
            # DeepSeek-V3.2's KL weighted by the (differentiable) ratio: not an argument of the op, so it is
            # added here; ref_logp with kl_coef=0 still gives the unweighted kl stat
            log_ratio = (logp - old) * mask
            if self.importance_sampling_level == "sequence":
                log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
            kl = rk.token_kl(logp, ref, estimator="k3") * torch.exp(log_ratio)
            extra = self.beta * aggregate(kl, mask, kw["aggregation"], kw.get("denominator"))
            kw.update(ref_logp=ref, kl_coef=0.0)
        elif ref is not None:
            kw.update(ref_logp=ref, kl_coef=self.beta, kl_estimator="k3")  # TRL's per-token KL is k3
        loss, stats = rk.ppo_policy_loss(logp, old, adv, mask, weights=weights, **kw)
        loss = (loss + extra) / accum

        metrics = self._metrics["train" if train else "eval"]
        totals = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum().float()]).detach(), "sum")
        metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        for k, v in stats.items():  # rk's stats: masked means over this process's valid tokens
            metrics["kl" if k == "kl" else f"rk/{k}"].append(self.accelerator.gather(v).mean().item())
        return loss


def build_dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
    return Dataset.from_list([{"prompt": pick(int(torch.randint(2, 5, (), generator=g)))} for _ in range(n)])


def distinct_words(completions, **kwargs):
    """A toy reward with ties and spread: distinct words, minus a little per word."""
    return [len(set(c.split())) - 0.3 * len(c.split()) for c in completions]


# loss configurations checked against TRL's own loss (TRL's GRPOConfig field names)
CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.02, epsilon_high=0.03),
    "gspo_dapo": dict(loss_type="dapo", importance_sampling_level="sequence", epsilon=0.02, epsilon_high=0.03),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=0.02, epsilon_high=0.03),
    "cispo": dict(loss_type="cispo", epsilon_high=1.1),
    "dapo_delta": dict(loss_type="dapo", epsilon=0.1, delta=1.15),
    "grpo_kl": dict(loss_type="grpo", beta=0.3, use_bias_correction_kl=False),
    "grpo_kl_corrected": dict(loss_type="grpo", beta=0.3, use_bias_correction_kl=True),
    "gspo_kl_corrected": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.02,
                              epsilon_high=0.03, beta=0.3, use_bias_correction_kl=True),
    "bnpo_masks": dict(loss_type="bnpo", top_entropy_quantile=0.5, off_policy_mask_threshold=0.02),
    "sapo": dict(loss_type="sapo"),  # not expressed by the op: TRL's loss on rk's log-probs
}


def configure(trainer, epsilon=0.2, epsilon_high=None, beta=0.0, **fields):
    """Apply a CASES entry to a built trainer: its GRPOConfig fields and the attributes GRPOTrainer.__init__
    derives from them (the batch, and so the reference log-probs, stay those of the trainer as built)."""
    for k, v in fields.items():
        setattr(trainer.args, k, v)
    trainer.loss_type = fields.get("loss_type", "dapo")
    trainer.importance_sampling_level = fields.get("importance_sampling_level", "token")
    trainer.epsilon_low, trainer.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    trainer.args.delta = fields.get("delta")
    trainer.beta = beta
    trainer.top_entropy_quantile = fields.get("top_entropy_quantile", 1.0)
    trainer.off_policy_mask_threshold = fields.get("off_policy_mask_threshold")
    trainer.rk_fallback_reason = None


def main(cases=tuple(CASES), n_prompts=8, group=4, completion=8, steps=1, seed=0, dtype=torch.float64):
    """One generated batch (2 prompts x `group` completions, a stale `old` policy, a reference, one row
    masked out), then for each case the loss and parameter gradient of: TRL's head + TRL's loss, TRL's
    head + rk's loss, rk's head + rk's loss. Returns {case: {...}} and the advantages' agreement, plus the
    loss of `steps` training steps with everything rk's."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=None)
    ref_model = LlamaForCausalLM(cfg).to(dtype)
    # a policy that differs from the reference, so the KL term and its gradient are not zero
    model = copy.deepcopy(ref_model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        # GRPOTrainer loads its reference from the policy's config._name_or_path: the saved reference
        ref_model.save_pretrained(os.path.join(tmp, "ref"))
        model.config._name_or_path = os.path.join(tmp, "ref")
        args = GRPOConfig(output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=2 * group,
                          num_generations=group, max_completion_length=completion, max_steps=steps,
                          learning_rate=1e-3, beta=0.04, report_to="none", logging_steps=1, save_strategy="no",
                          use_cpu=True, bf16=False, dataloader_num_workers=0, seed=seed, disable_tqdm=True)
        trainer = RKGRPOTrainer(model=model, reward_funcs=distinct_words, args=args,
                                train_dataset=build_dataset(n_prompts, seed), processing_class=tokenizer)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch here
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        ours, trls = trainer.rk_advantages_pair
        result = {"advantages_max_diff": (ours - trls).abs().max().item(), "advantages_scale": trls.abs().max().item()}
        # a stale policy: old log-probs off by noise, so the clipping binds; and one row with no valid token
        g = torch.Generator().manual_seed(seed + 1)
        mask = inputs["completion_mask"].clone()
        mask[-1] = 0
        inputs = dict(inputs, completion_mask=mask, num_items_in_batch=mask.sum())
        trainer.use_trl_head(True)
        with torch.no_grad():
            logp = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], mask], 1), mask.shape[1])[0]
        noise = 0.3 * torch.randn(logp.shape, generator=g, dtype=logp.dtype)
        inputs["old_per_token_logps"] = (logp + noise) * mask

        def loss_and_grad(trl_head, trl_loss):
            trainer.use_trl_head(trl_head)
            trainer.rk_use_trl_loss = trl_loss
            trainer.model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(trainer.model, inputs)
            loss.backward()
            grads = [p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]
            return loss.item(), torch.cat(grads)

        for name in cases:
            configure(trainer, **CASES[name])
            (l_trl, g_trl), (l_mix, g_mix), (l_rk, g_rk) = (loss_and_grad(*f) for f in
                                                            ((True, True), (True, False), (False, False)))
            result[name] = {"loss_trl": l_trl, "loss_rk_loss": l_mix, "loss_rk": l_rk,
                            "grad_scale": g_trl.abs().max().item(),
                            "grad_diff_rk_loss": (g_mix - g_trl).abs().max().item(),
                            "grad_diff_rk": (g_rk - g_trl).abs().max().item(),
                            "fallback": trainer.rk_fallback_reason,
                            "clipfrac": None if trainer.rk_fallback_reason else trainer._metrics["train"]["rk/clipfrac"][-1]}
        configure(trainer, loss_type="dapo", beta=0.04, use_bias_correction_kl=False)
        trainer.use_trl_head(False)
        trainer.rk_use_trl_loss = False
        trainer.model.zero_grad(set_to_none=True)
        calls = [m.rk_calls for m in trainer.rk_models]
        trainer._buffered_inputs = None  # generate afresh for training
        result["train_loss"] = trainer.train().training_loss if steps else None
        result["rk_head_calls_in_training"] = [m.rk_calls - c for m, c in zip(trainer.rk_models, calls)]
    return result


if __name__ == "__main__":
    r = main()
    print(f"advantages: rk.group_advantages vs TRL's, max |diff| {r['advantages_max_diff']:.1e} "
          f"(max |A| {r['advantages_scale']:.2f})")
    for name in CASES:
        c = r[name]
        print(f"{name:>18}: loss TRL {c['loss_trl']:+.10f}  rk loss {c['loss_rk_loss']:+.10f}  "
              f"rk head+loss {c['loss_rk']:+.10f}  max|Δgrad| {c['grad_diff_rk_loss']:.1e} / "
              f"{c['grad_diff_rk']:.1e} (max|grad| {c['grad_scale']:.1e}) clipfrac {c['clipfrac']}"
              + (f" [TRL's loss: {c['fallback']}]" if c["fallback"] else ""))
    print(f"training loss {r['train_loss']}, rk head calls during training [policy, reference] "
          f"{r['rk_head_calls_in_training']}")
