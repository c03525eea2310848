"""Learning checks: on the embedded task, PPO, RTO, DPO and RRHF raise the mean gold reward of a briefly
fine-tuned SFT policy by a stated margin within a few steps, and PPO's KL penalty pulls the policy
towards its reference. Each fails with a planted trainer bug (.ci/mutants.py plants them): a flipped
reward sign, the policy and reference log-probs swapped in the KL penalty, chosen and rejected swapped
in DPO, negated advantages.

Every run is seeded (seed 0), so each test is deterministic on one machine. Each margin is stated
against the spread of the measured quantity over several seeds (listed at each test; 2-core development
machine, 2026-12-07), about half the lowest of them, so that another seed, thread count or BLAS does not
flip it, while the planted bugs move it the other way."""
import pytest
import torch

from rlhf_kernels.train import dpo, ppo, rrhf, rto, sft
from rlhf_kernels.train.core import models
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.decode import rollout

from train_helpers import metrics

# the gold reward is measured on the same 128 held-out prompts and sampling seed before and after
BASE = {"progress": False, "eval_prompts": 128, "max_new_tokens": 10, "eval_every": 1000, "save_every": 1000,
        "seed": 0}
PPO_KEYS = {**BASE, "steps": 4, "batch_size": 32, "minibatches": 2, "micro_batch_size": 16, "epochs": 2, "lr": 3e-3}


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    """100 SFT steps: a policy that ends its sentences (gold reward 0.29, no <eos> in 1% of its samples)."""
    out = tmp_path_factory.mktemp("sft")
    sft.train(build("sft", None, {**BASE, "steps": 100, "batch_size": 32, "micro_batch_size": 32, "examples": 512,
                                  "lr": 3e-3, "out": str(out)}))
    return str(out / "model")


def gain(train, kind, sft_policy, out, **keys):
    """Gold reward after training minus before, on the same evaluation prompts and sampling seed."""
    cfg = build(kind, None, {**BASE, "policy": sft_policy, "out": str(out), **keys})
    before = rollout.evaluate_cfg(models.load_lm(sft_policy), cfg)["gold_reward"]
    return train(cfg)["gold_reward"] - before


def test_ppo_raises_the_gold_reward(sft_policy, tmp_path):
    # 4 iterations; gain over seeds 0..3: 0.240, 0.333, 0.231, 0.327
    assert gain(ppo.train, "ppo", sft_policy, tmp_path, **PPO_KEYS) > 0.12


@pytest.fixture(scope="module")
def dpo_run(sft_policy, tmp_path_factory):
    """(gain, model dir) of 10 DPO steps; the model is also RTO's DPO policy."""
    out = tmp_path_factory.mktemp("dpo")
    keys = {"steps": 10, "batch_size": 32, "micro_batch_size": 32, "pairs": 256, "lr": 1e-3, "beta": 0.3}
    return gain(dpo.train, "dpo", sft_policy, out, **keys), str(out / "model")


def test_dpo_raises_the_gold_reward(dpo_run):
    # gain over seeds 0..3: 0.129, 0.156, 0.070, 0.178 (DPO drifts off the data: more responses without <eos>)
    assert dpo_run[0] > 0.04


def test_rto_raises_the_gold_reward(sft_policy, dpo_run, tmp_path):
    # 4 iterations; gain over seeds 0..3: 0.169, 0.358, 0.305, 0.274
    assert gain(rto.train, "rto", sft_policy, tmp_path, dpo_model=dpo_run[1], **PPO_KEYS) > 0.08


def test_rrhf_raises_the_gold_reward(sft_policy, tmp_path):
    # 8 steps; gain over seeds 0..2: 0.141, 0.146, 0.178
    keys = {"steps": 8, "batch_size": 16, "micro_batch_size": 8, "samples": 4, "demonstrations": 1, "lr": 3e-3}
    assert gain(rrhf.train, "rrhf", sft_policy, tmp_path, **keys) > 0.07


def test_ppo_kl_penalty_pulls_towards_the_reference(sft_policy, tmp_path, monkeypatch):
    """With the score taken away the per-token reward is the KL penalty alone, so PPO must shrink the
    KL to a reference the policy starts far from (an untrained model): the sequence-summed k1 of the
    third iteration's samples is below the first's by a margin. Drop over seeds 0..2: 0.94, 0.88, 1.29
    (measured under a 4-iteration LR schedule); with the log-probs swapped in the penalty the KL rises
    instead (by 1.9, 1.9, 2.6)."""
    torch.manual_seed(0)
    models.save_lm(models.load_lm("tiny-llama"), tmp_path / "ref")
    monkeypatch.setattr(ppo.PPO, "score", lambda self, s: torch.zeros(len(s.prompts)))
    cfg = build("ppo", None, {**PPO_KEYS, "steps": 3, "policy": sft_policy, "ref": str(tmp_path / "ref"),
                              "kl_coef": 0.1, "no_eos_penalty": "none", "out": str(tmp_path / "run")})
    ppo.train(cfg)
    kl = [r["kl"] for r in metrics(tmp_path / "run")]
    assert kl[-1] < kl[0] - 0.4, kl
