"""One PPO update step (policy and value: forward, losses, backward) at a large vocabulary with a tiny
hidden size, the trainer's two log-prob implementations side by side:
  fused  rk.linear_logprobs on the final hidden states and lm_head.weight (never builds the logits)
  naive  lm_head(h) -> log_softmax -> gather (what most trainers do)
Everything else is identical (rlhf_kernels.train.core.models.token_logprobs, rk.ppo_policy_loss,
rk.ppo_value_loss). Targets (issue 5): fused peak memory <= 0.5x naive, time no worse.

Floor: the head's three GEMMs (logits, d hidden, d weight) = 6·B·T·V·H FLOPs dominate at this shape;
naive must also write and read the [B, T, V] fp32 logits and their gradient several times.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rlhf_kernels as rk
from rlhf_kernels.train.core.models import hidden_states, token_logprobs

from .common import DEVICE, measure, report, script_main


def _setup(B, T, V, H, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2 * T,
                      tie_word_embeddings=False)
    policy = LlamaForCausalLM(cfg).to(DEVICE)
    value_head = torch.nn.Linear(H, 1).to(DEVICE)
    prompt = T // 4
    ids = torch.randint(0, V, (B, T), device=DEVICE)
    attn = torch.ones_like(ids)
    mask = torch.ones(B, T - prompt, dtype=torch.bool, device=DEVICE)
    mask[0, -(T // 8):] = False  # a shorter response, as in a real batch
    with torch.no_grad():
        old = token_logprobs(policy, ids, attn, prompt, mask, impl="fused")
        old_v = value_head(hidden_states(policy, ids, attn)[:, prompt - 1:-1]).squeeze(-1)
    adv = torch.randn_like(old)
    ret = old_v + torch.randn_like(old_v)
    return policy, value_head, ids, attn, prompt, mask, old, old_v, adv, ret


def run(quick=False, csv_dir=None, ceilings=None):
    B, T, V, H = (2, 128, 32000, 32) if quick else (4, 512, 128256, 64)
    policy, value_head, ids, attn, prompt, mask, old, old_v, adv, ret = _setup(B, T, V, H)
    params = list(policy.parameters()) + list(value_head.parameters())

    def step(impl):
        def f():
            for p in params:
                p.grad = None
            # the trainer computes values from the critic's own pass; here the value head shares the body
            logp = token_logprobs(policy, ids, attn, prompt, mask, impl=impl)
            v = value_head(hidden_states(policy, ids, attn)[:, prompt - 1:-1]).squeeze(-1)
            pg, _ = rk.ppo_policy_loss(logp, old, adv, mask)
            vf, _ = rk.ppo_value_loss(v, old_v, ret, mask)
            (pg + 0.1 * vf).backward()
        return f

    naive = "naive (logits + log_softmax)"
    fns = {naive: step("naive"), "fused (rk.linear_logprobs)": step("fused")}
    res, peaks = measure(fns, repeats=3 if quick else 5)
    extra = {k: {"memory vs naive": f"{peaks[k] / peaks[naive]:.2f}x"} for k in fns}
    n_resp = B * (T - prompt)
    return report(f"PPO train step (policy + value, fwd + bwd), B={B} T={T} V={V} H={H} fp32, "
                  f"{sum(p.numel() for p in params) / 1e6:.1f}M params (GFLOP/s: the head's 6·N·V·H, "
                  f"N = {n_resp} response tokens)",
                  res, naive, ceilings, csv_name="train_step", csv_dir=csv_dir, flops=6 * n_resp * V * H,
                  peaks=peaks, extra=extra)


if __name__ == "__main__":
    script_main(run)
