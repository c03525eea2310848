"""Models: any Hugging Face `AutoModelForCausalLM` as policy or reference, a scalar head on such a
backbone as reward model or critic, and the one function every policy log-prob goes through."""
import os
import shutil
from pathlib import Path

import torch

import rlhf_kernels as rk

from ..tasks import sentiment
from . import lora, tp_head

TINY = ("tiny-llama", "tiny-gpt2")
HEAD_FILE = "scalar_head.safetensors"


def attn_implementation(device):
    """flash-attn where it is installed on a CUDA machine, else PyTorch SDPA (DESIGN.md, Trainer)."""
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_lm(spec, device="cpu", vocab_size=len(sentiment.WORDS)):
    """A causal LM from a tiny architecture name (built from a config, seeded by the caller) or a
    saved model directory; dropout off, eval mode (N+ detail 7), checked for a usable LM head."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    attn = attn_implementation(device)
    if spec in TINY:
        model = AutoModelForCausalLM.from_config(sentiment.model_config(spec, vocab_size), attn_implementation=attn)
    else:
        if not Path(spec, "config.json").is_file():
            raise FileNotFoundError(f"model {spec!r} is neither one of {', '.join(TINY)} nor a saved model "
                                    f"directory (no {Path(spec, 'config.json')})")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, attn_implementation=attn)
        except Exception as e:
            raise RuntimeError(f"cannot load the model in {spec}: {e}") from e
    disable_dropout(model)
    check_lm(model, vocab_size, spec)
    return model.to(device)


def load_reference(spec, policy, device="cpu"):
    """The reference model: `spec` if given, else a copy of the initial policy (a copy rather than a
    second load, so that a policy built from a tiny config gets the very same weights); for a LoRA
    policy, the policy itself with its adapters disabled (lora.AdaptersOff: no copy)."""
    import copy
    if spec:
        return load_lm(spec, device)
    return lora.AdaptersOff(policy) if lora.is_peft(policy) else copy.deepcopy(policy)


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.eval()  # dropout is off anyway; eval() also covers models whose dropout is functional


def check_lm(model, vocab_size, name="model"):
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{name}: the model has no lm_head (get_output_embeddings() gave {head!r}); "
                         "the trainer needs a causal LM whose head is a linear layer")
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    if hidden is not None and head.weight.shape[1] != hidden:
        raise ValueError(f"{name}: lm_head.weight is {tuple(head.weight.shape)} but the hidden size is {hidden}")
    if head.weight.shape[0] < vocab_size:
        raise ValueError(f"{name}: lm_head has {head.weight.shape[0]} rows but the tokenizer has {vocab_size} tokens")


def hidden_states(model, ids, attn):
    """Final hidden states [B, T, H] (after the final norm) without computing any logits."""
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    body, context = lora.body(model)  # a LoRA policy (or its adapters-off reference) is wrapped by peft
    with context:
        return body(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state


def token_logprobs(model, ids, attn, start, mask, temperature=1.0, impl="fused", entropy=False, top_k=None,
                   top_p=None):
    """Log-probs [B, T - start] of the tokens ids[:, start:] at positions where `mask`, 0 elsewhere
    (and their entropies). "fused" feeds hidden states and lm_head.weight to rk.linear_logprobs;
    "naive" materialises the logits and calls log_softmax (rk.logprobs_from_logits when top_k / top_p replay
    a sampler's cut: a token outside it gets −inf). This is the trainer's one call of the LM head (under
    torchrun too, through parallel.LMForward); a head sharded by `--tp_head` (tp_head.ShardedHead) runs the
    vocabulary-parallel op on the job's gathered rows there."""
    h = hidden_states(model, ids, attn)[:, start - 1:-1]
    tokens = torch.where(mask, ids[:, start:], torch.full_like(ids[:, start:], -100))
    head = model.get_output_embeddings()
    if isinstance(head, tp_head.ShardedHead):
        if impl != "fused" or top_k is not None or top_p is not None:
            raise ValueError("a head sharded with tp_head computes fused log-probs without a sampler replay, got "
                             f"impl={impl!r}, top_k={top_k!r}, top_p={top_p!r}")
        return head.logprobs(h, tokens, temperature=temperature, entropy=entropy)
    bias = getattr(head, "bias", None)
    if impl == "fused":
        return rk.linear_logprobs(h, head.weight, tokens, bias=bias, temperature=temperature,
                                  return_entropy=entropy, validate=False, top_k=top_k, top_p=top_p)
    if top_k is not None or top_p is not None:
        return rk.logprobs_from_logits(head(h).float(), tokens, temperature=temperature, return_entropy=entropy,
                                       validate=False, top_k=top_k, top_p=top_p)
    logits = head(h).float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    lp = logp_all.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    if not entropy:
        return lp
    ent = -(logp_all.exp() * logp_all).sum(-1) * mask
    return lp, ent


class ScalarModel(torch.nn.Module):
    """A causal LM backbone with a linear head giving one scalar per position: the reward model
    (read at the last valid token) and the critic (read at every response state). `offset` is
    subtracted from every output (N+ detail 15: reward normalised on SFT demonstrations)."""

    def __init__(self, lm, head=None):
        super().__init__()
        self.lm = lm
        if head is None:
            hidden = lm.get_output_embeddings().weight.shape[1]
            head = torch.nn.Linear(hidden, 1)
            torch.nn.init.normal_(head.weight, std=1 / (hidden + 1) ** 0.5)  # N+ ScalarModel init
            torch.nn.init.zeros_(head.bias)
        self.head = head
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, ids, attn):
        return self.head(hidden_states(self.lm, ids, attn)).squeeze(-1).float() - self.offset

    def score(self, ids, attn):
        """The scalar at each row's last attended position."""
        return at_last(self(ids, attn), ids, attn)

    def save(self, path):
        def write(tmp):
            from safetensors.torch import save_file
            self.lm.save_pretrained(tmp)
            save_file({"weight": self.head.weight.detach().contiguous(), "bias": self.head.bias.detach(),
                       "offset": self.offset.detach().reshape(1)}, str(Path(tmp, HEAD_FILE)))
        save_dir(path, write)

    @classmethod
    def load(cls, path, device="cpu"):
        from safetensors.torch import load_file
        head_file = Path(path, HEAD_FILE)
        if not head_file.is_file():
            raise FileNotFoundError(f"{path} is not a saved reward model (no {HEAD_FILE})")
        try:
            t = load_file(str(head_file))
        except Exception as e:
            raise RuntimeError(f"cannot read {head_file}: {e}") from e
        lm = load_lm(str(path), device)
        head = torch.nn.Linear(t["weight"].shape[1], 1)
        with torch.no_grad():
            head.weight.copy_(t["weight"])
            head.bias.copy_(t["bias"])
        m = cls(lm, head)
        m.offset.fill_(float(t["offset"][0]))
        return m.to(device)


def at_last(out, ids, attn):
    """out[b, t] at each row's last attended position t."""
    idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last = torch.where(attn.bool(), idx, torch.zeros_like(idx)).amax(-1)
    return out.gather(1, last[:, None]).squeeze(1)


def save_dir(path, write):
    """Write a directory through `write(tmp_dir)` and swap it into place, so a crash mid-save leaves
    the previous copy intact."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_lm(model, path):
    save_dir(path, lambda tmp: lora.save_pretrained(model, tmp))  # LoRA: merged weights + adapter/


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model
