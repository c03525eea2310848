"""Resuming RM, DPO and RTO after an interruption gives the metrics and the final weights of an
uninterrupted run, bit for bit. (SFT's is tests/test_train_kill.py: killed with SIGKILL at four
points and resumed, metrics, result and weights compared; PPO, PPO-max, LoRA, RRHF and CartPole have
theirs in their own files.)"""
import torch

from rlhf_kernels.train import dpo, rm, rto
from rlhf_kernels.train.core import models
from rlhf_kernels.train.core.commands import build

from train_helpers import FAST, PPO_FAST, interrupt_then_resume, metrics, same_weights


def straight_and_resumed(tmp_path, monkeypatch, kind, train, keys, trainer_cls=None, at=2):
    """Metrics and model directories of a straight run and of one interrupted at step `at`, then resumed."""
    def run(name):
        return lambda: train(build(kind, None, {**keys, "out": str(tmp_path / name)}))

    def logged_until_the_interruption():
        assert len(metrics(tmp_path / "resumed")) == at - 1

    run("straight")()
    interrupt_then_resume(monkeypatch, trainer_cls, at, run("resumed"), between=logged_until_the_interruption)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert len(a) == keys["steps"] and a == b
    return tmp_path / "straight", tmp_path / "resumed"


def test_rm_resume_gives_the_same_metrics_and_weights(tmp_path, monkeypatch):
    keys = {**FAST, "steps": 2, "batch_size": 8, "micro_batch_size": 4, "pairs": 32}
    a, b = straight_and_resumed(tmp_path, monkeypatch, "rm", rm.train, keys)
    assert same_weights(a / "model", b / "model")


def test_dpo_resume_gives_the_same_metrics_and_weights(tmp_path, monkeypatch):
    keys = {**FAST, "steps": 2, "batch_size": 8, "micro_batch_size": 4, "pairs": 32}
    a, b = straight_and_resumed(tmp_path, monkeypatch, "dpo", dpo.train, keys)
    assert same_weights(a / "model", b / "model")


def test_rto_resume_gives_the_same_metrics_and_weights(tmp_path, monkeypatch):
    torch.manual_seed(1)  # a "DPO policy" unlike the initial policy, so the dense reward is not 0
    models.save_lm(models.load_lm("tiny-llama"), tmp_path / "dpo")
    keys = {**PPO_FAST, "steps": 2, "dpo_model": str(tmp_path / "dpo"), "kl_target": 1.0}
    a, b = straight_and_resumed(tmp_path, monkeypatch, "rto", rto.train, keys, trainer_cls=rto.RTO)
    assert metrics(a)[0]["dpo_logratio"] != 0.0
    assert same_weights(a / "model", b / "model") and same_weights(a / "critic", b / "critic")
