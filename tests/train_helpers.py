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
    second call resumes from the checkpoint the first one left."""
    import pytest

    original = trainer_cls.step

    def crash(self, s):
        if s == step:
            raise KeyboardInterrupt
        return original(self, s)

    monkeypatch.setattr(trainer_cls, "step", crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    if between is not None:
        between()
    monkeypatch.setattr(trainer_cls, "step", original)
    return run()
