"""One PPO update step (policy and value: forward, losses, backward) at a large vocabulary with a tiny
hidden size, the trainer's two log-prob implementations side by side:
  fused  rk.linear_logprobs on the final hidden states and lm_head.weight (never builds the logits)
  naive  lm_head(h) -> log_softmax -> gather (what most trainers do)
Everything else is identical (rlhf_kernels.train.models.token_logprobs, rk.ppo_policy_loss,
rk.ppo_value_loss). Targets (issue 5): fused peak memory <= 0.5x naive, time no worse.

Floor: the head's three GEMMs (logits, d hidden, d weight) = 6·B·T·V·H FLOPs dominate at this shape;
naive must also write and read the [B, T, V] fp32 logits and their gradient several times.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rlhf_kernels as rk
from rlhf_kernels.train.models import hidden_states, token_logprobs

from bench.common import fmt_time, interleaved, peak_bytes, script_main, table, write_csv


def _setup(B, T, V, H, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2 * T,
                      tie_word_embeddings=False)
    policy = LlamaForCausalLM(cfg)
    value_head = torch.nn.Linear(H, 1)
    prompt = T // 4
    ids = torch.randint(0, V, (B, T))
    attn = torch.ones_like(ids)
    mask = torch.ones(B, T - prompt, dtype=torch.bool)
    mask[0, -(T // 8):] = False  # a shorter response, as in a real batch
    with torch.no_grad():
        old = token_logprobs(policy, ids, attn, prompt, mask, impl="fused")
        old_v = value_head(hidden_states(policy, ids, attn)[:, prompt - 1:-1]).squeeze(-1)
    adv = torch.randn_like(old)
    ret = old_v + torch.randn_like(old_v)
    return policy, value_head, ids, attn, prompt, mask, old, old_v, adv, ret


def run(quick=False, csv_dir=None, bandwidth=None):
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

    fns = {"naive (logits + log_softmax)": step("naive"), "fused (rk.linear_logprobs)": step("fused")}
    res = interleaved(fns, repeats=3 if quick else 5)
    mem = {k: peak_bytes(fn) for k, fn in fns.items()}
    base_t, base_m = res["naive (logits + log_softmax)"][0], mem["naive (logits + log_softmax)"]
    rows = [{"impl": k, "median": fmt_time(med), "spread": f"{fmt_time(lo)} – {fmt_time(hi)}",
             "speedup vs naive": f"{base_t / med:.2f}x", "peak memory": f"{mem[k] / 2**20:.0f} MiB",
             "memory vs naive": f"{mem[k] / base_m:.2f}x"} for k, (med, lo, hi) in res.items()]
    cols = ["impl", "median", "spread", "speedup vs naive", "peak memory", "memory vs naive"]
    text = table(f"PPO train step (policy + value, fwd + bwd), B={B} T={T} V={V} H={H} fp32, "
                 f"{sum(p.numel() for p in params) / 1e6:.1f}M params", rows, cols)
    if csv_dir:
        write_csv(f"{csv_dir}/train_step.csv", rows, cols)
    return text


if __name__ == "__main__":
    script_main(run)
