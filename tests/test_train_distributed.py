"""The trainer under torchrun: 2 processes on CPU (gloo) against 1 process (docs/distributed.md).

Two launches of `python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py`:
one runs SFT (DDP, FSDP2, and DDP with the head sharded by `--tp_head`; with an uneven split also
interrupted and resumed), DPO (DDP) and PPO (DDP, and with `--tp_head`; FSDP2 interrupted and resumed) one after the
other in the same process group; the other has rank 1 fail mid-run. The single-process references
run here, in-process.

What "the same update" means here: each run starts from the same seeded tiny model, so the update
is Δ = w_final − w_init. 2 ranks × B/2 and 1 rank × B must give the same Δ to 1e-6 relative (norm),
and the same first-step metrics to 1e-6. The order of the float sums differs (each rank sums its
rows, then the ranks are summed), so bitwise equality is not expected; later steps compound that
rounding through Adam, and metrics that are differences of close numbers (KL, DPO rewards) then
differ at the 1e-5 level, hence 1e-4 for them. SFT and DPO split each step's drawn rows across the
ranks. PPO's rollouts are sampled per rank with per-rank seeds in real runs, which cannot equal a
single process's draws; the worker's `fixed_rollouts` samples the job's batch with the single-process
seed on every rank and keeps each rank's rows, so the comparison covers everything after sampling:
old/reference log-probs, values, rewards, GAE, the whitening over the job's batch, the global token
counts of the policy and value losses, and the gradient sync. minibatches=1 makes each minibatch
the job's whole batch (with more, each rank shuffles its own rows, equal only in distribution).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_kernels.train import cli
from rlhf_kernels.train.core import models, tp_head
from rlhf_kernels.train.core.config import ConfigError

from train_helpers import metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
COMMON = ["--progress", "false", "--eval_prompts", "8", "--max_new_tokens", "6", "--save_every", "1",
          "--eval_every", "100", "--micro_batch_size", "2"]
ARGS = {"sft": ["train", "sft", "--examples", "64", "--batch_size", "8", "--steps", "2", *COMMON],
        "dpo": ["train", "dpo", "--pairs", "64", "--batch_size", "8", "--steps", "2", *COMMON],
        "ppo": ["train", "ppo", "--batch_size", "8", "--minibatches", "1", "--epochs", "2", "--steps", "1", *COMMON]}
TP = ["--tp_head", "true"]
UNEVEN = ["--task", "confidence"]  # a vocabulary of 51 tokens: head shards of 26 and 25 rows
PPO_RESUME = ["train", "ppo", "--fsdp", "true", "--batch_size", "8", "--minibatches", "2", "--epochs", "1",
              "--steps", "2", *COMMON]


def torchrun(jobs, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           str(WORKER), json.dumps(jobs)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    out = lambda name: ["--out", str(d / name)]  # noqa: E731
    jobs = [{"argv": ARGS["sft"] + out("sft_ddp")},
            {"argv": ARGS["sft"] + ["--fsdp", "true"] + out("sft_fsdp")},
            {"argv": ARGS["dpo"] + out("dpo_ddp")},
            {"argv": ARGS["ppo"] + out("ppo_ddp"), "fixed_rollouts": True},
            {"argv": PPO_RESUME + out("ppo_fsdp")},
            {"argv": PPO_RESUME + out("ppo_fsdp_resumed"), "crash_at": 2},
            {"argv": PPO_RESUME + out("ppo_fsdp_resumed")},
            {"argv": ARGS["sft"] + TP + out("sft_tp")},
            {"argv": ARGS["sft"] + TP + UNEVEN + out("sft_tp_uneven")},
            {"argv": ARGS["sft"] + TP + UNEVEN + out("sft_tp_uneven_resumed"), "crash_at": 2},
            {"argv": ARGS["sft"] + TP + UNEVEN + out("sft_tp_uneven_resumed")},
            {"argv": ARGS["ppo"] + TP + out("ppo_tp"), "fixed_rollouts": True}]
    p, _ = torchrun(jobs)
    assert p.returncode == 0, p.stderr[-4000:]
    for kind in ("sft", "dpo", "ppo"):  # the single-process references
        assert cli.main(ARGS[kind] + out(f"{kind}_single")) == 0
    assert cli.main(ARGS["sft"] + UNEVEN + out("sft_uneven_single")) == 0
    return d, p.stdout


def update(run_dir):
    """Δ = final − initial weights of the run's policy, as one float64 vector."""
    torch.manual_seed(0)  # every trainer seeds before building its policy
    vocab = json.loads((run_dir / "config.json").read_text()).get("task") == "confidence" and 51 or 40
    init = models.load_lm("tiny-llama", vocab_size=vocab).state_dict()
    final = load_file(str(run_dir / "model" / "model.safetensors"))
    assert final.keys() == init.keys()
    return torch.cat([(final[k].double() - init[k].double()).flatten() for k in sorted(final)])


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-3)


