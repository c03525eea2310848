"""PPO loop properties: ratio exactly 1 on the first minibatch, resume equivalence, NaN stop
without overwriting, unreadable checkpoints named."""
import pytest
import torch

from rlhf_kernels.train import ppo
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.core.runlog import CheckpointError, Run, TrainingDiverged

from train_helpers import PPO_FAST, interrupt_then_resume, metrics


def make(tmp_path, name="run", **keys):
    return build("ppo", None, {**PPO_FAST, "out": str(tmp_path / name), **keys})


@pytest.mark.parametrize("keys", [{}, {"temperature": 0.7, "logprob_impl": "naive", "score_position": "eos+1"}])
def test_ratio_exactly_one_on_first_minibatch(tmp_path, keys):
    trainer = ppo.PPO(make(tmp_path, **keys))
    trainer.run = Run(trainer.cfg, "ppo")
    ex = trainer.make_experience(1, torch.Generator().manual_seed(3))
    s, mb = ex["samples"], ex["order"][:trainer.cfg.batch_size // trainer.cfg.minibatches]
    for micro in mb.split(trainer.cfg.micro_batch_size):
        logp = trainer.logprobs(trainer.policy, s, micro)  # with grad, as in the update
        assert logp.requires_grad
        ratio = torch.exp(logp - ex["old_logp"][micro])
        assert torch.equal(ratio[s.mask[micro]], torch.ones_like(ratio[s.mask[micro]]))
        assert torch.equal(trainer.values(s, micro), ex["values"][micro])
    # and the loop reports it: no deviation before the first optimizer step
    trainer.cfg.steps = 1
    out = trainer.train()
    assert metrics(tmp_path / "run")[0]["ratio_dev_first_minibatch"] == 0.0
    assert out["model"].endswith("model")


def test_resume_gives_the_same_metrics(tmp_path, monkeypatch):
    keys = {"steps": 3, "kl_target": 1.0}  # adaptive KL: its state must survive the restart too
    ppo.train(make(tmp_path, "straight", **keys))
    def two_steps_logged():
        assert len(metrics(tmp_path / "resumed")) == 2

    interrupt_then_resume(monkeypatch, ppo.PPO, 3, lambda: ppo.train(make(tmp_path, "resumed", **keys)),
                          between=two_steps_logged)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert len(a) == 3 and a == b
    assert (tmp_path / "resumed" / "curves.png").stat().st_size > 0


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = ppo.rk.ppo_policy_loss
    calls = {"n": 0}

    def nan_in_step_2(*args, **kw):
        loss, stats = real(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > per_step else loss), stats

    cfg = make(tmp_path, steps=3)
    per_step = cfg.epochs * cfg.batch_size // cfg.micro_batch_size
    monkeypatch.setattr(ppo.rk, "ppo_policy_loss", nan_in_step_2)
    ck = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(TrainingDiverged, match=r"step 2.*checkpoint\.pt \(step 1\)") as e:
        ppo.train(cfg)
    assert "policy_loss" in str(e.value)
    before = ck.read_bytes()
    assert torch.load(ck, weights_only=True)["step"] == 1
    assert not (tmp_path / "run" / "model").exists()
    with pytest.raises(TrainingDiverged):  # resuming repeats the failure and still writes nothing
        ppo.train(cfg)
    assert ck.read_bytes() == before
    assert len(metrics(tmp_path / "run")) == 1


def test_non_finite_state_is_never_saved(tmp_path):
    cfg = make(tmp_path)
    run = Run(cfg, "ppo")
    run.save(1, {"models": {"m": {"w": torch.ones(2)}}})
    before = run.checkpoint.read_bytes()
    with pytest.raises(TrainingDiverged, match="checkpoint.models.m.w"):
        run.save(2, {"models": {"m": {"w": torch.tensor([1.0, float("inf")])}}})
    assert run.checkpoint.read_bytes() == before


def test_unreadable_or_foreign_checkpoint(tmp_path):
    cfg = make(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        ppo.train(cfg)
    Run(cfg, "ppo").save(1, {"models": {}})
    with pytest.raises(CheckpointError, match="different settings.*lr"):
        Run(build("ppo", None, {**PPO_FAST, "out": cfg.out, "lr": 0.5}), "ppo").load()
    with pytest.raises(CheckpointError, match="'ppo' run, not 'dpo'"):
        Run(cfg, "dpo").load()
