"""A few steps of every stage on the tiny confidence task: SFT, reward model, calibrated reward
model (PPO-M), PPO-C (with resume equality of its running mean r̄) and PPO with the calibrated RM."""
import pytest
import torch

from rlhf_kernels.train import ppo, rm, sft
from rlhf_kernels.train.cli import main
from rlhf_kernels.train.core import models
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.rewards import crm
from rlhf_kernels.train.tasks import confidence, sentiment

from train_helpers import FAST, PPO_FAST, metrics

SMALL = {**FAST, "steps": 2, "batch_size": 4, "micro_batch_size": 2, "task": "confidence"}
PPO_C = {**PPO_FAST, "task": "confidence", "ppo_c": "true"}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    d = tmp_path_factory.mktemp("confidence")
    sft_model = sft.train(build("sft", None, {**SMALL, "examples": 16, "out": str(d / "sft")}))["model"]
    rm_model = rm.train(build("rm", None, {**SMALL, "model": sft_model, "pairs": 16,
                                                      "out": str(d / "rm")}))["model"]
    return {"dir": d, "sft": sft_model, "rm": rm_model}


def test_sft_and_rm_on_the_confidence_task(stages):
    policy = models.load_lm(stages["sft"])
    assert policy.get_output_embeddings().weight.shape[0] == len(confidence.WORDS)
    row = metrics(stages["dir"] / "sft")[-1]
    assert set(confidence.METRICS) <= set(row)  # calibration is logged at evaluation
    # a policy of the default task cannot say a confidence: refused by name
    models.save_lm(models.load_lm("tiny-llama"), stages["dir"] / "sentiment_policy")
    with pytest.raises(ValueError, match=f"lm_head has {len(sentiment.WORDS)} rows but the tokenizer has "
                                         f"{len(confidence.WORDS)}"):
        ppo.PPO(build("ppo", None, {**PPO_C, "policy": str(stages["dir"] / "sentiment_policy"), "out": "x"}))


def test_ppo_m_calibrated_reward_model_then_ppo(stages, capsys):
    out = stages["dir"] / "crm"
    keys = {**SMALL, "model": stages["rm"], "pairs": 16, "calibrated": "true", "crm_loss": "combined"}
    assert main(["train", "rm", *[f"--{k}={v}" for k, v in keys.items()], "--out", str(out)]) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "confidence_accuracy", "eval_accuracy", "eval_confidence_accuracy"} <= set(rows[-1])
    assert (out / "curves.png").stat().st_size > 0 and (out / "checkpoint.pt").exists()
    # started from the saved reward model: its head, not a fresh one, was trained further
    start, end = models.ScalarModel.load(stages["rm"]), models.ScalarModel.load(out / "model")
    fresh = crm.load("tiny-llama", "cpu")
    assert not torch.equal(start.head.weight, end.head.weight)
    assert (end.head.weight - start.head.weight).abs().max() < (fresh.head.weight - start.head.weight).abs().max()
    assert '"eval_confidence_accuracy"' in capsys.readouterr().out
    # PPO-M is plain PPO with that reward model
    result = ppo.train(build("ppo", None, {**PPO_FAST, "task": "confidence", "policy": stages["sft"],
                                                  "reward_model": str(out / "model"), "steps": 1,
                                                  "out": str(out / "ppo_m")}))
    assert set(confidence.METRICS) <= set(result)
    assert "ppo_c_rbar" not in metrics(out / "ppo_m")[-1]


def test_ppo_c_steps_and_resume(stages, monkeypatch):
    keys = {**PPO_C, "policy": stages["sft"], "reward_model": stages["rm"], "steps": 2}
    straight = stages["dir"] / "ppo_c"
    ppo.train(build("ppo", None, {**keys, "out": str(straight)}))
    rows = metrics(straight)
    assert {"ppo_c_rbar", "ppo_c_content_score", "ece", "brier", "eval_ece", "eval_gold_reward"} <= set(rows[-1])
    # r̄ starts at ppo_c_rbar_init (0) and moves by α·(batch mean − r̄) each iteration
    assert rows[0]["ppo_c_rbar"] == pytest.approx(0.1 * rows[0]["ppo_c_content_score"], rel=1e-5)
    assert rows[1]["ppo_c_rbar"] == pytest.approx(0.1 * rows[1]["ppo_c_content_score"] + 0.9 * rows[0]["ppo_c_rbar"])
    ck = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert ck["extra"]["ppo_c_rbar"] == rows[-1]["ppo_c_rbar"]

    original = ppo.PPO.step

    def crash_at_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, step)

    resumed = stages["dir"] / "ppo_c_resumed"
    monkeypatch.setattr(ppo.PPO, "step", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        ppo.train(build("ppo", None, {**keys, "out": str(resumed)}))
    monkeypatch.setattr(ppo.PPO, "step", original)
    ppo.train(build("ppo", None, {**keys, "out": str(resumed)}))
    assert metrics(resumed) == rows
