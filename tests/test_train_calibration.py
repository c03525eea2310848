"""The confidence task and PPO-C / PPO-M (docs/algorithms.md §8) on hand-built numbers: confidence
parsing, the gold reward ignoring the confidence, the calibration metrics, PPO-C's adjustment and
EMA order, the CRM loss, and the config checks."""
import math

import pytest
import torch

from rlhf_kernels.train import tasks
from rlhf_kernels.train.core import config
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.decode import rollout
from rlhf_kernels.train.rewards import calibration, crm
from rlhf_kernels.train.tasks import confidence as C, sentiment

E, P = sentiment.EOS, sentiment.PAD
W = {w: i for i, w in enumerate(C.WORDS)}


def row(*words, width=7):
    ids = [W[w] for w in words]
    return ids + [P] * (width - len(ids))


def test_vocabulary_extends_the_default_task():
    assert C.WORDS[:len(sentiment.WORDS)] == sentiment.WORDS
    assert [C.WORDS[C.CONF0 + c] for c in (0, 10)] == ["conf0", "conf10"] and len(C.WORDS) == len(sentiment.WORDS) + 11
    assert tasks.get("sentiment") is sentiment and tasks.get("confidence") is C
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.get("nope")


def test_confidence_parsing():
    r = torch.tensor([row("great", "conf7", "<eos>"),                          # present
                      row("great", "fun", "<eos>"),                            # missing: 5
                      row("conf2", "great", "conf9", "<eos>", "conf3"),        # several: the last before <eos>
                      row("great", "conf4", "conf6", "fun", "dull", "the", "a"),  # no <eos>: the last one
                      row("<eos>", "conf1")])                                  # only after <eos>: missing
    c, stated = C.confidence(r)
    assert c.tolist() == [7, 5, 9, 6, 5]
    assert stated.tolist() == [True, False, True, True, False]


def test_strip_and_insert_confidence():
    r = torch.tensor([row("conf2", "great", "conf9", "fun", "<eos>"), row("great", "<eos>")])
    assert C.strip_confidence(r).tolist() == [row("great", "fun", "<eos>"), row("great", "<eos>")]
    content = torch.tensor([row("great", "fun", "<eos>", width=4), row("<eos>", width=4)])
    out = C.with_confidence(content, torch.tensor([8, 0]))
    assert out.tolist() == [row("great", "fun", "conf8", "<eos>", width=5), row("conf0", "<eos>", width=5)]
    with pytest.raises(ValueError, match="<eos>"):
        C.with_confidence(torch.tensor([row("great", width=3)]), torch.tensor([1]))


def test_gold_reward_ignores_the_confidence():
    with_conf = torch.tensor([row("great", "conf9", "fun", "<eos>"),
                              row("great", "great", "great", "great", "conf10", "<eos>"),
                              row("great", "conf0", "great")])  # no <eos>: 0
    plain = torch.tensor([row("great", "fun", "<eos>"), row("great", "great", "great", "great", "<eos>"),
                          row("great", "great")])
    assert C.gold_reward(with_conf).tolist() == [0.5, 1.0, 0.0]  # counted as a word it would be 0.8
    assert torch.equal(C.gold_reward(with_conf), sentiment.gold_reward(plain))


def test_sft_demonstrations_are_overconfident_and_uninformative():
    d = C.demonstrations(4000, torch.Generator().manual_seed(0))
    assert (d == E).sum(1).eq(1).all()
    c, stated = C.confidence(d)
    assert stated.all()
    pos = torch.arange(d.shape[1]).expand_as(d)
    conf_pos = torch.where(C.is_confidence(d), pos, -1).amax(1)
    assert torch.equal(conf_pos + 1, (d == E).int().argmax(1))  # words … conf_c <eos>
    m = C.metrics(d)
    assert m["confidence"] > 0.7 and C.gold_reward(d).mean() < 0.4  # overconfident
    assert abs(m["conf_corr"]) < 0.05 and m["ece"] > 0.35 and m["conf_missing"] == 0.0
    # the content is exactly the default task's demonstrations (same draws)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(C.strip_confidence(C.demonstrations(50, g1))[:, :-1], sentiment.demonstrations(50, g2))


def test_calibration_metrics_by_hand():
    c_hat = torch.tensor([1.0, 1.0, 0.5, 0.0])
    gold = torch.tensor([0.5, 1.0, 0.25, 0.0])
    m = C.calibration_metrics(c_hat, gold)
    # bins c=10: weight 1/2, |1 − 0.75|; c=5: weight 1/4, |0.5 − 0.25|; c=0: 0
    assert m["ece"] == pytest.approx(0.5 * 0.25 + 0.25 * 0.25)
    assert m["brier"] == pytest.approx((0.25 + 0 + 0.0625 + 0) / 4)
    assert m["confidence"] == pytest.approx(0.625)
    assert m["conf_corr"] == pytest.approx(torch.corrcoef(torch.stack([c_hat, gold]).double())[0, 1].item())
    assert C.calibration_metrics(torch.full((3,), 0.7), torch.tensor([0.1, 0.5, 0.9]))["conf_corr"] == 0.0


