"""rk.ppo_policy_loss's GRPO-family arguments (issue 14 item 2): per-row advantages, GSPO's sequence-level
ratio, CISPO, detached weights, the KL term, the denominator override and the new stats. The reference is
checked against values worked out by hand; every backend against the reference."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import rlhf_kernels as rk
from rlhf_kernels import reference

from conftest import cpu_backends, needs_gpu, ragged_masks

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
NATIVE = [b for b in cpu_backends("ppo_policy_loss") if b != "reference"]
# Triton receives the float scalars (clip bounds, kl_coef, denominator) as fp32: each scaled term then
# carries a relative error up to 2⁻²⁴, which sums of terms of both signs can enlarge relative to the total
TOL = {"cpu": 1e-12, "cuda": 1e-12, "triton": 1e-6}
# the variants the backends are swept over; "row_adv" passes one advantage per row, "ref" and "w" add
# ref_logp and weights
VARIANTS = {
    "gspo": dict(ratio_level="sequence", clip_low=0.02, clip_high=0.03),  # row ratios spread ~±0.1
    "gspo_dual": dict(ratio_level="sequence", dual_clip=3.0, row_adv=True),
    "cispo": dict(loss_type="cispo", clip_high=0.3, w=True),
    "cispo_seq": dict(loss_type="cispo", ratio_level="sequence", clip_high=0.1, row_adv=True),
    "kl_k3_weights": dict(clip_high=0.28, w=True, ref=True, kl_coef=0.1),
    "kl_k2_seq": dict(ratio_level="sequence", ref=True, kl_coef=0.2, kl_estimator="k2", w=True),
    "kl_stat_only": dict(ref=True, kl_estimator="k1", row_adv=True),
    "denominator": dict(denominator=11.0, w=True),
}


def _variant_inputs(shape, variant, seed, dtype=torch.float64):
    """(logp, old, adv, kwargs) for a VARIANTS entry: random inputs, never zeros."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(VARIANTS[variant])
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 0.01
    old = logp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    adv_shape = shape[:-1] if kw.pop("row_adv", False) else shape
    adv = torch.randn(adv_shape, generator=g, dtype=torch.float64)
    if kw.pop("w", False):
        kw["weights"] = (torch.rand(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    if kw.pop("ref", False):
        kw["ref_logp"] = (logp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), kw


def _close(out, exp, tol):
    (loss, stats, grads), (rloss, rstats, rgrads) = out, exp
    torch.testing.assert_close(loss, rloss, rtol=tol, atol=tol)
    assert set(stats) == set(rstats)
    for k in stats:
        assert stats[k].dtype == torch.float32 and stats[k].dim() == 0 and not stats[k].requires_grad
        torch.testing.assert_close(stats[k], rstats[k], rtol=1e-6, atol=1e-7)
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


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


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
@pytest.mark.parametrize("aggregation", AGGS)
def test_micro_batches_with_global_denominator_equal_one_batch(backend, aggregation):
    if backend == "triton" and aggregation in ("seq-mean-token-sum", "token-sum"):
        pytest.skip("the interpreter is slow; the divisor override is the same code for every aggregation")
    # issue 14 item 7: the gradient accumulated over 4 micro-batches, each given the global count, is the
    # one-batch gradient
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(8, 13, generator=g, dtype=torch.float64) * 2
    old = logp + 0.4 * torch.randn(8, 13, generator=g, dtype=torch.float64)
    adv = torch.randn(8, generator=g, dtype=torch.float64)
    w, ref = torch.rand(8, 13, generator=g, dtype=torch.float64), -torch.rand(8, 13, generator=g, dtype=torch.float64)
    mask = ragged_masks(8, 13, g)["holes"]
    den = _global_denominator(mask, aggregation)
    kws = (dict(ratio_level="sequence", clip_high=0.28), dict(loss_type="cispo", clip_high=0.5))
    for kw in kws[:1] if backend == "triton" else kws:  # the interpreter is slow
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


def _both(backend, logp, old, adv, mask, **kw):
    out = _grads(lambda a, b, c: rk.ppo_policy_loss(a, b, c, mask, backend=backend, **kw), logp, old, adv)
    exp = _grads(lambda a, b, c: _ref(a, b, c, mask, **kw), logp, old, adv)
    return out, exp


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("aggregation", AGGS)
def test_backends_match_reference_fp64(backend, variant, aggregation):
    if variant == "denominator" and aggregation == "token-sum":
        pytest.skip("token-sum has no divisor")
    triton = backend == "triton"  # the interpreter is slow: fewer cases (the old file sweeps its aggregations)
    if triton and aggregation in ("seq-mean-token-sum", "token-sum") and variant != "gspo":
        pytest.skip("interpreter time")
    for i, shape in enumerate([(3, 1), (2, 3, 5)] if triton else [(3, 1), (4, 37), (2, 3, 5)]):
        logp, old, adv, kw = _variant_inputs(shape, variant, seed=100 * i + len(variant))
        R = math.prod(shape[:-1])
        for kind in ("holes",) if triton else ("right", "holes"):
            mask = ragged_masks(R, shape[-1], torch.Generator().manual_seed(i))[kind].reshape(shape)
            out, exp = _both(backend, logp, old, adv, mask, aggregation=aggregation, **kw)
            assert out[0].dtype == torch.float64
            _close(out, exp, TOL[backend])


def test_variants_exercise_every_branch():
    # the sweep is only meaningful if ratios fall on both sides of the clip range and inside it
    for variant in ("gspo", "cispo", "kl_k3_weights"):
        logp, old, adv, kw = _variant_inputs((4, 37), variant, seed=len(variant))
        mask = ragged_masks(4, 37, torch.Generator().manual_seed(1))["holes"]
        _, stats = _ref(logp, old, adv, mask, **kw)
        assert 0 < stats["clipfrac"].item() < 1, variant


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("variant", ["gspo_dual", "cispo_seq", "kl_k3_weights", "kl_k2_seq"])
def test_gradcheck_native(backend, variant):
    if backend == "triton" and variant in ("cispo_seq", "kl_k2_seq"):
        pytest.skip("the interpreter is slow; the sweep compares triton's gradients with the reference's")
    # triton: one random projection (fast_mode); the sweep compares its gradients with the reference elementwise
    logp, old, adv, kw = _variant_inputs((3, 7), variant, seed=21)
    if kw.get("loss_type") == "cispo":
        old = logp - 0.5  # every ρ truncated: the constant weight finite differences can check (see above)
    mask = ragged_masks(3, 7, torch.Generator().manual_seed(3))["holes"]
    ins = [t.clone().requires_grad_(True) for t in (logp, old, adv)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: rk.ppo_policy_loss(a, b, c, mask, aggregation="seq-mean-token-mean", backend=backend,
                                           **kw)[0], ins, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", NATIVE)
def test_masked_garbage_never_leaks(backend):
    logp, old, adv, kw = _variant_inputs((3, 20), "kl_k2_seq", seed=5)
    mask = ragged_masks(3, 20, torch.Generator().manual_seed(5))["holes"]
    clean = _grads(lambda a, b, c: rk.ppo_policy_loss(a, b, c, mask, backend=backend, **kw), logp, old, adv)
    bad = [t.clone() for t in (logp, old, adv, kw["weights"], kw["ref_logp"])]
    for t, v in zip(bad, (float("inf"), float("-inf"), float("nan"), float("nan"), float("inf"))):
        t[~mask] = v
    kw_bad = dict(kw, weights=bad[3], ref_logp=bad[4])
    dirty = _grads(lambda a, b, c: rk.ppo_policy_loss(a, b, c, mask, backend=backend, **kw_bad), *bad[:3])
    _close(dirty, clean, 0.0)


@pytest.mark.parametrize("backend", NATIVE)
def test_low_precision_and_tensor_denominator(backend):
    logp, old, adv, kw = _variant_inputs((3, 29), "kl_k3_weights", seed=9, dtype=torch.bfloat16)
    mask = ragged_masks(3, 29, torch.Generator().manual_seed(9))["holes"]
    den = torch.tensor(17.0)
    loss, stats, grads = _grads(lambda a, b, c: rk.ppo_policy_loss(a, b, c, mask, backend=backend, denominator=den,
                                                                   **kw), logp, old, adv)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    exp = _grads(lambda a, b, c: _ref(a, b, c, mask, denominator=17, **kw64), logp.double(), old.double(),
                 adv.double())
    torch.testing.assert_close(loss.double(), exp[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, exp[2]):
        torch.testing.assert_close(g, r.to(torch.bfloat16), rtol=1e-2, atol=1e-6)


@pytest.mark.skipif("cpu" not in NATIVE, reason="native extension not built")
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 5), T=st.integers(1, 40), density=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16),
       aggregation=st.sampled_from(AGGS), variant=st.sampled_from(list(VARIANTS)))
def test_property_cpu_matches_reference(B, T, density, seed, aggregation, variant):
    if variant == "denominator" and aggregation == "token-sum":
        aggregation = "token-mean"
    logp, old, adv, kw = _variant_inputs((B, T), variant, seed=seed)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < density
    _close(*_both("cpu", logp, old, adv, mask, aggregation=aggregation, **kw), 1e-12)


@pytest.mark.skipif("cpu" not in NATIVE, reason="native extension not built")
def test_deterministic_cpu():
    logp, old, adv, kw = _variant_inputs((48, 301), "kl_k2_seq", seed=9, dtype=torch.float32)
    mask = ragged_masks(48, 301, torch.Generator().manual_seed(9))["holes"]
    f = lambda a, b, c: rk.ppo_policy_loss(a, b, c, mask, backend="cpu", **kw)  # noqa: E731
    a, b = _grads(f, logp, old, adv), _grads(f, logp, old, adv)
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


@pytest.mark.skipif("cpu" not in NATIVE, reason="native extension not built")
def test_opcheck_and_compile_cpu():
    logp, old, adv, kw = _variant_inputs((4, 9), "kl_k3_weights", seed=4, dtype=torch.float32)
    mask = ragged_masks(4, 9, torch.Generator().manual_seed(4))["holes"]
    lp = logp.clone().requires_grad_(True)
    op = torch.ops.rlhf_kernels.ppo_policy_loss_fwd.default
    torch.library.opcheck(op, (lp, old, adv[:, 0].contiguous(), mask, kw["weights"], kw["ref_logp"], 0.2, 0.28, 0.0,
                               1, 1, 0, 0.1, 2, 0.0))
    torch.library.opcheck(op, (lp, old.clone().requires_grad_(True), adv, mask, None, kw["ref_logp"], 0.2, 0.3, 0.0,
                               0, 0, 1, 0.1, 1, 5.0))

    def f(a, b, c, m, w, r):
        loss, stats = rk.ppo_policy_loss(a, b, c, m, ratio_level="sequence", weights=w, ref_logp=r, kl_coef=0.1,
                                         aggregation="seq-mean-token-mean", denominator=3, backend="cpu")
        return loss, stats["ratio_mean"], stats["kl"]

    out = torch.compile(f, fullgraph=True)(lp, old, adv[:, 0], mask, kw["weights"], kw["ref_logp"])
    out[0].backward()
    exp = _grads(lambda a, b, c: _ref(a, b, c, mask, ratio_level="sequence", weights=kw["weights"],
                                      ref_logp=kw["ref_logp"], kl_coef=0.1, aggregation="seq-mean-token-mean",
                                      denominator=3), logp, old, adv[:, 0])
    torch.testing.assert_close(out[0], exp[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], exp[1]["ratio_mean"])
    torch.testing.assert_close(lp.grad, exp[2][0], rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_matches_reference(variant):
    logp, old, adv, kw = _variant_inputs((5, 1030), variant, seed=6, dtype=torch.float32)
    mask = ragged_masks(5, 1030, torch.Generator().manual_seed(6))["holes"]
    kwc = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    f = lambda a, b, c: rk.ppo_policy_loss(a, b, c, mask.cuda(), backend="cuda", **kwc)  # noqa: E731
    out = _grads(f, logp.cuda(), old.cuda(), adv.cuda())
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    exp = _grads(lambda a, b, c: _ref(a, b, c, mask, **kw64), logp.double(), old.double(), adv.double())
    torch.testing.assert_close(out[0].cpu().double(), exp[0], rtol=1e-5, atol=1e-6)
    for k in exp[1]:
        torch.testing.assert_close(out[1][k].cpu(), exp[1][k], rtol=1e-5, atol=1e-6)
    for g, r in zip(out[2], exp[2]):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-5, atol=1e-6)
    again = _grads(f, logp.cuda(), old.cuda(), adv.cuda())
    assert torch.equal(out[0], again[0]) and all(torch.equal(x, y) for x, y in zip(out[2], again[2]))
