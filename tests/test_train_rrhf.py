"""`rlhf-kernels train rrhf`: the CLI with a reward model, candidate layout, updates that follow the
ranking, resume equality, config errors."""
import json

import pytest
import torch

from rlhf_kernels.train import rrhf
from rlhf_kernels.train.cli import main
from rlhf_kernels.train.core import config, models
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.core.runlog import Run, clip_and_step
from rlhf_kernels.train.tasks import sentiment

from train_helpers import FAST, interrupt_then_resume, metrics

RRHF_FAST = {**FAST, "steps": 2, "batch_size": 4, "micro_batch_size": 2, "samples": 2, "demonstrations": 1}


def opts(d):
    return [f"--{k}={v}" for k, v in d.items()]


def test_cli_with_reward_model(tmp_path, capsys):
    rm_dir = tmp_path / "rm"
    models.ScalarModel(models.load_lm("tiny-llama")).save(rm_dir)  # untrained: the path is what is tested
    keys = {**RRHF_FAST, "reward_model": str(rm_dir), "logprob_impl": "naive", "sft_aggregation": "token-mean",
            "length_penalty": 0.5}
    assert main(["train", "rrhf", *opts(keys), "--out", str(tmp_path / "rrhf")]) == 0
    d = tmp_path / "rrhf"
    rows = metrics(d)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "rank_loss", "sft_loss", "rank_violations", "best_logp", "gold_reward", "score",
                "best_score", "best_is_demonstration", "grad_norm", "eval_gold_reward", "lr"):
        assert key in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (d / "curves.png").stat().st_size > 0 and (d / "model" / "config.json").exists()
    assert torch.load(d / "checkpoint.pt", weights_only=True)["step"] == 2
    assert "gold_reward" in json.loads((d / "result.json").read_text())
    assert '"gold_reward"' in capsys.readouterr().out


def test_updates_follow_the_ranking(tmp_path):
    """A weaker but real effect than a gold-reward gain (which needs minutes; README): a few updates
    on one batch of gold-scored candidates shrink the ranking loss and raise the best response's
    log-prob; fused and naive log-probs give the same loss."""
    cfg = build("rrhf", None, {**RRHF_FAST, "samples": 3, "lr": 1e-2, "out": str(tmp_path)})
    trainer = rrhf.RRHF(cfg)
    trainer.run = Run(cfg, "rrhf")
    s = trainer.candidates(1, torch.Generator().manual_seed(0))
    rewards = trainer.score(s).view(cfg.batch_size, -1)
    before = trainer.accumulate(s, rewards, 1)
    trainer.cfg.logprob_impl = "naive"
    assert trainer.accumulate(s, rewards, 1)["loss"] == pytest.approx(before["loss"], rel=1e-5)
    trainer.cfg.logprob_impl = "fused"
    trainer.optimizer.zero_grad()
    assert before["rank_loss"] > 0
    for step in range(8):
        trainer.accumulate(s, rewards, step)
        clip_and_step(trainer.run, step, trainer.optimizer, trainer.policy.parameters(), cfg.max_grad_norm)
    after = trainer.accumulate(s, rewards, 9)
    assert after["rank_loss"] < 0.5 * before["rank_loss"]
    assert after["rank_violations"] < before["rank_violations"]
    assert after["best_logp"] > before["best_logp"] + 0.1


def test_candidates_are_grouped_by_prompt(tmp_path):
    trainer = rrhf.RRHF(build("rrhf", None, {**RRHF_FAST, "samples": 3, "demonstrations": 2,
                                                    "out": str(tmp_path)}))
    s = trainer.candidates(1, torch.Generator().manual_seed(0))
    B, n = 4, 5
    assert s.responses.shape == (B * n, max(trainer.cfg.max_new_tokens, sentiment.LENGTHS[1] + 1))
    prompts = s.prompts.view(B, n, -1)
    assert torch.equal(prompts, prompts[:, :1].expand_as(prompts))  # a prompt's candidates share it
    demos = s.responses.view(B, n, -1)[:, 3:].reshape(B * 2, -1)
    assert (demos == sentiment.EOS).any(1).all()  # demonstrations always end the sentence
    # each mask is the prefix up to the first <eos>, or the whole sampled length without one
    first_eos = (s.responses == sentiment.EOS).int().argmax(1)
    length = torch.where(s.has_eos, first_eos + 1, torch.full_like(first_eos, trainer.cfg.max_new_tokens))
    assert torch.equal(s.mask, torch.arange(s.responses.shape[1]) < length[:, None])


def test_resume_gives_the_same_metrics(tmp_path, monkeypatch):
    keys = {**RRHF_FAST, "steps": 2}
    rrhf.train(build("rrhf", None, {**keys, "out": str(tmp_path / "straight")}))
    def one_step_logged():
        assert len(metrics(tmp_path / "resumed")) == 1

    interrupt_then_resume(monkeypatch, rrhf.RRHF, 2,
                          lambda: rrhf.train(build("rrhf", None, {**keys, "out": str(tmp_path / "resumed")})),
                          between=one_step_logged)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert len(a) == 2 and a == b


@pytest.mark.parametrize("keys,match", [({"samples": 1, "demonstrations": 0}, "at least 2 candidates"),
                                        ({"samples": 0}, "samples must be >= 1"),
                                        ({"length_penalty": -1}, "length_penalty must be >= 0"),
                                        ({"sft_aggregation": "mean"}, "padded-mean, token-sum, token-mean"),
                                        ({"batch_size": 6, "micro_batch_size": 4}, "divisible")])
def test_bad_config(keys, match):
    with pytest.raises(config.ConfigError, match=match):
        build("rrhf", None, keys)


@pytest.mark.parametrize("mode", ["replace", "subtract", "none"])
def test_candidates_without_eos_are_penalised_as_in_ppo(tmp_path, mode):
    """A reward model scores a response cut at max_new_tokens as if it were whole: without PPO's no-<eos> penalty
    the ranking learns to never end (docs/rrhf.md)."""
    rm_dir = tmp_path / "rm"
    models.ScalarModel(models.load_lm("tiny-llama")).save(rm_dir)
    cfg = build("rrhf", None, {**RRHF_FAST, "samples": 3, "reward_model": str(rm_dir), "max_new_tokens": 3,
                               "no_eos_penalty": mode, "penalty_value": -2.5, "out": str(tmp_path / "out")})
    trainer = rrhf.RRHF(cfg)
    s = trainer.candidates(1, torch.Generator().manual_seed(0))
    assert s.has_eos.any() and not s.has_eos.all()  # 3 new tokens: some samples end, the demonstrations do
    got = trainer.score(s)
    cfg.no_eos_penalty = "none"
    raw = trainer.score(s)
    expected = {"replace": torch.where(s.has_eos, raw, torch.full_like(raw, -2.5)),
                "subtract": torch.where(s.has_eos, raw, raw - 2.5), "none": raw}[mode]
    assert torch.equal(got, expected)