def test_ppo_c_adjustment_by_hand():
    r, c_hat, rbar, w = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.9, 0.9, 0.1]), 0.5, 2.0
    # difference: r + w·(r − r̄)·(ĉ − 0.5)
    want = [2 + 2 * 1.5 * 0.4, -1 + 2 * -1.5 * 0.4, 0.5 + 0.0]
    assert calibration.adjust(r, rbar, c_hat, w, "difference").tolist() == pytest.approx(want)
    # threshold: r ± w·|r|·(ĉ − 0.5), + when r ≥ r̄ (the third row sits exactly on r̄)
    want = [2 + 2 * 2 * 0.4, -1 - 2 * 1 * 0.4, 0.5 + 2 * 0.5 * -0.4]
    assert calibration.adjust(r, rbar, c_hat, w, "threshold").tolist() == pytest.approx(want)
    with pytest.raises(ValueError, match="ppo_c_adjustment"):
        calibration.adjust(r, rbar, c_hat, w, "ratio")


def test_ppo_c_clamps_then_updates_the_average_then_adjusts():
    responses = torch.tensor([row("great", "conf10", "<eos>"), row("dull", "conf10", "<eos>"), row("fun", "<eos>")])
    s = rollout.Samples(torch.zeros(3, 4, dtype=torch.long), *rollout.truncate_after_eos(responses))
    seen = []

    def score_fn(samples):
        seen.append(samples)
        return torch.tensor([12.0, -1.0, 0.5])  # the first is clamped to 10 before it enters r̄

    cfg = build("ppo", None, {"task": "confidence", "ppo_c": "true", "ppo_c_alpha": "0.1", "ppo_c_w": "2"})
    state = {"ppo_c_rbar": 1.0}
    out, stats = calibration.ppo_c_score(score_fn, s, state, cfg)
    rbar = 0.1 * (10 - 1 + 0.5) / 3 + 0.9 * 1.0
    assert state["ppo_c_rbar"] == pytest.approx(rbar) and stats["ppo_c_rbar"] == state["ppo_c_rbar"]
    c_hat = torch.tensor([1.0, 1.0, 0.5])  # the last states none: 5
    want = torch.tensor([10.0, -1.0, 0.5]) + 2 * (torch.tensor([10.0, -1.0, 0.5]) - rbar) * (c_hat - 0.5)
    assert torch.allclose(out, want)
    # the scorer saw the content only
    assert seen[0].responses.tolist() == [row("great", "<eos>"), row("dull", "<eos>"), row("fun", "<eos>")]
    assert seen[0].mask.sum(1).tolist() == [2, 2, 2]


def test_crm_loss_by_hand():
    r = {k: torch.tensor([v]) for k, v in
         dict(chosen=0.3, rejected=-0.2, cwh=1.0, cwl=0.25, rwh=0.5, rwl=-0.5).items()}

    def nls(x):  # −log σ(x)
        return math.log1p(math.exp(-x))
    base = nls(1.0 - 0.25) + nls(-0.5 - 0.5)
    assert crm.crm_loss(r, "sigmoid").item() == pytest.approx(base)
    assert crm.crm_loss(r, "combined").item() == pytest.approx(base + nls(0.3 + 0.2))
    assert crm.crm_loss(r, "variant_1").item() == pytest.approx(base + nls(1.0 + 0.5))
    assert crm.confidence_hits(r).tolist() == [True, False]
    with pytest.raises(ValueError, match="crm_loss"):
        crm.crm_loss(r, "kwise")


def test_calibrated_pairs():
    n = 200
    p, chosen, rejected, cwh, cwl, rwh, rwl = C.calibrated_pairs(n, torch.Generator().manual_seed(1), 0.0, 3, 7)
    p2, chosen2, rejected2 = C.preference_pairs(n, torch.Generator().manual_seed(1))
    assert torch.equal(p, p2) and torch.equal(chosen, chosen2) and torch.equal(rejected, rejected2)
    for plain, hi, lo in ((chosen, cwh, cwl), (rejected, rwh, rwl)):
        content = C.strip_confidence(plain)
        assert torch.equal(C.strip_confidence(hi), content) and torch.equal(C.strip_confidence(lo), content)
        assert C.confidence(hi)[0].min() >= 7 and C.confidence(lo)[0].max() <= 3
    assert (C.gold_reward(chosen) > C.gold_reward(rejected)).all()


@pytest.mark.parametrize("kind,keys,match", [
    ("ppo", {"ppo_c": "true"}, "ppo_c needs task=confidence"),
    ("rm", {"calibrated": "true"}, "calibrated needs task=confidence"),
    ("ppo", {"task": "confidence", "ppo_c_alpha": "0"}, r"ppo_c_alpha must be in \(0, 1\]"),
    ("ppo", {"ppo_c_adjustment": "ratio"}, "difference, threshold"),
    ("rm", {"task": "confidence", "crm_low_max": "7"}, "crm_low_max < crm_high_min"),
    ("rm", {"crm_loss": "kwise"}, "sigmoid, combined, variant_1"),
    ("sft", {"task": "words"}, "sentiment, confidence"),
])
def test_config_errors(kind, keys, match):
    with pytest.raises(config.ConfigError, match=match):
        build(kind, None, keys)


def test_defaults_leave_the_default_task_alone():
    ppo, rm = build("ppo"), build("rm")
    assert (ppo.task, ppo.ppo_c, ppo.ppo_c_alpha, ppo.ppo_c_w, ppo.ppo_c_adjustment) == \
        ("sentiment", False, 0.1, 2.0, "difference")
    assert (rm.task, rm.calibrated, rm.crm_loss) == ("sentiment", False, "sigmoid")
