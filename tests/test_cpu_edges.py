"""Edge inputs on the CPU kernels, each op against the float64 reference: T=1, V=1, all-masked rows, empty
batches, inf/NaN values, non-contiguous views, and out-of-range token ids with validate=False.
`make sanitize` runs these under AddressSanitizer + UBSan, where any out-of-bounds access fails the run."""
import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

pytestmark = pytest.mark.skipif(rk.available_backends()["cpu"] != "available", reason="native extension not built")

NAN, INF = float("nan"), float("inf")
NO_GRAD = {"gae", "masked_whiten", "token_rewards"}  # constants of the rollout: their backward raises


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for o in out for t in _outputs(o)]


def _agree(op, args, kwargs=None, fast_only=None, grad=True):
    """rk.<op>(..., backend="cpu") == reference.<op>(float64 copies), outputs and input gradients, NaN where the
    reference has NaN. `fast_only` holds keyword arguments the reference does not take (validate)."""
    kwargs = kwargs or {}
    grad = grad and op not in NO_GRAD

    def inputs(double):
        out = []
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                a = (a.detach().double() if double else a.detach().clone()).requires_grad_(grad)
            out.append(a)
        return out

    fast_in, ref_in = inputs(False), inputs(True)
    fast = _outputs(getattr(rk, op)(*fast_in, **kwargs, **(fast_only or {}), backend="cpu"))
    slow = _outputs(getattr(reference, op)(*ref_in, **kwargs))
    assert len(fast) == len(slow)
    for i, (f, s) in enumerate(zip(fast, slow)):
        assert f.shape == s.shape, (op, i)
        torch.testing.assert_close(f.double(), s.detach().double(), rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m, i=i: f"{op} output {i}: {m}")
    pairs = [(f, s) for f, s in zip(fast, slow) if f.requires_grad]
    if pairs:
        sum(f.nan_to_num(0.0).sum() for f, _ in pairs).backward()
        sum(s.nan_to_num(0.0).sum() for _, s in pairs).backward()
        for i, (a, b) in enumerate(zip(fast_in, ref_in)):
            if isinstance(a, torch.Tensor) and a.requires_grad and b.grad is not None:
                torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6, equal_nan=True,
                                           msg=lambda m, i=i: f"{op} grad of input {i}: {m}")
    return fast


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- heads: V=1, T=1, validate=False with ids far outside [0, V), inf/NaN logits, strided views -------------

@pytest.mark.parametrize("V", [1, 2, 37])
def test_logprobs_from_logits_tiny_vocab_and_single_position(V):
    logits = _rand(1, 1, V, seed=V)
    lp, ent = _agree("logprobs_from_logits", (logits, torch.zeros(1, 1, dtype=torch.long)), dict(return_entropy=True))
    if V == 1:
        assert lp.item() == 0.0 and ent.item() == 0.0


def test_logprobs_from_logits_out_of_range_ids_unvalidated():
    V = 5
    tokens = torch.tensor([V, -1, -7, 2 ** 40, 2 ** 62, -(2 ** 62), 0, V - 1, -100])
    lp, _ = _agree("logprobs_from_logits", (_rand(9, V, seed=1), tokens), dict(return_entropy=True),
                   fast_only=dict(validate=False))
    assert torch.isnan(lp[:6]).all() and torch.isfinite(lp[6:]).all() and lp[8] == 0


def _non_finite_logits(V, seed):
    """Rows 0-2 have no defined distribution (an inf max, no finite logit, a NaN); row 3 has one impossible
    token (-inf) and a well-defined distribution; row 4 is ordinary."""
    logits = _rand(5, V, seed=seed)
    logits[0, 1] = INF
    logits[1, :] = -INF
    logits[2, 3] = NAN
    logits[3, 0] = -INF
    return logits, torch.tensor([1, 2, 3, 0, 4])


def test_logprobs_from_logits_inf_and_nan_logits():
    logits, tokens = _non_finite_logits(6, seed=2)
    _agree("logprobs_from_logits", (logits, tokens), grad=False)  # values only: rows 0-2 have no gradient to speak of
    lp, ent = _agree("logprobs_from_logits", (logits[3:], tokens[3:]), dict(return_entropy=True))
    assert lp[0] == -INF and torch.isfinite(ent).all()


def test_entropy_of_rows_without_a_distribution_is_nan():
    logits, tokens = _non_finite_logits(6, seed=2)
    lp, ent = _agree("logprobs_from_logits", (logits[:3], tokens[:3]), dict(return_entropy=True), grad=False)
    assert torch.isnan(lp).all() and torch.isnan(ent).all()


def test_logprobs_from_logits_strided():
    base = _rand(4, 9, 23, seed=3)
    logits = base.transpose(0, 1)[:, ::2, 1:22]  # [9, 2, 21], no dimension contiguous
    tokens = torch.randint(0, 21, (2, 9), generator=torch.Generator().manual_seed(3)).t()
    _agree("logprobs_from_logits", (logits, tokens), dict(temperature=0.6, return_entropy=True))


@pytest.mark.parametrize("V,H", [(1, 1), (1, 7), (3, 1)])
def test_linear_logprobs_tiny(V, H):
    tokens = torch.zeros(2, 1, dtype=torch.long)
    _agree("linear_logprobs", (_rand(2, 1, H, seed=4), _rand(V, H, seed=5), tokens),
           dict(bias=_rand(V, seed=6), return_entropy=True))


