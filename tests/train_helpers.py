"""Shared settings for the trainer tests: tiny batches so each run takes a second or two."""
import json

FAST = {"progress": False, "eval_prompts": 8, "max_new_tokens": 6, "save_every": 1, "eval_every": 2}
PPO_FAST = {**FAST, "batch_size": 8, "minibatches": 2, "micro_batch_size": 2, "epochs": 2, "steps": 2}
TIMING = {"tokens_per_s", "step_time_s", "peak_mem_mb"}


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def interrupt_then_resume(monkeypatch, trainer_cls, step, run, between=None):
    """Call `run()` with `trainer_cls.step` interrupted at `step` (as a crash or Ctrl-C would), then
    (after `between()`, for checks of what the interrupted run left) `run()` again normally: the
    second call resumes from the checkpoint the first one left. Trainers whose step is a function
    inside `train` (SFT, RM, DPO) pass `trainer_cls=None`: the shared step loop is interrupted at the
    start of `step` instead (runlog.set_lr, its first call of a step)."""
    import pytest

    from rlhf_kernels.train.core import runlog

    owner, name = (trainer_cls, "step") if trainer_cls is not None else (runlog, "set_lr")
    original = getattr(owner, name)

    def crash(*args):
        if args[-1] == step:  # Trainer.step(self, s) and set_lr(optimizer, cfg, s) both end with the step
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(owner, name, crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    if between is not None:
        between()
    monkeypatch.setattr(owner, name, original)
    return run()


def same_weights(a, b):
    """True if the saved models in directories `a` and `b` hold the same tensors, bit for bit (every
    *.safetensors file, e.g. an LM and a reward model's scalar head)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    files = sorted(p.name for p in Path(a).glob("*.safetensors"))
    if not files or files != sorted(p.name for p in Path(b).glob("*.safetensors")):
        return False
    for f in files:
        x, y = load_file(Path(a, f)), load_file(Path(b, f))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True