def assert_same_training(single, parallel, update_rel=1e-6):
    ra, rb = metrics(single), metrics(parallel)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra[0].keys() == rb[0].keys()
    for i, (a, b) in enumerate(zip(ra, rb)):
        rel = 1e-6 if i == 0 else 1e-4
        bad = {k: (a[k], b[k]) for k in a if not close(a[k], b[k], rel)}
        assert not bad, f"step {a['step']}: {bad}"
    da, db = update(single), update(parallel)
    assert da.norm() > 0.05  # the run did move the weights
    assert (db - da).norm() / da.norm() < update_rel


@pytest.mark.parametrize("kind", ["sft", "dpo", "ppo"])
def test_two_ranks_give_the_update_of_one(runs, kind):
    d, _ = runs
    assert_same_training(d / f"{kind}_single", d / f"{kind}_ddp")


def test_fsdp_gives_the_update_of_one_rank(runs):
    d, _ = runs
    assert_same_training(d / "sft_single", d / "sft_fsdp")
    ck = torch.load(d / "sft_fsdp" / "checkpoint.pt", weights_only=True)  # full (gathered) state dicts
    assert ck["models"]["policy"].keys() == models.load_lm("tiny-llama").state_dict().keys()


@pytest.mark.parametrize("kind", ["sft", "ppo"])
def test_tp_head_gives_the_update_of_one_rank(runs, kind):
    d, _ = runs
    assert_same_training(d / f"{kind}_single", d / f"{kind}_tp")
    assert_same_training(d / f"{kind}_ddp", d / f"{kind}_tp")
    assert json.loads((d / f"{kind}_tp" / "config.json").read_text())["tp_head"] is True