def test_linear_logprobs_out_of_range_ids_unvalidated():
    V, H = 7, 5
    tokens = torch.tensor([V, -1, 2 ** 40, -(2 ** 62), 3, -100])
    lp, _ = _agree("linear_logprobs", (_rand(6, H, seed=7), _rand(V, H, seed=8), tokens), dict(return_entropy=True),
                   fast_only=dict(validate=False))
    assert torch.isnan(lp[:4]).all() and torch.isfinite(lp[4:]).all()


def test_linear_logprobs_non_finite_hidden_and_strided_weight():
    H, V = 6, 11
    hidden = _rand(4, H, seed=9)
    hidden[1, 2] = INF
    hidden[2, 0] = NAN
    weight = _rand(H, 2 * V, seed=10).t()[::2]  # [V, H] with strides (2, 2V)
    tokens = torch.tensor([0, 3, 10, -100])
    _agree("linear_logprobs", (hidden, weight, tokens), grad=False)
    _agree("linear_logprobs", (hidden[[0, 3]], weight, tokens[[0, 3]]), dict(bias=_rand(V, seed=11),
                                                                            return_entropy=True))


# ---- token ops and losses: T=1, all-masked, empty batch, inf/NaN values, strided views ------------------------

def _masks(B, T):
    m = torch.ones(B, T, dtype=torch.bool)
    m[0] = False  # an all-masked row
    if B > 2:
        m[2, T // 2:] = False
    return m


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (4, 7), (0, 5)])
def test_token_ops_edge_shapes(B, T):
    m = _masks(B, T) if B else torch.zeros(0, T, dtype=torch.bool)
    a, b, c = (_rand(B, T, seed=s) for s in (11, 12, 13))
    _agree("token_kl", (a, b), dict(estimator="k3", clamp=5.0))
    _agree("gae", (a, b, m), dict(gamma=0.9, lam=0.8))
    _agree("masked_whiten", (a, m), dict(unbiased=True))
    _agree("token_rewards", (_rand(B, seed=14), m), dict(logp=a, ref_logp=b, kl_coef=0.1, score_position="eos+1"))
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"):
        _agree("ppo_policy_loss", (a, b, c, m), dict(dual_clip=2.0, aggregation=agg))
        _agree("ppo_value_loss", (a, b, c, m), dict(aggregation=agg))
    _agree("dpo_loss", (a.reshape(-1), b.reshape(-1), c.reshape(-1), a.reshape(-1).flip(0)), dict(beta=0.3))


def test_all_masked_batch_gives_zero_not_nan():
    m = torch.zeros(3, 4, dtype=torch.bool)
    a, b, c = (_rand(3, 4, seed=s) for s in (15, 16, 17))
    loss = _agree("ppo_policy_loss", (a, b, c, m))[0]
    assert loss.item() == 0.0
    (w,) = _agree("masked_whiten", (a, m))
    assert not w.any()


def _non_finite_batch(masked_only):
    B, T = 3, 6
    m = _masks(B, T)
    a, b, c = (_rand(B, T, seed=s) for s in (18, 19, 20))
    for x in (a, b, c):
        x[0, 1] = NAN  # row 0 is all masked
        x[0, 4] = INF
    a[2, 5], b[2, 4], c[2, 3] = -INF, NAN, INF  # masked positions of row 2
    if not masked_only:
        a[1, 0], b[1, 2] = INF, NAN
    return a, b, c, m


@pytest.mark.parametrize("masked_only", [True, False], ids=["masked", "valid"])
def test_non_finite_values(masked_only):
    """At masked positions inf/NaN must not reach any output or gradient; at valid ones the outputs agree with
    the reference, NaN where it has NaN (gradients there are 0·NaN artefacts of autograd, not compared)."""
    a, b, c, m = _non_finite_batch(masked_only)
    grad = masked_only
    _agree("token_kl", (a, b), dict(estimator="k2"), grad=grad)
    _agree("gae", (a, b, m))
    _agree("masked_whiten", (a, m))
    _agree("token_rewards", (_rand(3, seed=21), m), dict(logp=a, ref_logp=b, kl_coef=0.5, dense=c, dense_clip=1.0))
    _agree("ppo_policy_loss", (a, b, c, m), dict(aggregation="seq-mean-token-mean"), grad=grad)
    _agree("ppo_value_loss", (a, b, c, m), grad=grad)
    if masked_only:
        for out in (rk.gae(a, b, m, backend="cpu"), rk.ppo_policy_loss(a, b, c, m, backend="cpu")[0]):
            assert all(torch.isfinite(t).all() for t in _outputs(out))
    _agree("dpo_loss", (a[:, 0], b[:, 0], c[:, 0], a[:, 3]), dict(loss_type="robust", label_smoothing=0.1),
           grad=grad)


def test_non_contiguous_inputs():
    base = _rand(3, 8, 10, seed=22)
    a, b, c = base[0, :, ::2].t()[:, :4], base[1, :, 1::2].t()[:, :4], base[2, ::2, :5].t()  # [5, 4] views
    wide = torch.zeros(5, 8, dtype=torch.bool)
    wide[:, ::2] = _masks(5, 4)
    m = wide[:, ::2]
    score = base[0, :5, 0]
    assert not any(t.is_contiguous() for t in (a, b, c, m, score))
    _agree("token_kl", (a, b), dict(estimator="k3"))
    _agree("gae", (a, b, m))
    _agree("masked_whiten", (a, m))
    _agree("token_rewards", (score, m), dict(logp=a, ref_logp=b, kl_coef=0.2))
    _agree("ppo_policy_loss", (a, b, c, m))
    _agree("ppo_value_loss", (a, b, c, m))
    _agree("dpo_loss", (a[:, 0], b[:, 1], c[:, 2], a[:, 3]))
