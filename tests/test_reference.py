"""The reference (the specification) against small cases computed by hand, and the public
functions' argument validation (the bad-input rules of DESIGN.md)."""
import math

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference as R

D = dict(dtype=torch.float64)


def t(*x):
    return torch.tensor(x, **D)


def test_logprobs_hand():
    logits = torch.log(t(1, 2, 3)).unsqueeze(0)
    lp, ent = R.logprobs_from_logits(logits, torch.tensor([2]), return_entropy=True)
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-12)
    assert ent.item() == pytest.approx(-(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 0.5 * math.log(0.5)))
    lp2 = R.logprobs_from_logits(logits, torch.tensor([2]), temperature=2.0)
    p = math.sqrt(3) / (1 + math.sqrt(2) + math.sqrt(3))
    assert lp2.item() == pytest.approx(math.log(p), abs=1e-12)
    ignored, ent0 = R.logprobs_from_logits(logits, torch.tensor([-100]), return_entropy=True)
    assert ignored.item() == 0.0 and ent0.item() == 0.0
    assert math.isnan(R.logprobs_from_logits(logits, torch.tensor([7])).item())


def test_linear_logprobs_hand():
    # logits [2, 1, 3] + bias [0.5, 0, -1] = [2.5, 1, 2], at temperature 0.5: [5, 2, 4]
    h, w = t(2.0, 1.0).unsqueeze(0), t(1, 0, 0, 1, 1, 1).reshape(3, 2)
    lp, ent = R.linear_logprobs(h, w, torch.tensor([0]), t(0.5, 0, -1), 0.5, -100, True)
    lse = math.log(math.exp(5) + math.exp(2) + math.exp(4))
    assert lp.item() == pytest.approx(5 - lse, abs=1e-12)
    p = [math.exp(z - lse) for z in (5, 2, 4)]
    assert ent.item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-12)
    assert R.linear_logprobs(h, w, torch.tensor([-100])).item() == 0.0


