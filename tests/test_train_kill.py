"""`kill -9` is harmless: a real training subprocess is SIGKILLed at several points (inside an
optimizer step, halfway through writing a checkpoint, halfway through a metrics line, and from
outside at an arbitrary moment), resumed after each kill in the same directory, and must end with the
metrics and weights of an uninterrupted run. (The runs without a kill happen in this process, with
the same number of threads as the subprocesses, to save two interpreter start-ups.)"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhf_kernels.train.cli import main

from train_helpers import metrics

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["train", "sft", "--steps=8", "--save_every=2", "--eval_every=4", "--eval_prompts=8", "--max_new_tokens=6",
        "--examples=64", "--batch_size=8", "--micro_batch_size=4", "--progress=false"]

# Runs the CLI in this process after arranging for it to SIGKILL itself at one exact point.
KILLER = r"""
import io, json, os, signal, sys
point, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]

def due():
    calls[0] += 1
    return calls[0] == at

def die():
    os.kill(os.getpid(), signal.SIGKILL)

import torch
from rlhf_kernels.train.core import runlog
if point == "step":  # the at-th optimizer step: gradients computed, weights not yet updated
    adamw_step = torch.optim.AdamW.step
    def step(self, *a, **k):
        if due():
            die()
        return adamw_step(self, *a, **k)
    torch.optim.AdamW.step = step
elif point == "checkpoint":  # the at-th checkpoint: half of its bytes written to the temporary file
    save = torch.save
    def half_save(obj, f, *a, **k):
        if str(f).endswith(".tmp") and due():
            buf = io.BytesIO()
            save(obj, buf)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            die()
        return save(obj, f, *a, **k)
    runlog.torch.save = half_save
elif point == "metrics":  # the at-th metrics row: half of its line written
    def half_log(self, row):
        if due():
            line = json.dumps(row) + "\n"
            with open(self.metrics, "a") as f:
                f.write(line[:len(line) // 2])
            die()
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
    runlog.Run.log = half_log
from rlhf_kernels.__main__ import main
sys.exit(main(argv))
"""


def launch(out, point="none", at=0):
    """The CLI in a subprocess, killing itself at the at-th `point` ("none": only a kill from outside)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-c", KILLER, point, str(at), *ARGS, f"--out={out}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def killed(out, point, at):
    p = launch(out, point, at)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, f"{point}: expected a SIGKILL, got exit {p.returncode}\n{err}"


def checkpoint_step(out):
    return int(torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"])


def killed_from_outside(out, after_rows):
    """SIGKILL the run from outside once `after_rows` complete metrics rows exist."""
    p = launch(out)
    path = out / "metrics.jsonl"
    while p.poll() is None:
        if path.exists() and path.read_text().count("\n") >= after_rows:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_kill_9_at_any_point_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*ARGS, f"--out={straight}"]) == 0

    killed(resumed, "step", 3)                 # inside step 3; the checkpoint is step 2's
    assert checkpoint_step(resumed) == 2 and len(metrics(resumed)) == 2
    killed(resumed, "checkpoint", 2)           # resumed at 2, killed halfway through step 6's checkpoint
    assert checkpoint_step(resumed) == 4 and (resumed / "checkpoint.pt.tmp").exists()
    killed(resumed, "metrics", 2)              # resumed at 4, killed halfway through step 6's row
    assert not (resumed / "metrics.jsonl").read_text().endswith("\n")
    killed_from_outside(resumed, 7)            # resumed at 4, killed at some point after step 7's row
    assert main([*ARGS, f"--out={resumed}"]) == 0

    assert metrics(resumed) == metrics(straight) and len(metrics(straight)) == 8
    result = [json.loads((d / "result.json").read_text()) for d in (straight, resumed)]
    assert [{k: v for k, v in r.items() if k != "model"} for r in result] == \
        [{k: v for k, v in result[0].items() if k != "model"}] * 2
    from safetensors.torch import load_file
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
