"""ppo_policy_loss forward+backward: rk's kernels vs the eager reference and torch.compile of it; then
the same loss fed from hidden states, against Liger-Kernel's fused-linear GRPO loss (bench/fused_linear.py).

Floor (fp32, per token): forward must read logp, old_logp, advantages (4 B each) and the mask (1 B):
13 B; backward must at least write grad_logp (4 B) and read something per token to know ∂ℓ/∂logp
(a saved 4 B derivative, or the 13 B of inputs as our kernel does, trading bytes for not storing a
[B, T] tensor in forward). The fused kernels move 13 + 17 = 30 B/token; GB/s below counts those
30 B. Compute: one exp and ~15 flops per token per pass, so at these sizes the op is bound by
per-call overhead and memory, not arithmetic.

GRPO-family tables: the loss variants of docs/algorithms.md §14.3 at 64x1024 (one advantage per row, as GRPO
has), each against the eager composition (the float64-spec reference run in fp32, i.e. plain torch ops)
and torch.compile of it. The KL variant reads ref_logp too and the weights variant the weights: 4 B more
per token each, forward and backward.

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


def _variant_inputs(B, T):
    logp, old, _, mask = _inputs(B, T)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(B, generator=g).to(DEVICE)
    ref = (logp.detach().cpu() + torch.randn(B, T, generator=g) * 0.2).to(DEVICE)
    weights = (torch.rand(B, T, generator=g) * 2).to(DEVICE)
    return logp, old, adv, mask, ref, weights


def variants(B, T, ref, weights):
    """{label: keyword arguments} of the benchmarked GRPO-family variants."""
    return {
        "grpo (per-row A, k3 KL beta=0.04)": dict(ref_logp=ref, kl_coef=0.04),
        "dr_grpo (token-mean, denominator=B*T)": dict(denominator=B * T),
        "gspo (sequence ratio, clip 3e-4/4e-4)": dict(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4),
        "cispo (clip_high=5, TIS weights)": dict(loss_type="cispo", clip_high=5.0, weights=weights),
    }


def trl_configs(T):
    """The TRL GRPOConfig values (bench/trl_peer.py) whose loss is each variant's (token-mean aggregation is
    TRL's bnpo with one process; TRL's CISPO caps the ratio at epsilon_high = 1 + clip_high), and which of
    the variant's tensors TRL reads besides logp, old_logp, advantages and mask."""
    return [(dict(loss_type="bnpo", beta=0.04, use_bias_correction_kl=False), ("ref_logp",)),
            (dict(loss_type="dr_grpo", max_completion_length=T), ()),
            (dict(loss_type="bnpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4), ()),
            (dict(loss_type="cispo", epsilon_high=6.0), ("weights",))]


def _trl_contender(config, reads, logp, old, adv, mask, kw, eager_grad):
    """TRL's loss path on the variant's inputs as a timed step; checked against the eager gradient first."""
    from .trl_peer import trl_grpo_loss

    f, m, extra = trl_grpo_loss(**config), mask.int(), {k: kw[k] for k in reads}

    def step_():
        return torch.autograd.grad(f(logp, old, adv, m, **extra), logp)

    torch.testing.assert_close(step_()[0], eager_grad, rtol=1e-4, atol=1e-7)
    return step_


def _variant_tables(B, T, quick, csv_dir, ceilings):
    logp, old, adv, mask, ref, weights = _variant_inputs(B, T)

    def eager(logp, old, adv, mask, kw):
        k = dict(kw)
        return reference.ppo_policy_loss(logp, old, adv, mask, k.pop("clip_low", 0.2), k.pop("clip_high", None), None,
                                         "token-mean", **k)

    compiled = torch.compile(eager)
    texts = []
    for i, ((label, kw), (config, reads)) in enumerate(zip(variants(B, T, ref, weights).items(), trl_configs(T))):
        def step_(fn, kw=kw):
            return lambda: torch.autograd.grad(fn(logp, old, adv, mask, kw)[0], logp)

        fns = {"eager composition (reference ops)": step_(eager), "torch.compile(eager)": step_(compiled)}
        eager_grad = fns["eager composition (reference ops)"]()[0]
        trl, skipped = peers({"TRL GRPOTrainer._compute_loss (its loss path, with its metrics)":
                              lambda: _trl_contender(config, reads, logp, old, adv, mask, kw, eager_grad)})
        fns.update(trl)
        for name, b in rk_backends("ppo_policy_loss").items():
            fns[name] = step_(lambda *a, b=b: rk.ppo_policy_loss(*a[:4], backend=b, **a[4]))
        res, peaks = measure(fns, repeats=20 if quick else 30, warmup=3)
        nbytes = (BYTES_PER_TOKEN + 8 * (("ref_logp" in kw) + ("weights" in kw))) * B * T
        texts.append(report(f"ppo_policy_loss {label}, forward+backward, {B}x{T} fp32", res,
                            "eager composition (reference ops)", ceilings, csv_name=f"ppo_policy_loss_variant{i}",
                            csv_dir=csv_dir, nbytes=nbytes, peaks=peaks, skipped=skipped))
    return "\n".join(texts)


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
    texts.append(_variant_tables(64, 1024, quick, csv_dir, ceilings))
    texts.append(_fused_linear_table(quick, csv_dir, ceilings))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
