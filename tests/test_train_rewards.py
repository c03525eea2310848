"""Reward and advantage wiring on hand-built batches: EOS truncation, no-EOS penalty, the value mask
of the eos+1 convention, RTO reward assembly, micro-batch weights and the gold reward."""
import torch

import rlhf_kernels as rk
from rlhf_kernels._choices import Aggregation, values
from rlhf_kernels.train.decode import rollout
from rlhf_kernels.train.ppo import micro_weight, value_mask
from rlhf_kernels.train.rto import rto_rewards
from rlhf_kernels.train.tasks import sentiment

E, P = sentiment.EOS, sentiment.PAD


def test_truncate_after_eos():
    r = torch.tensor([[5, E, 7, E], [5, 6, 7, 8], [E, 5, 5, 5]])
    out, mask, has = rollout.truncate_after_eos(r)
    assert out.tolist() == [[5, E, P, P], [5, 6, 7, 8], [E, P, P, P]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has.tolist() == [True, False, True]


def test_no_eos_penalty():
    s, has = torch.tensor([2.0, 3.0]), torch.tensor([True, False])
    assert rollout.penalize_no_eos(s, has, "replace", -1.0).tolist() == [2.0, -1.0]
    assert rollout.penalize_no_eos(s, has, "subtract", -1.0).tolist() == [2.0, 2.0]
    assert rollout.penalize_no_eos(s, has, "none", -1.0).tolist() == [2.0, 3.0]


def test_value_mask_eos_plus_one():
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).bool()
    assert value_mask(m, "last").equal(m)
    assert value_mask(m, "eos+1").int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]


def test_ppo_wiring_by_hand():
    """Score at eos+1 flows back to the EOS token through γλ·A as in N+ (docs/algorithms.md §1.1)."""
    mask = torch.tensor([[1, 1, 0]]).bool()
    logp, ref = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, 0.0]])
    r = rk.token_rewards(torch.tensor([2.0]), mask, logp=logp, ref_logp=ref, kl_coef=0.1, score_position="eos+1")
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1, 2.0]]))
    values = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = rk.gae(r, values, value_mask(mask, "eos+1"), gamma=1.0, lam=0.5)
    a2 = 2.0 - 1.5
    a1 = 0.1 + 1.5 - 1.0 + 0.5 * a2
    a0 = -0.05 + 1.0 - 0.5 + 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]))
    assert torch.allclose(ret, adv + values)


def test_rto_reward_assembly_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.2, -1.0, -0.5, 0.0], [-2.0, 0.0, 0.0, 0.0]])
    dpo_ratio = torch.tensor([[2.0, -0.4, 0.3, 9.0], [-5.0, 0.0, 0.0, 9.0]])
    score = torch.tensor([1.5, -0.5])
    r = rto_rewards(score, mask, logp, ref, dpo_ratio, kl_coef=0.01, dpo_reward_scale=0.05, dpo_reward_clip=0.05)
    # −β2·(logp − ref) + clip(β1·ratio, ±0.05), score at the last valid token, 0 past the end
    want = torch.tensor([[-0.01 * 0.2 + 0.05, -0.01 * -1.0 - 0.02, 0.0 + 0.015 + 1.5, 0.0],
                         [-0.01 * -1.0 - 0.05 - 0.5, 0.0, 0.0, 0.0]])
    assert torch.allclose(r, want, atol=1e-7)


def test_micro_weights_reassemble_the_minibatch_loss():
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.4
    mask[2] = False
    rows = torch.arange(6)
    for agg in values(Aggregation):
        from rlhf_kernels import reference
        full = reference.aggregate(loss, mask, agg)
        parts = sum(micro_weight(agg, mask[r], mask) * reference.aggregate(loss[r], mask[r], agg)
                    for r in rows.split(2))
        assert torch.allclose(parts, full), agg


def test_gold_reward():
    w = {x: sentiment.WORDS.index(x) for x in ("great", "fun", "dull", "the")}
    rows = torch.tensor([[w["great"], w["fun"], E, P, P, P], [w["great"], E, P, P, P, P],
                         [w["great"], w["great"], w["great"], w["great"], w["dull"], E],
                         [w["great"], w["great"], w["the"], w["great"], w["great"], w["great"]]])
    assert torch.allclose(sentiment.gold_reward(rows), torch.tensor([0.5, 0.25, 0.8, 0.0]))


def test_preference_pairs_follow_gold():
    p, c, r = sentiment.preference_pairs(64, torch.Generator().manual_seed(0))
    assert p.shape[0] == c.shape[0] == r.shape[0] == 64
    assert (sentiment.gold_reward(c) > sentiment.gold_reward(r)).all()
    _, c2, r2 = sentiment.preference_pairs(400, torch.Generator().manual_seed(0), label_noise=0.25)
    flipped = (sentiment.gold_reward(c2) < sentiment.gold_reward(r2)).float().mean()
    assert 0.15 < flipped < 0.35
