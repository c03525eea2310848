"""TRL drop-in: a `DPOTrainer` whose sequence log-probs come from `rk.linear_logprobs`.

TRL 1.16 computes DPO log-probs by patching the model's `forward` (`trl.trainer.utils.add_fused_lm_head`):
`_compute_loss` calls `model(..., labels=labels, fused_lm_head=True)` and reads per-token `log_probs`
(the loss), `entropy`, `mean_logits` and `is_top1` (the logged metrics) from the result. That patch
is the seam: `RKDPOTrainer` installs `add_rk_lm_head` in its place on the policy and the reference,
so the fused call runs the backbone and then `rk.linear_logprobs` on the final hidden states and
`lm_head.weight`. Everything else (data, loss types, metrics, optimiser, Accelerate) stays TRL's.

Precision: the check below runs in fp32 (`bf16=False`). Under bf16 autocast TRL's head computes the
logits in bf16, while `rk.linear_logprobs` accumulates in fp32 from the tensors' own dtypes (it is
not an autocast op), so the two then differ by bf16 rounding, not by method.

Runs offline: the tokenizer (a word-level `tokenizers` model) and the tiny Llama are built here.

    python python/examples/trl_dpo.py
"""
import copy
import tempfile
import types

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer
from trl.trainer import dpo_trainer as dpo_module
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head as trl_add_fused_lm_head

import rlhf_kernels as rk

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "runs", "sleeps", "sings", "fast", "slow", "the", "a",
         "big", "small", "yes", "no", "what", "is", "colour"]


def add_rk_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",), token_accuracy=True,
                   chunk=256):
    """TRL's `add_fused_lm_head` (same signature) with the fused call computed by `rk.linear_logprobs`:
    `model(..., labels=..., fused_lm_head=True)` returns TRL's `FusedCausalLMOutput`. TRL's own head
    is installed first and kept underneath; setting `model.rk_use_trl_head = True` routes the fused
    call back to it (the check in `main` uses that), and calls without `fused_lm_head` reach it too,
    which passes them to the model's original forward.

    `mean_logits` is exact and cheap (the vocabulary mean of `h·w_v` is `h·mean_v(w_v)`). `is_top1`
    (TRL's `mean_token_accuracy` metric) needs each row's arg-max, which log-probs alone do not give:
    it is found without gradient over `chunk` rows at a time (one extra GEMM, never a full
    `[batch, seq, vocab]` tensor); `token_accuracy=False` skips it and the metric then reads 0. Like
    TRL's head, fields not named in `outputs` are None (GRPOTrainer asks for log-probs and entropy only).

    `cast_lm_head_to_fp32` casts the hidden states and the head to fp32 first, as TRL's flag does (our
    kernel accumulates in fp32 either way). Models whose head TRL rescales or soft-caps (config fields
    `final_logit_softcapping`, `logit_scale`, `output_multiplier`, `lm_head_multiplier`, `logits_scaling`)
    are refused rather than scored differently.
    """
    if "log_sum_sq_probs" in outputs:
        raise ValueError("outputs: log_sum_sq_probs (WPO weighting) is not computed by rk.linear_logprobs")
    text_config = model.config.get_text_config()
    for field in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text_config, field, None) not in (None, 1, 1.0):
            raise ValueError(f"model: config.{field}={getattr(text_config, field)!r} rescales the logits; "
                             "add_rk_lm_head covers heads without it")
    trl_add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)
    trl_forward = model.forward
    model.rk_use_trl_head, model.rk_calls = False, 0

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or self.rk_use_trl_head:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        self.rk_calls += 1
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if cast_lm_head_to_fp32:
            weight, bias = weight.float(), None if bias is None else bias.float()
        hidden = hidden.to(weight.dtype)  # autocast may hand back a lower-precision backbone output
        mask = labels != -100
        # validate=False: no host sync on the token range; every label is a tokenizer id or -100
        out = rk.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                 return_entropy="entropy" in outputs, validate=False)
        log_probs, entropy = out if "entropy" in outputs else (out, None)
        mean_logits = is_top1 = None
        with torch.no_grad():
            h, w = hidden.float(), weight.float()
            if "mean_logits" in outputs:
                mean_logits = h @ w.mean(0)
                if bias is not None:
                    mean_logits = mean_logits + bias.float().mean()
                mean_logits = (mean_logits / temperature).masked_fill(~mask, 0)
            if "is_top1" in outputs:
                is_top1 = torch.zeros_like(mask)
            if "is_top1" in outputs and token_accuracy:
                flat_h, flat_y, flat_top = h.reshape(-1, h.shape[-1]), labels.reshape(-1), is_top1.view(-1)
                for i in range(0, flat_h.shape[0], chunk):
                    logits = flat_h[i:i + chunk] @ w.T
                    if bias is not None:
                        logits = logits + bias.float()
                    flat_top[i:i + chunk] = logits.argmax(-1) == flat_y[i:i + chunk]
                is_top1 &= mask
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


