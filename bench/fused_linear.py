"""Losses fed straight from hidden states and the LM head: what Liger-Kernel's fused-linear GRPO and
DPO losses do in one call, and what rk does by composing `rk.linear_logprobs` with the loss op.

The tables built from these time, at equal math, forward+backward through the head and the loss:
  naive  logits = h·Wᵀ, log_softmax, gather, then the eager reference loss (and torch.compile of it),
  rk     rk.linear_logprobs (never builds the logits) feeding rk's loss kernel,
  Liger  LigerFusedLinearGRPOLoss / LigerFusedLinearDPOLoss (pure torch, chunked, torch.compile'd),
and check that every contender gives the naive eager loss and hidden-state gradient.
"""
import torch

from .common import DEVICE


def head_inputs(rows, T, H, V, seed=0):
    """hidden [rows, T, H] and weight [V, H] (both requiring grad), tokens [rows, T] and a
    right-padded mask [rows, T] (every row keeps at least a quarter of its positions)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    tokens = torch.randint(0, V, (rows, T), generator=g)
    mask = torch.arange(T) < torch.randint(T // 4, T + 1, (rows,), generator=g)[:, None]
    hidden, weight, tokens, mask = (t.to(DEVICE) for t in (hidden, weight, tokens, mask))
    return hidden.requires_grad_(True), weight.requires_grad_(True), tokens, mask


def naive_logp(hidden, weight, tokens):
    """Per-token log-probs through the full [.., V] logits: what most trainers do."""
    return torch.log_softmax(hidden @ weight.T, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def step(loss_fn, hidden, weight):
    """A forward+backward of `loss_fn()` into hidden and weight; returns (loss, d hidden)."""
    def f():
        loss = loss_fn()
        return loss.detach(), torch.autograd.grad(loss, (hidden, weight))[0]
    return f


def agreement(steps, baseline):
    """{name: {"Δ loss": ..., "Δ d hidden": ...}} of each step's result against `baseline`'s."""
    want_loss, want_dh = steps[baseline]()
    out = {}
    for name, f in steps.items():
        loss, dh = f()
        out[name] = {"Δ loss vs eager": f"{float((loss - want_loss).abs()):.1e}",
                     "max Δ d hidden vs eager": f"{float((dh - want_dh).abs().max()):.1e}"}
    return out
