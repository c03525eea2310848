"""ppo_policy_loss forward+backward: rk's kernels vs the eager reference and torch.compile of it; then
the same loss fed from hidden states, against Liger-Kernel's fused-linear GRPO loss (bench/fused_linear.py).

Floor (fp32, per token): forward must read logp, old_logp, advantages (4 B each) and the mask (1 B):
13 B; backward must at least write grad_logp (4 B) and read something per token to know ∂ℓ/∂logp
(a saved 4 B derivative, or the 13 B of inputs as our kernel does, trading bytes for not storing a
[B, T] tensor in forward). The fused kernels move 13 + 17 = 30 B/token; GB/s below counts those
30 B. Compute: one exp and ~15 flops per token per pass, so at these sizes the op is bound by
per-call overhead and memory, not arithmetic.

Fused-linear table: Liger's GRPO loss with beta=0 (no KL term), loss_type="dapo" (Σ over tokens / number
of valid tokens) and per-sequence advantages is PPO's clipped loss with aggregation="token-mean" and the
advantage broadcast over the row: the same math as rk.linear_logprobs → rk.ppo_policy_loss. Its floor
is the head's three GEMMs (6·N·V·H FLOPs), hence GFLOP/s against the GEMM ceiling.
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from .common import DEVICE, measure, peers, report, rk_backends, script_main
from .fused_linear import agreement, head_inputs, naive_logp, step

BYTES_PER_TOKEN = 30


def _inputs(B, T):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g) * 5
    old = logp + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    logp, old, adv, mask = (t.to(DEVICE) for t in (logp, old, adv, mask))
    return logp.requires_grad_(True), old, adv, mask


def _loss_table(B, T, quick, csv_dir, ceilings, compiled):
    logp, old, adv, mask = _inputs(B, T)

    def step_(fn):
        return lambda: torch.autograd.grad(fn(logp, old, adv, mask)[0], logp)

    fns = {"reference (eager)": step_(lambda *a: reference.ppo_policy_loss(*a, 0.2, None, None, "token-mean")),
           "reference (torch.compile)": step_(lambda *a: compiled(*a, 0.2, None, None, "token-mean"))}
    for label, b in rk_backends("ppo_policy_loss").items():
        fns[label] = step_(lambda *a, b=b: rk.ppo_policy_loss(*a, backend=b))
    res, peaks = measure(fns, repeats=20 if quick else 30, warmup=3)
    return report(f"ppo_policy_loss token-mean, forward+backward, {B}x{T} fp32", res, "reference (eager)",
                  ceilings, csv_name=f"ppo_policy_loss_{B}x{T}", csv_dir=csv_dir,
                  nbytes=BYTES_PER_TOKEN * B * T, peaks=peaks)


def _liger_grpo(h, w, tok, mask, adv, old):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.2,
                                    loss_type="dapo")
    return lambda: loss(h, w, tok, mask.float(), adv, old_per_token_logps=old)[0]


def _fused_linear_table(quick, csv_dir, ceilings):
    B, T, H, V = (4, 64, 128, 8192) if quick else (8, 256, 256, 32000)
    h, w, tok, mask = head_inputs(B, T, H, V)
    with torch.no_grad():
        old = naive_logp(h, w, tok) + 0.1 * torch.randn(B, T, device=DEVICE)
    adv = torch.randn(B, device=DEVICE)  # one advantage per sequence, as GRPO has
    adv_t = adv[:, None].expand(B, T)

    def naive():
        return reference.ppo_policy_loss(naive_logp(h, w, tok), old, adv_t, mask, 0.2, None, None, "token-mean")[0]

    compiled = torch.compile(naive)
    losses = {"naive (eager)": naive, "naive (torch.compile)": compiled}
    for label, b in rk_backends("linear_logprobs").items():
        losses[f"{label} (linear_logprobs + ppo_policy_loss)"] = lambda b=b: rk.ppo_policy_loss(
            rk.linear_logprobs(h, w, tok, backend=b), old, adv_t, mask, backend=b)[0]
    steps = {k: step(f, h, w) for k, f in losses.items()}
    liger, skipped = peers({"Liger-Kernel LigerFusedLinearGRPOLoss (dapo, beta=0)":
                            lambda: step(_liger_grpo(h, w, tok, mask, adv, old), h, w)})
    steps.update(liger)
    extra = agreement(steps, "naive (eager)")
    res, peaks = measure(steps, repeats=3 if quick else 5, warmup=0)  # the agreement check warmed them up
    return report(f"ppo_policy_loss from hidden states (GRPO-style), forward+backward, B={B} T={T} H={H} V={V} fp32",
                  res, "naive (eager)", ceilings, csv_name="ppo_policy_loss_fused_linear", csv_dir=csv_dir,
                  flops=6 * B * T * V * H, peaks=peaks, skipped=skipped, extra=extra)


def run(quick=False, csv_dir=None, ceilings=None):
    compiled = torch.compile(reference.ppo_policy_loss)
    shapes = [(64, 1024)] + ([] if quick else [(256, 4096)])
    texts = [_loss_table(B, T, quick, csv_dir, ceilings, compiled) for B, T in shapes]
    texts.append(_fused_linear_table(quick, csv_dir, ceilings))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
