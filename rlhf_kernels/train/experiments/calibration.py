"""PPO vs PPO-C vs PPO-M on the confidence task (docs/algorithms.md §8), with the shipped defaults:

    rlhf-kernels experiment calibration [--out runs/calibration] [--seed 0] [--full=true]

SFT → reward model → calibrated reward model (from that RM) → PPO, PPO-C (same RM) and PPO-M (the
calibrated RM), all from the same SFT policy; then the gold reward and calibration of each final
policy on 512 held-out prompts (summary.json, a markdown table on stdout). Rerunning the command
resumes every stage from its checkpoint.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ppo, rm, sft
from ..core.commands import Command
from ..core.models import load_lm
from ..core.run_config import run_key
from ..decode import rollout
from ..tasks import confidence

FINAL_EVAL_PROMPTS = 512
POLICIES = ("sft", "ppo", "ppo_c", "ppo_m")
# shorter than the trainers' defaults (SFT 200, RM 100, PPO 30 steps) so that the six stages fit in
# a few minutes of CPU; `--full=true` uses the defaults
SHORT = {"sft": {"steps": 100}, "rm": {"steps": 50}, "crm": {"steps": 50}, "ppo": {"steps": 20}}


def run(out="runs/calibration", seed=0, progress=True, full=False):
    out = Path(out)
    common = {"seed": seed, "progress": progress, "task": "confidence"}
    short = {} if full else SHORT
    stages = {}

    def stage(name, kind, module, **keys):
        t = time.perf_counter()
        cfg = module.COMMAND.build(overrides={**common, **keys, "out": str(out / name)})
        print(f"== {name}: rlhf-kernels train {kind} " + " ".join(f"--{k}={v}" for k, v in {**common, **keys}.items()
                                                              if k != "progress"), flush=True)
        stages[name] = (cfg, module.train(cfg), time.perf_counter() - t)
        return stages[name][1]["model"]

    sft_model = stage("sft", "sft", sft, **short.get("sft", {}))
    rm_model = stage("rm", "rm", rm, model=sft_model, **short.get("rm", {}))
    crm_model = stage("crm", "rm", rm, model=rm_model, calibrated=True, **short.get("crm", {}))
    ppo_keys = short.get("ppo", {})
    stage("ppo", "ppo", ppo, policy=sft_model, reward_model=rm_model, **ppo_keys)
    stage("ppo_c", "ppo", ppo, policy=sft_model, reward_model=rm_model, ppo_c=True, **ppo_keys)
    stage("ppo_m", "ppo", ppo, policy=sft_model, reward_model=crm_model, **ppo_keys)

    summary = {"rm": {"eval_accuracy": stages["rm"][1]["eval_accuracy"]},
               "crm": {k: stages["crm"][1][k] for k in ("eval_accuracy", "eval_confidence_accuracy")}}
    for name in POLICIES:
        cfg, result, wall = stages[name]
        torch.manual_seed(seed)
        summary[name] = {**rollout.evaluate_cfg(load_lm(result["model"], vocab_size=len(confidence.WORDS)), cfg,
                                                n=FINAL_EVAL_PROMPTS), "wall_s": round(wall, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))
    return summary


def table(summary):
    lines = [f"on {FINAL_EVAL_PROMPTS} held-out prompts; RM held-out accuracy {summary['rm']['eval_accuracy']:.3f}, "
             f"calibrated RM {summary['crm']['eval_accuracy']:.3f} (confidence accuracy "
             f"{summary['crm']['eval_confidence_accuracy']:.3f})", "",
             "| policy | gold reward | ECE | Brier | mean ĉ | corr(ĉ, gold) | no conf | no `<eos>` | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in POLICIES:
        s = summary[name]
        lines.append(f"| {name} | {s['gold_reward']:.3f} | {s['ece']:.3f} | {s['brier']:.3f} | {s['confidence']:.3f} | "
                     f"{s['conf_corr']:+.3f} | {s['conf_missing']:.3f} | {s['no_eos']:.3f} | {s['wall_s']:.0f} |")
    return "\n".join(lines)


@dataclass
class CalibrationExperimentConfig:
    out: str = run_key("runs/calibration", "directory of the six stages and summary.json")
    seed: int = run_key(0, "seed of every stage")
    progress: bool = run_key(True, "show progress bars")
    full: bool = run_key(False, "the trainers' default lengths instead of the short ones")

    def check(self):
        pass


COMMAND = Command("experiment calibration", CalibrationExperimentConfig,
                  lambda cfg: run(cfg.out, seed=cfg.seed, progress=cfg.progress, full=cfg.full),
                  "PPO vs PPO-C vs PPO-M on the confidence task")
