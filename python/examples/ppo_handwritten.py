"""A hand-written PPO loop on the public ops only (about 100 lines): a tiny causal LM learns to
emit a target token. Copy it into your own trainer and swap in your model and reward.

    python python/examples/ppo_handwritten.py --updates 30
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rlhf_kernels as rk

VOCAB, PROMPT_LEN, RESP_LEN, TARGET = 32, 4, 8, 7


def policy_logprobs(model, seqs, temperature):
    """Log-probs of each response token from the final hidden states and lm_head (no logits)."""
    out = model.model(input_ids=seqs)
    hidden = out.last_hidden_state[:, PROMPT_LEN - 1:-1]  # position t predicts token t + 1
    tokens = seqs[:, PROMPT_LEN:]
    return rk.linear_logprobs(hidden, model.lm_head.weight, tokens, temperature=temperature, validate=False), hidden


def reward_fn(resp):
    return (resp == TARGET).float().mean(-1)  # gold reward in [0, 1]


def main(updates=30, batch=32, seed=0, temperature=1.0, lr=3e-3, kl_coef=0.02):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    ref.load_state_dict(policy.state_dict())
    ref.eval()
    value_head = torch.nn.Linear(cfg.hidden_size, 1)
    opt = torch.optim.Adam(list(policy.parameters()) + list(value_head.parameters()), lr=lr)
    history = []
    for update in range(updates):
        # ---- rollout: sample, then score old/ref log-probs and values without grad ----
        prompts = torch.randint(0, VOCAB, (batch, PROMPT_LEN))
        with torch.no_grad():
            seqs = policy.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=RESP_LEN,
                                   min_new_tokens=RESP_LEN, do_sample=True, temperature=temperature, top_k=0,
                                   pad_token_id=0)
            old_logp, hidden = policy_logprobs(policy, seqs, temperature)
            ref_logp, _ = policy_logprobs(ref, seqs, temperature)
            values = value_head(hidden).squeeze(-1)
        mask = torch.ones_like(old_logp, dtype=torch.bool)
        score = reward_fn(seqs[:, PROMPT_LEN:])
        history.append(score.mean().item())
        # ---- advantages: KL-penalised token rewards, GAE, whitening ----
        rewards = rk.token_rewards(score, mask, logp=old_logp, ref_logp=ref_logp, kl_coef=kl_coef)
        adv, returns = rk.gae(rewards, values, mask, gamma=1.0, lam=0.95)
        adv = rk.masked_whiten(adv, mask)
        # ---- update: two epochs of full-batch PPO ----
        for _ in range(2):
            logp, hidden = policy_logprobs(policy, seqs, temperature)
            pg_loss, pg_stats = rk.ppo_policy_loss(logp, old_logp, adv, mask, clip_low=0.2)
            vf_loss, vf_stats = rk.ppo_value_loss(value_head(hidden).squeeze(-1), values, returns, mask, clip=0.2)
            loss = pg_loss + 0.1 * vf_loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
        if update % 5 == 0 or update == updates - 1:
            print(f"update {update:3d}  reward {history[-1]:.3f}  pg {pg_loss.item():+.4f}  vf {vf_loss.item():.4f}  "
                  f"clipfrac {pg_stats['clipfrac']:.3f}  approx_kl {pg_stats['approx_kl']:.5f}", flush=True)
    return history


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--updates", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    h = main(a.updates, a.batch, a.seed)
    print(f"mean reward: first 3 updates {sum(h[:3]) / 3:.3f}, last 3 updates {sum(h[-3:]) / 3:.3f}")
