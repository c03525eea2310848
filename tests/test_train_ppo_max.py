"""PPO-max (docs/algorithms.md §2): running moments, reward scaling and normalize-and-clip, minibatch
advantage whitening and clipping, critic pretraining, the PPO-ptx loss, the presets, and resume
equality with the new state."""
import json

import pytest
import torch
import torch.nn.functional as F

from rlhf_kernels.train import ppo, ppo_max
from rlhf_kernels.train.cli import main
from rlhf_kernels.train.core import config, models
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.core.runlog import Run
from rlhf_kernels.train.presets import PRESETS

from train_helpers import PPO_FAST, interrupt_then_resume, metrics


def make(tmp_path, name="run", **keys):
    return build("ppo", None, {**PPO_FAST, "out": str(tmp_path / name), **keys})


def test_running_moments_merge_equals_moments_of_the_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g, dtype=torch.float64) * 3 + 5 for n in (7, 1, 32, 2, 13)]
    rm = ppo_max.RunningMoments()
    for i, b in enumerate(batches):
        rm.update(b)
        seen = torch.cat(batches[:i + 1])
        assert rm.count == pytest.approx(len(seen), abs=1e-12)
        assert rm.mean == pytest.approx(float(seen.mean()), rel=1e-12)
        assert rm.var == pytest.approx(float(seen.var(unbiased=False)), rel=1e-12)
        if len(seen) > 1:
            assert rm.std == pytest.approx(float(seen.std(unbiased=True)), rel=1e-12)
    fresh = ppo_max.RunningMoments()
    fresh.load_state_dict(rm.state_dict())
    assert fresh.state_dict() == rm.state_dict()


def test_reward_scaling_and_normalize_by_hand():
    # batch 1: [1, 2, 3, 4]: μ = 2.5, unbiased σ² = 5/3
    s1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sd1 = (5 / 3) ** 0.5
    rm = ppo_max.RunningMoments()
    torch.testing.assert_close(ppo_max.normalize_score(s1, rm, "scale"), s1 / sd1)
    rm = ppo_max.RunningMoments()
    torch.testing.assert_close(ppo_max.normalize_score(s1, rm, "normalize"), (s1 - 2.5) / sd1)
    # batch 2: [10]; all seen [1, 2, 3, 4, 10]: μ = 4, σ² = (9 + 4 + 1 + 0 + 36) / 4 = 12.5
    out = ppo_max.normalize_score(torch.tensor([10.0]), rm, "normalize")
    torch.testing.assert_close(out, torch.tensor([6 / 12.5 ** 0.5]))
    assert (rm.mean, rm.std) == (pytest.approx(4.0), pytest.approx(12.5 ** 0.5))
    # "none" neither changes the score nor the moments
    assert ppo_max.normalize_score(s1, rm, "none") is s1 and rm.mean == pytest.approx(4.0)


def test_normalize_and_clip_in_the_trainer(tmp_path):
    """The rollout's score is clip((r − μ)/σ, ±score_clip) with the moments including this batch."""
    trainer = ppo.PPO(make(tmp_path, reward_norm="normalize", score_clip=0.5, kl_coef=0.0, no_eos_penalty="none"))
    seen = {}
    real = trainer.rewards

    def spy(score, *a):
        seen["score"] = score
        return real(score, *a)

    trainer.rewards = spy
    raw = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 2.0, -3.0])
    trainer.score = lambda s: raw
    ex = trainer.make_experience(1, torch.Generator().manual_seed(1))
    expected = ((raw.double() - raw.double().mean()) / raw.double().std()).clamp(-0.5, 0.5).float()
    torch.testing.assert_close(seen["score"], expected)
    assert ex["stats"]["reward_running_std"] == pytest.approx(float(raw.double().std()))


