"""rk.ppo_policy_loss's GRPO-family arguments (issue 14 item 2): per-row advantages, GSPO's sequence-level
ratio, CISPO, detached weights, the KL term, the denominator override and the new stats. The reference is
checked against values worked out by hand; every backend against the reference."""
import math

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import ragged_masks

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]


def _grads(fn, *xs):
    ins = [x.detach().clone().requires_grad_(True) for x in xs]
    loss, stats = fn(*ins)
    loss.backward()
    return loss, stats, [t.grad if t.grad is not None else torch.zeros_like(t) for t in ins]


def _ref(*a, **k):
    return rk.ppo_policy_loss(*a, backend="reference", **k)


# one row of two valid tokens and a masked third one holding garbage
LOGP = torch.tensor([[-1.0, -2.0, float("nan")]], dtype=torch.float64)
OLD = torch.tensor([[-1.2, -2.4, 5.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, False]])


def test_sequence_ratio_by_hand():
    # log s = mean(0.2, 0.4) = 0.3; s = e^0.3 ≈ 1.35 lies above 1 + 0.2
    s = math.exp(0.3)
    # A = +1: the clipped branch −1.2 wins on both tokens and carries no gradient
    loss, stats, (g, g_old, g_adv) = _grads(lambda a, b, c: _ref(a, b, c, MASK, ratio_level="sequence"),
                                            LOGP, OLD, torch.tensor([1.0], dtype=torch.float64))
    assert loss.item() == pytest.approx(-1.2, abs=1e-12) and stats["clipfrac"].item() == 1.0
    assert g.abs().max().item() == 0.0 and g_adv.item() == pytest.approx(-1.2 * 2 / 2)
    assert stats["ratio_mean"].item() == pytest.approx(s, rel=1e-6) and stats["ratio_max"].item() == pytest.approx(s)
    # A = −1: −A·s = s is the max; loss = mean over 2 tokens of s, ∂s/∂logp_t = s·m_t/2, so ∂loss/∂logp_t = s/2
    loss, stats, (g, g_old, g_adv) = _grads(lambda a, b, c: _ref(a, b, c, MASK, ratio_level="sequence"),
                                            LOGP, OLD, -torch.ones(1, 1, dtype=torch.float64).expand(1, 3))
    assert loss.item() == pytest.approx(s, rel=1e-12) and stats["clipfrac"].item() == 0.0
    torch.testing.assert_close(g, torch.tensor([[s / 2, s / 2, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(g_old, -g)
    torch.testing.assert_close(g_adv, torch.tensor([[-s / 2, -s / 2, 0.0]], dtype=torch.float64))


def test_cispo_by_hand():
    rho = [math.exp(0.2), math.exp(0.4)]  # 1.221, 1.492: both above 1 + clip_high = 1.21 ... only the second at 1.3
    adv = torch.tensor([[0.5, -2.0, 7.0]], dtype=torch.float64)
    loss, stats, (g, g_old, g_adv) = _grads(
        lambda a, b, c: _ref(a, b, c, MASK, loss_type="cispo", clip_high=0.3, aggregation="token-sum"), LOGP, OLD, adv)
    w = [rho[0], 1.3]
    assert loss.item() == pytest.approx(-(w[0] * 0.5 * -1.0 + w[1] * -2.0 * -2.0), rel=1e-12)
    torch.testing.assert_close(g, torch.tensor([[-w[0] * 0.5, w[1] * 2.0, 0.0]], dtype=torch.float64))
    assert g_old.abs().max().item() == 0.0  # the ratio is a constant weight
    torch.testing.assert_close(g_adv, torch.tensor([[w[0] * 1.0, w[1] * 2.0, 0.0]], dtype=torch.float64))
    assert stats["clipfrac"].item() == 0.5 and stats["ratio_max"].item() == pytest.approx(rho[1])


def test_weights_kl_and_denominator_by_hand():
    # token level, A = 1 on both tokens, clip wide open (ρ unclipped): policy term −ρ_t
    rho = torch.tensor([math.exp(0.2), math.exp(0.4)], dtype=torch.float64)
    adv = torch.ones(1, 3, dtype=torch.float64)
    w = torch.tensor([[0.5, 2.0, 9.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, 3.0]], dtype=torch.float64)
    d = torch.tensor([0.5, -1.0], dtype=torch.float64)  # logp − ref on the valid tokens
    k3 = torch.exp(-d) - 1 + d
    loss, stats, (g, g_old, g_adv) = _grads(
        lambda a, b, c: _ref(a, b, c, MASK, clip_low=10.0, weights=w, ref_logp=ref, kl_coef=0.1, denominator=5),
        LOGP, OLD, adv)
    per_token = -w[0, :2] * rho + 0.1 * k3  # the KL term is added after the weights, unweighted
    assert loss.item() == pytest.approx(per_token.sum().item() / 5, rel=1e-12)  # 5 replaces Σ mask = 2
    exp_g = (-w[0, :2] * rho + 0.1 * (1 - torch.exp(-d))) / 5
    torch.testing.assert_close(g[0, :2], exp_g)
    torch.testing.assert_close(g_old[0, :2], w[0, :2] * rho / 5)  # the KL term does not involve old_logp
    assert g[0, 2].item() == 0.0 and g_old[0, 2].item() == 0.0
    assert stats["kl"].item() == pytest.approx(k3.mean().item(), rel=1e-6)
    assert stats["weight_mean"].item() == pytest.approx(1.25)  # masked mean: the 9 is padding
    assert stats["ratio_mean"].item() == pytest.approx(rho.mean().item(), rel=1e-6)
    # kl_coef = 0 with ref_logp: the stat, not the term
    loss0, stats0 = _ref(LOGP, OLD, adv, MASK, clip_low=10.0, ref_logp=ref)
    assert loss0.item() == pytest.approx(-rho.mean().item(), rel=1e-12) and "kl" in stats0
    assert "weight_mean" not in stats0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term_is_token_kl(estimator):
    g = torch.Generator().manual_seed(3)
    logp, old, ref = (-torch.rand(3, 6, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = ragged_masks(3, 6, g)["holes"]
    base, _ = _ref(logp, old, adv, mask, aggregation="token-sum")
    loss, stats = _ref(logp, old, adv, mask, aggregation="token-sum", ref_logp=ref, kl_coef=0.3,
                       kl_estimator=estimator)
    kl = torch.where(mask, rk.token_kl(logp, ref, estimator=estimator), 0)
    assert loss.item() == pytest.approx(base.item() + 0.3 * kl.sum().item(), rel=1e-12)


def test_row_advantages_equal_broadcast_ones():
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(2, 3, 5, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(2, 3, generator=g, dtype=torch.float64)
    mask = ragged_masks(6, 5, g)["holes"].reshape(2, 3, 5)
    for level in ("token", "sequence"):
        a = _grads(lambda x, y, z: _ref(x, y, z, mask, ratio_level=level, dual_clip=3.0), logp, old, adv)
        b = _grads(lambda x, y, z: _ref(x, y, z, mask, ratio_level=level, dual_clip=3.0), logp, old,
                   adv[..., None].expand(2, 3, 5))
        torch.testing.assert_close(a[0], b[0], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(a[2][0], b[2][0], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(a[2][2], b[2][2].sum(-1), rtol=1e-14, atol=1e-14)


def test_sequence_level_with_one_valid_token_is_token_level():
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(4, 1, generator=g, dtype=torch.float64)
    old = logp + torch.randn(4, 1, generator=g, dtype=torch.float64)
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True], [False], [True], [True]])
    a = _ref(logp, old, adv, mask, ratio_level="sequence", aggregation="seq-mean-token-mean")
    b = _ref(logp, old, adv, mask, aggregation="seq-mean-token-mean")
    torch.testing.assert_close(a[0], b[0], rtol=1e-14, atol=0)


def test_defaults_unchanged():
    g = torch.Generator().manual_seed(6)
    logp = -torch.rand(3, 7, generator=g, dtype=torch.float64)
    old = logp + torch.randn(3, 7, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = ragged_masks(3, 7, g)["holes"]
    for agg in AGGS:
        new, stats = _ref(logp, old, adv, mask, aggregation=agg, dual_clip=3.0)
        old_loss = reference.ppo_policy_loss(logp, old, adv, mask, 0.2, None, 3.0, agg)[0]
        assert new.item() == old_loss.item()
        assert set(stats) == {"clipfrac", "approx_kl", "ratio_mean", "ratio_max"}


def test_gradcheck_reference_everything():
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    w, ref = torch.rand(3, 5, generator=g, dtype=torch.float64), -torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = ragged_masks(3, 5, g)["holes"]
    # cispo's weight sg(min(ρ, 1 + clip_high)) is held constant by autograd but not by finite differences:
    # checked where every ρ = e^0.5 is truncated, so that the weight really is constant
    for kw, o in ((dict(ratio_level="sequence", dual_clip=3.0), old), (dict(loss_type="cispo", clip_high=0.1), logp - 0.5)):
        ins = [t.clone().requires_grad_(True) for t in (logp, o, adv)]
        assert torch.autograd.gradcheck(
            lambda a, b, c: _ref(a, b, c, mask, weights=w, ref_logp=ref, kl_coef=0.05,
                                 aggregation="seq-mean-token-mean", **kw)[0], ins)


def test_bad_input():
    logp = -torch.rand(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    call = lambda **k: rk.ppo_policy_loss(logp, logp, k.pop("adv", logp), mask, **k)  # noqa: E731
    with pytest.raises(ValueError, match="advantages"):
        call(adv=logp[:, :1])
    with pytest.raises(ValueError, match="ratio_level"):
        call(ratio_level="seq")
    with pytest.raises(ValueError, match="loss_type"):
        call(loss_type="grpo")
    with pytest.raises(ValueError, match="dual_clip"):
        call(loss_type="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="ref_logp"):
        call(kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        call(ref_logp=logp, kl_estimator="k4")
    with pytest.raises(ValueError, match="weights"):
        call(weights=logp[:1])
    with pytest.raises(TypeError, match="ref_logp"):
        call(ref_logp=logp.long())
    with pytest.raises(ValueError, match="denominator"):
        call(denominator=0)
    with pytest.raises(ValueError, match="denominator"):
        call(denominator=4, aggregation="token-sum")
    with pytest.raises(TypeError, match="denominator"):
        call(denominator=torch.ones(2))
    with pytest.raises(TypeError, match="kl_coef"):
        call(kl_coef="0.1")


def _global_denominator(mask, aggregation):
    if aggregation == "token-sum":
        return None
    if aggregation == "token-mean":
        return int(mask.sum())
    return int((mask.sum(-1) > 0).sum())


@pytest.mark.parametrize("backend", ["reference"])
@pytest.mark.parametrize("aggregation", AGGS)
def test_micro_batches_with_global_denominator_equal_one_batch(backend, aggregation):
    # issue 14 item 7: the gradient accumulated over 4 micro-batches, each given the global count, is the
    # one-batch gradient
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(8, 13, generator=g, dtype=torch.float64) * 2
    old = logp + 0.4 * torch.randn(8, 13, generator=g, dtype=torch.float64)
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    w, ref = torch.rand(8, 13, generator=g, dtype=torch.float64), -torch.rand(8, 13, generator=g, dtype=torch.float64)
    mask = ragged_masks(8, 13, g)["holes"]
    den = _global_denominator(mask, aggregation)
    for kw in (dict(ratio_level="sequence", clip_high=0.28), dict(loss_type="cispo", clip_high=0.5)):
        kw = dict(kw, aggregation=aggregation, weights=w, ref_logp=ref, kl_coef=0.05, backend=backend)
        one = logp.clone().requires_grad_(True)
        full, _ = rk.ppo_policy_loss(one, old, adv, mask, **kw)
        full.backward()
        acc = logp.clone().requires_grad_(True)
        total = 0.0
        for r in torch.arange(8).chunk(4):
            part, _ = rk.ppo_policy_loss(acc[r], old[r], adv[r], mask[r], **dict(kw, weights=w[r], ref_logp=ref[r]),
                                         denominator=den)
            part.backward()
            total += part.item()
        assert total == pytest.approx(full.item(), rel=1e-9, abs=1e-12)
        torch.testing.assert_close(acc.grad, one.grad, rtol=1e-6, atol=1e-12)