class RKDPOTrainer(DPOTrainer):
    """`DPOTrainer` with its log-probs (policy and reference) computed by `rk.linear_logprobs`.

    `DPOTrainer.__init__` installs its fused head with `add_fused_lm_head` (a name it imports
    from trl.trainer.utils) on the policy and the reference, before Accelerate wraps them for mixed
    precision. Swapping that name for `add_rk_lm_head` while the parent constructor runs puts our
    head at exactly that point, so Accelerate's wrapping and everything after it stay TRL's."""

    def __init__(self, *args, **kwargs):
        self.rk_models = []

        def install(model, **kw):
            add_rk_lm_head(model, **kw)
            self.rk_models.append(model)

        saved, dpo_module.add_fused_lm_head = dpo_module.add_fused_lm_head, install
        try:
            super().__init__(*args, **kwargs)
        finally:
            dpo_module.add_fused_lm_head = saved

    def use_trl_head(self, on):
        """Route the fused call of the policy and the reference to TRL's head (on) or ours (off)."""
        for m in self.rk_models:
            m.rk_use_trl_head = on


def build_tokenizer():
    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def build_dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
    rows = []
    for _ in range(n):
        lens = torch.randint(2, 6, (3,), generator=g).tolist()  # ragged prompts and completions
        rows.append({"prompt": pick(lens[0]), "chosen": " " + pick(lens[1]), "rejected": " " + pick(lens[2])})
    return Dataset.from_list(rows)


def main(n_pairs=16, batch=4, steps=2, seed=0, loss_type="sigmoid", out_dir=None):
    """For one batch scored by both heads on the same weights: the two losses, the largest gradient
    difference (and the gradient scale), the largest differences of the per-token fields and the
    number of disagreeing `is_top1` flags; plus the mean loss of `steps` training steps with ours and
    how many fused calls each model (policy, reference) made through rk during them."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    # a reference that differs from the policy, so the DPO margins (and the loss) are not trivially log 2
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=out_dir or tmp, per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=1e-3, loss_type=[loss_type], report_to="none", logging_steps=1,
                         save_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0, seed=seed,
                         disable_tqdm=True)
        trainer = RKDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=build_dataset(n_pairs, seed),
                               processing_class=tokenizer)
        batch_inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()

        def loss_and_grad():
            trainer.model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(trainer.model, batch_inputs)
            loss.backward()
            return loss.item(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

        def head_outputs():
            keys = ("input_ids", "attention_mask")
            labels = batch_inputs["input_ids"].masked_fill(batch_inputs["completion_mask"] == 0, -100)
            with torch.no_grad():
                out = trainer.model(**{k: batch_inputs[k] for k in keys}, labels=labels, fused_lm_head=True)
            return {k: out[k] for k in ("log_probs", "entropy", "mean_logits", "is_top1")}

        loss_rk, grad_rk = loss_and_grad()
        fields_rk = head_outputs()
        trainer.use_trl_head(True)
        loss_trl, grad_trl = loss_and_grad()
        fields_trl = head_outputs()
        trainer.use_trl_head(False)
        trainer.model.zero_grad(set_to_none=True)
        calls_before = [m.rk_calls for m in trainer.rk_models]
        train_loss = trainer.train().training_loss
        train_calls = [m.rk_calls - c for m, c in zip(trainer.rk_models, calls_before)]
    result = {"loss_rk": loss_rk, "loss_trl": loss_trl, "max_grad_diff": (grad_rk - grad_trl).abs().max().item(),
              "grad_scale": grad_trl.abs().max().item(), "train_loss": train_loss,
              "top1_mismatches": (fields_rk["is_top1"] != fields_trl["is_top1"]).sum().item(),
              "top1_count": fields_trl["is_top1"].sum().item(),
              "rk_head_calls_in_training": train_calls}  # [policy, reference]
    for k in ("log_probs", "entropy", "mean_logits"):
        result[f"max_diff_{k}"] = (fields_rk[k] - fields_trl[k]).abs().max().item()
    return result


if __name__ == "__main__":
    r = main()
    print(f"same batch: loss with rk.linear_logprobs {r['loss_rk']:.6f}, with TRL's fused head {r['loss_trl']:.6f}; "
          f"max |Δgrad| {r['max_grad_diff']:.2e} (max |grad| {r['grad_scale']:.2e}); "
          f"training loss over the run {r['train_loss']:.4f}")
    print({k: v for k, v in r.items() if k.startswith(("max_diff", "top1", "rk_"))})
