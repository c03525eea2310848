"""Every CLI subcommand runs a couple of steps on tiny Llama and GPT-2 models, chained as in the demo."""
import json

import pytest
import torch

from rlhf_kernels.train.cli import main

from train_helpers import FAST, PPO_FAST


def opts(d):
    return [f"--{k}={v}" for k, v in d.items()]


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_pipeline(tmp_path, arch, capsys):
    small = {**FAST, "steps": 2, "batch_size": 4, "micro_batch_size": 2}
    assert main(["train", "sft", *opts({**small, "model": arch, "examples": 16}), "--out", str(tmp_path / "sft")]) == 0
    sft = str(tmp_path / "sft" / "model")
    assert main(["train", "rm", *opts({**small, "model": sft, "pairs": 16}), "--out", str(tmp_path / "rm")]) == 0
    rm = str(tmp_path / "rm" / "model")
    assert main(["train", "dpo", *opts({**small, "policy": sft, "pairs": 16}), "--out", str(tmp_path / "dpo")]) == 0
    ppo_keys = {**PPO_FAST, "policy": sft, "reward_model": rm, "critic_init": "policy", "dual_clip": 3}
    assert main(["train", "ppo", *opts(ppo_keys), "--out", str(tmp_path / "ppo")]) == 0
    rto_keys = {**PPO_FAST, "policy": sft, "reward_model": rm, "dpo_model": str(tmp_path / "dpo" / "model")}
    assert main(["train", "rto", *opts(rto_keys), "--out", str(tmp_path / "rto")]) == 0
    grpo_keys = {**FAST, "steps": 2, "batch_size": 2, "group_size": 4, "micro_batch_size": 4, "policy": sft,
                 "reward_model": rm, "no_eos_penalty": "replace"}
    assert main(["train", "grpo", *opts(grpo_keys), "--out", str(tmp_path / "grpo")]) == 0
    for stage in ("sft", "rm", "dpo", "ppo", "rto", "grpo"):
        d = tmp_path / stage
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert {"lr", "tokens_per_s", "peak_mem_mb"} <= set(rows[-1])
        assert (d / "curves.png").stat().st_size > 0 and (d / "checkpoint.pt").exists()
        assert torch.load(d / "checkpoint.pt", weights_only=True)["step"] == 2
    ppo_row = json.loads((tmp_path / "rto" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("gold_reward", "score", "kl", "entropy", "clipfrac", "approx_kl", "pg_loss", "vf_loss",
                "dpo_logratio", "eval_gold_reward"):
        assert key in ppo_row
    assert '"gold_reward"' in capsys.readouterr().out