def test_minibatch_whitening_and_advantage_clip_by_hand():
    adv = torch.tensor([[1.0, 3.0, 0.0], [5.0, -7.0, 9.0], [2.0, 2.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    rows = torch.tensor([0, 2])
    cfg = build("ppo", None, {"advantage_whiten_level": "minibatch", "advantage_clip": "0.5"})
    out = ppo_max.minibatch_advantages(adv, rows, mask, cfg)
    # rows 0 and 2, valid values 1, 3, 2, 4: μ = 2.5, biased σ² = 1.25
    z = (torch.tensor([1.0, 3.0, 2.0, 4.0]) - 2.5) / (1.25 + 1e-8) ** 0.5
    zc = z.clamp(-0.5, 0.5)
    torch.testing.assert_close(out[0], torch.tensor([zc[0], zc[1], 0.0]))
    torch.testing.assert_close(out[2], torch.tensor([zc[2], 0.0, zc[3]]))
    assert torch.equal(out[1], adv[1])  # rows of other minibatches are untouched
    clip_only = build("ppo", None, {"advantage_clip": "2"})
    torch.testing.assert_close(ppo_max.minibatch_advantages(adv, rows, mask, clip_only)[rows], adv[rows].clamp(-2, 2))
    default = build("ppo", None, {})
    assert ppo_max.minibatch_advantages(adv, rows, mask, default) is adv  # the default path is untouched


def test_ptx_loss_equals_cross_entropy_float64():
    torch.manual_seed(0)
    policy = models.load_lm("tiny-llama").double()
    data = ppo_max.ptx_corpus(build("ppo", None, {"ptx_examples": "6"}))
    ids, attn = data.ids, data.attn
    nll, count = ppo_max.ptx_nll(policy, ids, attn)  # fused: rk.linear_logprobs
    logits = policy(input_ids=ids, attention_mask=attn).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    assert nll.dtype == torch.float64 and int(count) == int((targets != -100).sum())
    torch.testing.assert_close(nll / count, ref, rtol=1e-10, atol=1e-12)


def test_presets_effective_config_and_overrides(tmp_path):
    cfg = build("ppo", None, {"preset": "ppo-max"})
    for key, value in PRESETS["ppo-max"].items():
        assert getattr(cfg, key) == value, key
    assert cfg.preset == "ppo-max" and cfg.batch_size // cfg.minibatches == 32 and cfg.epochs == 1
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: 64\nminibatches: 2\n")
    cfg = build("ppo", f, {"preset": "ppo-max", "epochs": "2"})  # file and overrides beat the preset
    assert (cfg.batch_size, cfg.minibatches, cfg.epochs, cfg.reward_norm) == (64, 2, 2, "normalize")
    a2c = build("ppo", None, {"preset": "a2c"})
    assert (a2c.epochs, a2c.minibatches, a2c.whiten_advantages, a2c.lam, a2c.vf_clip, a2c.anneal_lr,
            a2c.optimizer, a2c.rmsprop_alpha, a2c.optimizer_eps) == (1, 1, False, 1.0, None, False, "rmsprop", 0.99, 1e-5)
    assert build("ppo", None, {}) == ppo.PPOConfig()  # no preset: the defaults stay
    with pytest.raises(config.ConfigError, match="unknown preset 'ppo-min'; valid presets: ppo-max, a2c"):
        build("ppo", None, {"preset": "ppo-min"})
    with pytest.raises(config.ConfigError, match="unknown key 'preset' for 'dpo'"):
        build("dpo", None, {"preset": "a2c"})
    with pytest.raises(config.ConfigError, match="critic_pretrain_steps must be in"):
        build("ppo", None, {"preset": "ppo-max", "steps": "3"})
    with pytest.raises(config.ConfigError, match="reward_norm"):
        build("ppo", None, {"reward_norm": "whiten"})


def test_critic_pretraining_updates_only_the_critic(tmp_path):
    trainer = ppo.PPO(make(tmp_path, critic_pretrain_steps=1, ptx_coef=0.5, ptx_batch_size=4, steps=3))
    trainer.run = Run(trainer.cfg, "ppo")
    actor0 = [p.detach().clone() for p in trainer.policy.parameters()]
    critic0 = [p.detach().clone() for p in trainer.critic.parameters()]
    m1, _ = trainer.step(1)
    assert all(torch.equal(a, p) for a, p in zip(actor0, trainer.policy.parameters()))
    assert not all(torch.equal(c, p) for c, p in zip(critic0, trainer.critic.parameters()))
    assert m1["critic_only"] == 1.0 and "ptx_loss" not in m1
    m2, _ = trainer.step(2)
    assert not all(torch.equal(a, p) for a, p in zip(actor0, trainer.policy.parameters()))
    assert m2["critic_only"] == 0.0 and m2["ptx_loss"] > 0


def test_preset_ppo_max_runs_from_the_cli(tmp_path):
    keys = {**PPO_FAST, "steps": 3, "batch_size": 8, "minibatches": 2, "micro_batch_size": 4, "epochs": 1,
            "critic_pretrain_steps": 1, "ptx_batch_size": 4, "ptx_examples": 64}
    assert main(["train", "ppo", "--preset", "ppo-max", *[f"--{k}={v}" for k, v in keys.items()],
                 "--out", str(tmp_path / "run")]) == 0
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["critic_only"] for r in rows] == [1.0, 0.0, 0.0]
    assert all("reward_running_mean" in r for r in rows) and "ptx_loss" in rows[-1]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["preset"] == "ppo-max" and saved["reward_norm"] == "normalize" and saved["minibatches"] == 2
    assert "reward_moments" in torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["models"]


def test_resume_gives_the_same_metrics_with_running_moments_ptx_and_ref_ema(tmp_path, monkeypatch):
    keys = {"steps": 3, "reward_norm": "scale", "ptx_coef": 0.2, "ptx_batch_size": 4, "ptx_examples": 64,
            "ref_ema": 0.5, "advantage_whiten_level": "minibatch", "advantage_clip": 1.0}
    ppo.train(make(tmp_path, "straight", **keys))
    interrupt_then_resume(monkeypatch, ppo.PPO, 3, lambda: ppo.train(make(tmp_path, "resumed", **keys)))
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert len(a) == 3 and a == b
    assert a[-1]["reward_running_std"] > 0 and a[-1]["ptx_loss"] > 0
    ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert ck["models"]["reward_moments"]["count"] == pytest.approx(3 * PPO_FAST["batch_size"])
    assert "ref" in ck["models"]
