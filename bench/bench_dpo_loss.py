"""dpo_loss forward+backward: rk's kernels vs the eager reference and torch.compile of it; then the
loss fed from hidden states, against Liger-Kernel's chunked fused-linear DPO loss (bench/fused_linear.py).

Floor (fp32, per pair): forward reads the four sequence log-probs (16 B) and writes the loss and
the two rewards (12 B); backward reads the upstream gradient and the four inputs (20 B) and writes
four gradients (16 B): 64 B/pair, which is what the fused kernels move. At a realistic batch
(tens to thousands of pairs) the op is pure per-call overhead; the large size shows bandwidth.

Fused-linear table: B pairs of T tokens (chosen rows first, then rejected, padding as ignore_index),
policy and reference heads; every contender computes the reference model's sequence log-probs
without grad and the sigmoid DPO loss, mean over pairs, as LigerFusedLinearDPOLoss does with its
defaults (sum of token log-probs, no NLL term). Floor: the policy head's three GEMMs plus the
reference head's forward, 8·N·V·H FLOPs for N = 2·B·T tokens.
"""

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from .common import DEVICE, measure, peers, report, rk_backends, script_main
from .fused_linear import agreement, head_inputs, naive_logp, step

BYTES_PER_PAIR = 64


def _loss_table(B, quick, csv_dir, ceilings, compiled):
    g = torch.Generator().manual_seed(0)
    ins = [(-torch.rand(B, generator=g) * 100).to(DEVICE).requires_grad_(True) for _ in range(4)]

    def step_(fn):
        return lambda: torch.autograd.grad(fn(*ins)[0].mean(), ins)

    fns = {"reference (eager)": step_(lambda *a: reference.dpo_loss(*a, 0.1, "sigmoid", 0.1)),
           "reference (torch.compile)": step_(lambda *a: compiled(*a, 0.1, "sigmoid", 0.1))}
    for label, b in rk_backends("dpo_loss").items():
        fns[label] = step_(lambda *a, b=b: rk.dpo_loss(*a, beta=0.1, label_smoothing=0.1, backend=b))
    res, peaks = measure(fns, repeats=20 if quick else 30, warmup=3)
    return report(f"dpo_loss sigmoid (cDPO eps=0.1), forward+backward, B={B} fp32", res, "reference (eager)",
                  ceilings, csv_name=f"dpo_loss_{B}", csv_dir=csv_dir, nbytes=BYTES_PER_PAIR * B, peaks=peaks)


def _seq_logp(logp, tokens):
    """Σ over valid tokens of each row, split into (chosen, rejected)."""
    s = torch.where(tokens != -100, logp, 0.0).sum(-1)
    return s.chunk(2)


def _liger_dpo(w, h, target, ref_w, ref_h):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True, loss_type="sigmoid")
    return lambda: loss(w, h, target, ref_input=ref_h, ref_weight=ref_w)[0]


def _fused_linear_table(quick, csv_dir, ceilings):
    B, T, H, V = (2, 64, 128, 8192) if quick else (4, 256, 256, 32000)
    h, w, tok, mask = head_inputs(2 * B, T, H, V)
    ref_h, ref_w = (t.detach() + 0.01 * torch.randn_like(t) for t in (h, w))
    target = torch.where(mask, tok, -100)
    safe = torch.where(mask, tok, 0)  # the naive gather needs a valid index everywhere

    def naive():
        with torch.no_grad():
            rc, rr = _seq_logp(naive_logp(ref_h, ref_w, safe), target)
        c, r = _seq_logp(naive_logp(h, w, safe), target)
        return reference.dpo_loss(c, r, rc, rr, 0.1, "sigmoid", 0.0)[0].mean()

    losses = {"naive (eager)": naive, "naive (torch.compile)": torch.compile(naive)}
    for label, b in rk_backends("linear_logprobs").items():
        def fused(b=b):
            with torch.no_grad():
                rc, rr = _seq_logp(rk.linear_logprobs(ref_h, ref_w, target, backend=b), target)
            c, r = _seq_logp(rk.linear_logprobs(h, w, target, backend=b), target)
            return rk.dpo_loss(c, r, rc, rr, beta=0.1, backend=b)[0].mean()
        losses[f"{label} (linear_logprobs + dpo_loss)"] = fused
    steps = {k: step(f, h, w) for k, f in losses.items()}
    # Liger marks its target's sequence dimension dynamic: a tensor of its own keeps that mark off
    # the one the compiled naive contender was specialised on
    liger, skipped = peers({"Liger-Kernel LigerFusedLinearDPOLoss (sigmoid)":
                            lambda: step(_liger_dpo(w, h, target.clone(), ref_w, ref_h), h, w)})
    steps.update(liger)
    extra = agreement(steps, "naive (eager)")
    res, peaks = measure(steps, repeats=3 if quick else 5, warmup=0)  # the agreement check warmed them up
    N = 2 * B * T
    return report(f"dpo_loss from hidden states, forward+backward, {B} pairs T={T} H={H} V={V} fp32",
                  res, "naive (eager)", ceilings, csv_name="dpo_loss_fused_linear", csv_dir=csv_dir,
                  flops=8 * N * V * H, peaks=peaks, skipped=skipped, extra=extra)


def run(quick=False, csv_dir=None, ceilings=None):
    compiled = torch.compile(reference.dpo_loss)
    sizes = [64, 1 << 20] if quick else [64, 4096, 1 << 22]
    texts = [_loss_table(B, quick, csv_dir, ceilings, compiled) for B in sizes]
    texts.append(_fused_linear_table(quick, csv_dir, ceilings))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
