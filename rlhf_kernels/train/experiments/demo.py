"""`rlhf-kernels demo`: SFT → reward model → PPO, DPO, RTO and GRPO on the embedded task with the shipped
defaults; prints the mean gold reward per stage, writes summary.json and reward_curves.png."""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dpo, grpo, ppo, rm, rto, sft
from ..core.commands import Command
from ..core.models import load_lm
from ..core.plots import plot_rewards
from ..core.run_config import run_key
from ..core.runlog import Run
from ..decode import rollout

FINAL_EVAL_PROMPTS = 512
STAGES = ("sft", "ppo", "dpo", "rto", "grpo")  # the policies of the table, in its order


def run_demo(out="runs/demo", seed=0, progress=True):
    out = Path(out)
    common = {"seed": seed, "progress": progress}
    t0 = time.perf_counter()
    stages, times = {}, {}

    def stage(name, kind, module, **keys):
        t = time.perf_counter()
        cfg = module.COMMAND.build(overrides={**common, **keys, "out": str(out / name)})
        print(f"== {name}: rlhf-kernels train {kind} " + " ".join(f"--{k}={v}" for k, v in keys.items()), flush=True)
        result = module.train(cfg)
        times[name] = time.perf_counter() - t
        stages[name] = (cfg, result)
        return result["model"]

    sft_model = stage("sft", "sft", sft)
    rm_model = stage("rm", "rm", rm, model=sft_model)
    stage("ppo", "ppo", ppo, policy=sft_model, reward_model=rm_model)
    dpo_model = stage("dpo", "dpo", dpo, policy=sft_model)
    stage("rto", "rto", rto, policy=sft_model, reward_model=rm_model, dpo_model=dpo_model)
    stage("grpo", "grpo", grpo, policy=sft_model, reward_model=rm_model)

    summary = {}
    for name in STAGES:
        cfg, result = stages[name]
        torch.manual_seed(seed)
        ev = rollout.evaluate_cfg(load_lm(result["model"]), cfg, n=FINAL_EVAL_PROMPTS)
        summary[name] = {**ev, "wall_s": round(times[name], 1)}
    summary["rm"] = {"eval_accuracy": stages["rm"][1]["eval_accuracy"], "wall_s": round(times["rm"], 1)}
    summary["total_wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    curves = {}
    for name in STAGES:
        rows = Run(stages[name][0], name).read_metrics()
        key = "eval_gold_reward" if name in ("ppo", "rto", "grpo") else "gold_reward"
        curves[name] = [{"step": r["step"], "gold_reward": r[key]} for r in rows if key in r]
    plot_rewards(curves, out / "reward_curves.png")
    print(table(summary))
    print(f"summary: {out / 'summary.json'}; curves: {out / 'reward_curves.png'}")
    return summary


def table(summary):
    base = summary["sft"]["gold_reward"]
    lines = [f"mean gold reward on {FINAL_EVAL_PROMPTS} held-out prompts (reward model eval accuracy "
             f"{summary['rm']['eval_accuracy']:.3f})", "",
             "| stage | gold reward | vs SFT | no <eos> | length | wall s |", "|---|---|---|---|---|---|"]
    for name in STAGES:
        s = summary[name]
        lines.append(f"| {name} | {s['gold_reward']:.3f} | {s['gold_reward'] - base:+.3f} | {s['no_eos']:.3f} | "
                     f"{s['response_len']:.2f} | {s['wall_s']:.0f} |")
    lines.append(f"\ntotal wall time {summary['total_wall_s']:.0f} s")
    return "\n".join(lines)


@dataclass
class DemoConfig:
    out: str = run_key("runs/demo", "directory of the six stages, summary.json and reward_curves.png")
    seed: int = run_key(0, "seed of every stage")
    progress: bool = run_key(True, "show progress bars")

    def check(self):
        pass


COMMAND = Command("demo", DemoConfig, lambda cfg: run_demo(cfg.out, seed=cfg.seed, progress=cfg.progress),
                  "SFT -> reward model -> PPO, DPO, RTO and GRPO on the embedded task; prints the gold-reward table")
