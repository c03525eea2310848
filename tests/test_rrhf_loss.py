"""RRHF loss (docs/algorithms.md §6): a hand-computed batch, a float64 double loop over pairs, gradcheck."""
import itertools

import pytest
import torch

from rlhf_kernels.train.rrhf import rrhf_loss


def hand_batch():
    # one prompt, three candidates; the masked 9.0 must not count
    logp = torch.tensor([[-1.0, -3.0], [-0.5, 9.0], [-2.0, -2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    rewards = torch.tensor([[0.9, 0.1, 0.5]], dtype=torch.float64)
    return logp, mask, rewards


@pytest.mark.parametrize("alpha,agg,padded,expected_rank,expected_ft", [
    # α=1: p = (-2, -0.5, -2); pairs r1<r0: 1.5, r1<r2: 1.5, r2<r0: max(0, 0) = 0; best = 0 (Σ logp = -4)
    (1.0, "token-sum", None, 3.0, 4.0),
    (1.0, "token-mean", None, 3.0, 2.0),
    (1.0, "padded-mean", None, 3.0, 2.0),      # mean over the 2 padded positions
    (1.0, "padded-mean", 5, 3.0, 0.8),         # the source's padded row: 5 positions
    # α=0: p = Σ logp = (-4, -0.5, -4): 3.5 + 3.5 + 0
    (0.0, "token-sum", None, 7.0, 4.0),
])
def test_hand_computed(alpha, agg, padded, expected_rank, expected_ft):
    logp, mask, rewards = hand_batch()
    loss, st = rrhf_loss(logp, mask, rewards, length_penalty=alpha, rrhf_weight=2.0, sft_aggregation=agg,
                         padded_length=padded)
    assert loss.item() == pytest.approx(2.0 * expected_rank + expected_ft)
    assert st["rank_loss"].item() == pytest.approx(expected_rank)
    assert st["sft_loss"].item() == pytest.approx(expected_ft)
    assert st["rank_violations"].item() == pytest.approx(2 / 3)  # (1,0) and (1,2); (2,0) is a tie in p


def test_equal_rewards_give_no_ranking_term():
    logp, mask, _ = hand_batch()
    logp.requires_grad_(True)
    loss, st = rrhf_loss(logp, mask, torch.full((1, 3), 0.5, dtype=torch.float64), sft_aggregation="token-sum")
    assert st["rank_loss"].item() == 0.0
    assert loss.item() == pytest.approx(4.0)   # only L_ft, on the first of the tied best
    loss.backward()
    expected = torch.zeros_like(logp)
    expected[0] = -1.0
    assert torch.equal(logp.grad, expected)


def double_loop(logp, mask, rewards, alpha, weight, agg, padded):
    B, k = rewards.shape
    T = logp.shape[1]
    total = 0.0
    for b in range(B):
        seqs, lens = [], []
        for i in range(k):
            row = b * k + i
            seqs.append(sum(float(logp[row, t]) for t in range(T) if mask[row, t]))
            lens.append(max(int(mask[row].sum()), 1))
        p = [seqs[i] / lens[i] ** alpha for i in range(k)]
        rank = 0.0
        for i, j in itertools.product(range(k), repeat=2):
            if float(rewards[b, i]) < float(rewards[b, j]):
                rank += max(0.0, p[i] - p[j])
        best = max(range(k), key=lambda i: (float(rewards[b, i]), -i))  # first of equal maxima
        ft = -seqs[best] / {"token-sum": 1, "token-mean": lens[best], "padded-mean": padded or T}[agg]
        total += weight * rank + ft
    return total / B


@pytest.mark.parametrize("agg", ["padded-mean", "token-sum", "token-mean"])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_matches_double_loop(agg, alpha):
    g = torch.Generator().manual_seed(7)
    B, k, T = 3, 4, 6
    logp = -torch.rand(B * k, T, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(B * k, T, generator=g) > 0.3
    mask[2] = False              # an empty response: length clamped to 1, p = 0
    mask[5, :] = True
    rewards = torch.rand(B, k, generator=g, dtype=torch.float64)
    rewards[1] = torch.tensor([0.2, 0.7, 0.2, 0.7], dtype=torch.float64)  # ties, also for the best
    padded = 9 if agg == "padded-mean" else None
    loss, _ = rrhf_loss(logp, mask, rewards, length_penalty=alpha, rrhf_weight=1.5, sft_aggregation=agg,
                        padded_length=padded)
    assert loss.item() == pytest.approx(double_loop(logp, mask, rewards, alpha, 1.5, agg, padded), rel=1e-12)


@pytest.mark.parametrize("agg", ["padded-mean", "token-sum", "token-mean"])
def test_gradcheck(agg):
    g = torch.Generator().manual_seed(3)
    B, k, T = 2, 3, 4
    logp = (-torch.rand(B * k, T, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    mask = torch.rand(B * k, T, generator=g) > 0.25
    mask[:, 0] = True
    rewards = torch.tensor([[0.1, 0.5, 0.3], [0.4, 0.4, 0.9]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: rrhf_loss(x, mask, rewards, length_penalty=0.7, rrhf_weight=1.3, sft_aggregation=agg)[0], (logp,))


def test_float32_and_padding_values_do_not_matter():
    logp, mask, rewards = hand_batch()
    a, _ = rrhf_loss(logp.float(), mask, rewards.float())
    garbage = logp.float().masked_fill(~mask, float("nan"))   # whatever a kernel leaves at padding
    b, _ = rrhf_loss(garbage, mask.long(), rewards.float())
    assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("kw,match", [
    ({"rewards": torch.zeros(3)}, "rewards must be"),
    ({"logp": torch.zeros(4, 2)}, r"logp must be \[B·k, T\]"),
    ({"mask": torch.ones(3, 3, dtype=torch.bool)}, "mask must have"),
    ({"sft_aggregation": "mean"}, "padded-mean, token-sum, token-mean"),
    ({"padded_length": 1}, "padded_length"),
])
def test_bad_input(kw, match):
    logp, mask, rewards = hand_batch()
    args = {"logp": logp, "mask": mask, "rewards": rewards, **kw}
    with pytest.raises(ValueError, match=match):
        rrhf_loss(args.pop("logp"), args.pop("mask"), args.pop("rewards"), **args)