def test_token_kl_hand():
    logp, ref = t(-1.0), t(-1.5)
    assert R.token_kl(logp, ref, "k1").item() == pytest.approx(0.5)
    assert R.token_kl(logp, ref, "k2").item() == pytest.approx(0.125)
    assert R.token_kl(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    assert R.token_kl(logp, ref, "k1", clamp=0.2).item() == pytest.approx(0.2)


def test_token_rewards_hand():
    score, mask = t(5.0), torch.tensor([[1, 1, 0, 0]]).bool()
    logp, ref = t(-1, -2, -3, -4).unsqueeze(0), t(-1.5, -1, 0, 0).unsqueeze(0)
    last = R.token_rewards(score, mask, logp, ref, kl_coef=0.1)
    torch.testing.assert_close(last, t(-0.05, 5.1, 0, 0).unsqueeze(0))
    p1 = R.token_rewards(score, mask, logp, ref, kl_coef=0.1, score_position="eos+1")
    torch.testing.assert_close(p1, t(-0.05, 0.1, 5, 0).unsqueeze(0))
    full = R.token_rewards(score, torch.ones(1, 4, dtype=torch.bool), score_position="eos+1")
    torch.testing.assert_close(full, t(0, 0, 0, 5).unsqueeze(0))  # clamped to the row end
    dense = R.token_rewards(score, mask, dense=t(1, -3, 9, 9).unsqueeze(0), dense_coef=2.0, dense_clip=4.0)
    torch.testing.assert_close(dense, t(2, 1, 0, 0).unsqueeze(0))
    none = R.token_rewards(score, torch.zeros(1, 4, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(1, 4, **D))


def test_gae_hand_with_hole():
    r, v = t(1, 2, 3, 4).unsqueeze(0), t(0.5, 1, 2, 1.5).unsqueeze(0)
    mask = torch.tensor([[1, 1, 0, 1]]).bool()
    adv, ret = R.gae(r, v, mask, gamma=0.9, lam=0.5)
    # t=3: δ = 4 − 1.5 = 2.5; t=1 links to t=3: δ = 2 + 0.9·1.5 − 1 = 2.35, A = 2.35 + 0.45·2.5;
    # t=0: δ = 1 + 0.9·1 − 0.5 = 1.4, A = 1.4 + 0.45·3.475
    torch.testing.assert_close(adv, t(2.96375, 3.475, 0, 2.5).unsqueeze(0))
    torch.testing.assert_close(ret, t(3.46375, 4.475, 0, 4.0).unsqueeze(0))


def test_whiten_three_numbers():
    x, m = t(1, 2, 6), torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(R.masked_whiten(x, m, eps=0.0), (x - 3) / math.sqrt(14 / 3))
    torch.testing.assert_close(R.masked_whiten(x, m, unbiased=True, eps=0.0), (x - 3) / math.sqrt(7))
    torch.testing.assert_close(R.masked_whiten(x, m, shift_mean=False, eps=0.0), (x - 3) / math.sqrt(14 / 3) + 3)
    holes = R.masked_whiten(t(1, 100, 2, 6), torch.tensor([1, 0, 1, 1]).bool(), eps=0.0)
    torch.testing.assert_close(holes, t(-2 / math.sqrt(14 / 3), 0, -1 / math.sqrt(14 / 3), 3 / math.sqrt(14 / 3)))
    assert torch.equal(R.masked_whiten(x, torch.zeros(3, dtype=torch.bool)), torch.zeros(3, **D))


def test_aggregations_hand():
    loss = t(1, 2, 3, 4, 0, 0).reshape(2, 3)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    assert R.aggregate(loss, m, "token-mean").item() == pytest.approx(7 / 3)
    assert R.aggregate(loss, m, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert R.aggregate(loss, m, "seq-mean-token-sum").item() == pytest.approx(3.5)
    assert R.aggregate(loss, m, "token-sum").item() == pytest.approx(7.0)
    for agg in R.AGGREGATIONS:
        assert R.aggregate(loss, torch.zeros_like(m), agg).item() == 0.0


def test_ppo_policy_hand():
    ones = torch.ones(1, 1, dtype=torch.bool)
    logp, old = t(0.0).reshape(1, 1), t(math.log(0.5)).reshape(1, 1)  # ratio 2
    loss, st = R.ppo_policy_loss(logp, old, t(1.0).reshape(1, 1), ones)
    assert loss.item() == pytest.approx(-1.2) and st["clipfrac"].item() == 1.0
    assert st["approx_kl"].item() == pytest.approx(0.5 * math.log(2) ** 2)
    loss, st = R.ppo_policy_loss(logp, old, t(-1.0).reshape(1, 1), ones)
    assert loss.item() == pytest.approx(2.0) and st["clipfrac"].item() == 0.0
    loss, _ = R.ppo_policy_loss(logp, old, t(-1.0).reshape(1, 1), ones, dual_clip=1.5)
    assert loss.item() == pytest.approx(1.5)
    loss, _ = R.ppo_policy_loss(logp, old, t(1.0).reshape(1, 1), ones, clip_low=0.2, clip_high=0.5)
    assert loss.item() == pytest.approx(-1.5)


def test_ppo_value_hand():
    ones = torch.ones(1, 1, dtype=torch.bool)
    v, vo, r = t(1.0).reshape(1, 1), t(0.0).reshape(1, 1), t(2.0).reshape(1, 1)
    loss, st = R.ppo_value_loss(v, vo, r, ones, clip=0.2)
    assert loss.item() == pytest.approx(1.62) and st["vf_clipfrac"].item() == 1.0
    loss, st = R.ppo_value_loss(v, vo, r, ones, clip=None)
    assert loss.item() == pytest.approx(0.5) and st["vf_clipfrac"].item() == 0.0


def test_dpo_each_loss_at_one_point():
    c, r, cr, rr = t(-1.0), t(-2.0), t(-1.5), t(-1.5)  # h = 1
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: −log σ(−x)
    cases = {("sigmoid", 0.5, 0.0): sp(-0.5), ("sigmoid", 0.5, 0.1): 0.9 * sp(-0.5) + 0.1 * sp(0.5),
             ("ipo", 0.25, 0.0): 1.0, ("hinge", 0.5, 0.0): 0.5,
             ("robust", 0.5, 0.1): (0.9 * sp(-0.5) - 0.1 * sp(0.5)) / 0.8}
    for (lt, beta, eps), want in cases.items():
        losses, cw, rw = R.dpo_loss(c, r, cr, rr, beta, lt, eps)
        assert losses.item() == pytest.approx(want, abs=1e-12), lt
        assert cw.item() == pytest.approx(beta * 0.5) and rw.item() == pytest.approx(-beta * 0.5)


# ---- bad input, through the public functions ----

def test_bad_input_logprobs():
    logits, tok = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="temperature"):
        rk.logprobs_from_logits(logits, tok, temperature=0.0)
    with pytest.raises(ValueError, match="tokens"):
        rk.logprobs_from_logits(logits, tok[:, :2])
    with pytest.raises(TypeError, match="tokens"):
        rk.logprobs_from_logits(logits, tok.float())
    with pytest.raises(TypeError, match="logits"):
        rk.logprobs_from_logits(logits.long(), tok)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        rk.logprobs_from_logits(logits, tok + 5)
    assert torch.isnan(rk.logprobs_from_logits(logits, tok + 5, validate=False)).all()
    with pytest.raises(ValueError, match="weight"):
        rk.linear_logprobs(torch.randn(2, 4), torch.randn(7, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="bias"):
        rk.linear_logprobs(torch.randn(2, 4), torch.randn(7, 4), torch.zeros(2, dtype=torch.long), bias=torch.randn(6))


def test_bad_input_rewards_gae_whiten():
    m = torch.ones(2, 4, dtype=torch.bool)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="score"):
        rk.token_rewards(torch.randn(3), m)
    with pytest.raises(ValueError, match="logp"):
        rk.token_rewards(torch.randn(2), m, kl_coef=0.1)
    with pytest.raises(ValueError, match="score_position"):
        rk.token_rewards(torch.randn(2), m, score_position="first")
    with pytest.raises(ValueError, match="kl_estimator"):
        rk.token_rewards(torch.randn(2), m, kl_estimator="k9")
    with pytest.raises(ValueError, match="mask"):
        rk.gae(x, x, m[:, :3])
    with pytest.raises(ValueError, match="values"):
        rk.gae(x, x[:1], m)
    with pytest.raises(ValueError, match="gamma"):
        rk.gae(x, x, m, gamma=-1.0)
    with pytest.raises(TypeError, match="mask"):
        rk.masked_whiten(x, "all")
    with pytest.raises(TypeError, match="x"):
        rk.masked_whiten(x.long(), m)


def test_bad_input_losses():
    m = torch.ones(2, 4, dtype=torch.bool)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="aggregation"):
        rk.ppo_policy_loss(x, x, x, m, aggregation="mean")
    with pytest.raises(ValueError, match="dual_clip"):
        rk.ppo_policy_loss(x, x, x, m, dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages"):
        rk.ppo_policy_loss(x, x, x[:, :2], m)
    with pytest.raises(ValueError, match="clip"):
        rk.ppo_value_loss(x, x, x, m, clip=-0.1)
    b = torch.randn(3)
    with pytest.raises(ValueError, match="loss_type"):
        rk.dpo_loss(b, b, b, b, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        rk.dpo_loss(b, b, b, b, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        rk.dpo_loss(b, b, b, b, label_smoothing=0.5)
    with pytest.raises(ValueError, match="ref_rejected_logp"):
        rk.dpo_loss(b, b, b, b[:2])


@pytest.mark.parametrize("agg", R.AGGREGATIONS)
def test_all_masked_losses_are_zero_with_zero_grad(agg):
    x = torch.randn(2, 3, requires_grad=True)
    m = torch.zeros(2, 3, dtype=torch.bool)
    loss, st = rk.ppo_policy_loss(x, torch.randn(2, 3), torch.randn(2, 3), m, aggregation=agg)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x)) and st["clipfrac"].item() == 0.0