def test_tp_head_saves_and_resumes_the_whole_head(runs):
    d, _ = runs
    # V = 51: shards of 26 and 25 rows. First-step metrics agree to 1e-6 (loss and grad norm to ~1e-7), but
    # after the 2 AdamW steps this task's Δ was measured 1.2e-6 from one process's (2e-7 with plain DDP): the
    # vocabulary-parallel op rounds differently (its partial sums, its correction of rows owned elsewhere).
    assert_same_training(d / "sft_uneven_single", d / "sft_tp_uneven", update_rel=3e-6)
    saved = load_file(str(d / "sft_tp_uneven" / "model" / "model.safetensors"))
    assert saved["lm_head.weight"].shape == (51, 64)  # gathered from both ranks' shards
    ck = torch.load(d / "sft_tp_uneven" / "checkpoint.pt", weights_only=True)
    assert torch.equal(ck["models"]["policy"]["lm_head.weight"], saved["lm_head.weight"])
    # the single-process format: every parameter's AdamW state (the head's moments whole) of one process's shapes
    one = torch.load(d / "sft_uneven_single" / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    shapes = lambda state: {i: {k: v.shape for k, v in st.items()} for i, st in state.items()}  # noqa: E731
    assert shapes(ck["optimizer"]["state"]) == shapes(one)
    # a resume loads each rank's rows of the whole head and of its moments: the uninterrupted run
    assert metrics(d / "sft_tp_uneven") == metrics(d / "sft_tp_uneven_resumed")
    a, b = (load_file(str(d / n / "model" / "model.safetensors")) for n in ("sft_tp_uneven", "sft_tp_uneven_resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tp_head_refuses_what_it_does_not_compose_with(capsys, tmp_path):
    for extra, what in ((["--fsdp=true"], "fsdp=true"), (["--lora_r=4"], "lora_r > 0"),
                        (["--logprob_impl=naive"], "logprob_impl=naive")):
        assert cli.main(["train", "sft", "--tp_head=true", *extra, "--out", str(tmp_path / "x")]) == 2
        assert f"tp_head=true with {what}" in capsys.readouterr().err
    assert cli.main(["train", "ppo", "--tp_head=true", "--top_k=5", "--out", str(tmp_path / "ppo")]) == 2
    assert "tp_head=true with top_k/top_p" in capsys.readouterr().err
    assert cli.main(["train", "rm", "--tp_head=true", "--out", str(tmp_path / "rm")]) == 2
    assert "a reward model has no LM head in its loss" in capsys.readouterr().err
    tp_head.check_untied(models.load_lm("tiny-llama"))
    with pytest.raises(ConfigError, match="tied to its input embedding"):
        tp_head.check_untied(models.load_lm("tiny-gpt2"))
    assert [tp_head.split(40, 3), tp_head.split(40, 2)] == [[(0, 14), (14, 13), (27, 13)], [(0, 20), (20, 20)]]


def test_rank_zero_alone_writes_and_records_the_world(runs):
    d, stdout = runs
    for name, mode in (("sft_ddp", "ddp"), ("sft_fsdp", "fsdp"), ("ppo_fsdp", "fsdp")):
        config = json.loads((d / name / "config.json").read_text())
        result = json.loads((d / name / "result.json").read_text())
        assert (config["world_size"], config["parallel"]) == (result["world_size"], result["parallel"]) == (2, mode)
        steps = config["steps"]
        assert [r["step"] for r in metrics(d / name)] == list(range(1, steps + 1))  # one writer: no duplicate rows
        assert stdout.count(f'"model": "{d / name / "model"}"') == 1  # the result is printed once
    single = json.loads((d / "sft_single" / "config.json").read_text())
    assert (single["world_size"], single["parallel"]) == (1, "none")
    assert "world_size" not in json.loads((d / "sft_single" / "result.json").read_text())


def test_resume_under_torchrun_gives_the_uninterrupted_metrics(runs):
    d, _ = runs
    straight, resumed = metrics(d / "ppo_fsdp"), metrics(d / "ppo_fsdp_resumed")
    assert [r["step"] for r in resumed] == [1, 2]
    assert straight == resumed
    a, b = (load_file(str(d / n / "model" / "model.safetensors")) for n in ("ppo_fsdp", "ppo_fsdp_resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_rank_stops_the_job_with_its_error(tmp_path):
    # rank 0 goes on into step 2's all-reduce; the job must end well before that collective's timeout
    argv = ARGS["sft"] + ["--steps", "3", "--dist_timeout_s", "900", "--out", str(tmp_path / "run")]
    p, elapsed = torchrun([{"argv": argv, "fail_rank": 1, "fail_at": 2}], timeout=300)
    assert p.returncode != 0 and elapsed < 300
    assert "rank 1 failed on purpose" in p.stderr
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1]


def test_commands_that_do_not_run_data_parallel_refuse_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before any process group exists
    assert cli.main(["train", "rrhf", "--out", str(tmp_path / "rrhf")]) == 2
    assert "train rrhf does not run data-parallel" in capsys.readouterr().err
    assert not (tmp_path / "rrhf").exists()
    monkeypatch.delenv("WORLD_SIZE")
    assert cli.main(["train", "sft", "--fsdp=true", "--lora_r=4", "--out", str(tmp_path / "sft")]) == 2
    assert "lora_r > 0 with fsdp=true" in capsys.readouterr().err
