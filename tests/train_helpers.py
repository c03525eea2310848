"""Shared settings for the trainer tests: tiny batches so each run takes a second or two."""
import json

FAST = {"progress": False, "eval_prompts": 8, "max_new_tokens": 6, "save_every": 1, "eval_every": 2}
PPO_FAST = {**FAST, "batch_size": 8, "minibatches": 2, "micro_batch_size": 2, "epochs": 2, "steps": 2}
TIMING = {"tokens_per_s", "step_time_s", "peak_mem_mb"}


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
