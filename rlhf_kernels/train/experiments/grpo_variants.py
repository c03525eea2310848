"""`rlhf-kernels experiment grpo_variants` (docs/grpo.md): the GRPO loss variants (the presets grpo, dr_grpo, dapo,
gspo, cispo) on the embedded task from one SFT policy, each with bf16 rollouts and with each of the
given rollout corrections, same seed and steps. One plot of the held-out gold reward per run; a table
of the final gold reward and the mismatch the run saw. Every run is an ordinary `train grpo` directory
under `out` (rerunning resumes unfinished runs and reuses finished ones), and the table prints the
`train grpo` command of each row.
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..._choices import RolloutDtype
from .. import grpo, sft
from ..core.commands import Command
from ..core.config import ConfigError, positive, topic
from ..core.plots import _pyplot, _save
from ..core.runlog import Run
from ..grpo import GRPOConfig
from ..presets import GRPO_PRESETS

CORRECTIONS = ("none", "tis", "mis", "icepop")


def names(text):
    return [r.strip() for r in text.split(",") if r.strip()]


def run_config(cfg, variant, correction, policy):
    """The `train grpo` run of one row: every GRPO key of `cfg`, then the variant's preset, then the
    correction; and the command line that reproduces it."""
    keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GRPOConfig)}
    keys.update(GRPO_PRESETS[variant])
    keys.update(preset=variant, policy=policy, rollout_correction=correction,
                out=str(Path(cfg.out, f"{variant}_{cfg.rollout_dtype}_{correction}")))
    out = GRPOConfig(**keys)
    out.check()
    defaults = GRPOConfig()
    shown = {k: v for k, v in dataclasses.asdict(out).items()
             if k in ("preset", "policy", "rollout_dtype", "rollout_correction", "out", "seed")
             or (k not in GRPO_PRESETS[variant] and v != getattr(defaults, k) and k != "progress")}
    command = "rlhf-kernels train grpo " + " ".join(f"--{k}={v}" for k, v in shown.items())
    return out, command


def run_experiment(cfg):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = cfg.policy
    if not policy:
        if cfg.progress:
            print(f"== experiment grpo: SFT policy -> {out / 'sft'}", flush=True)
        policy = sft.train(sft.COMMAND.build(overrides={"seed": cfg.seed, "progress": cfg.progress,
                                                        "device": cfg.device, "out": str(out / "sft")}))["model"]
    curves, rows = {}, []
    for variant in names(cfg.variants):
        for correction in names(cfg.corrections):
            rcfg, command = run_config(cfg, variant, correction, policy)
            if cfg.progress:
                print(f"== {command}", flush=True)
            result = grpo.train(rcfg)
            metrics = Run(rcfg, "grpo").read_metrics()
            label = f"{variant}, {correction}"
            curves[label] = [(r["step"], r["eval_gold_reward"]) for r in metrics if "eval_gold_reward" in r]
            mean = lambda k: sum(r[k] for r in metrics) / len(metrics)  # noqa: E731
            rows.append({"variant": variant, "correction": correction, "gold_reward": result["gold_reward"],
                         "no_eos": result["no_eos"], "mismatch_k3": mean("rollout_mismatch_k3"),
                         "masked_fraction": mean("rollout_masked_fraction"),
                         "wall_s": sum(r["step_time_s"] for r in metrics), "command": command})
    plot_path = out / "grpo_variants.png"
    plot_curves(curves, plot_path, title=f"GRPO variants, {cfg.rollout_dtype} rollouts, seed {cfg.seed}")
    text = table(rows, cfg)
    (out / "summary.json").write_text(json.dumps({"runs": rows, "plot": str(plot_path), "policy": policy},
                                                 indent=2) + "\n")
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"plot: {plot_path}; summary: {out / 'summary.json'}")
    return rows


def table(rows, cfg):
    lines = [f"gold reward of samples at temperature {cfg.temperature} on {cfg.eval_prompts} held-out prompts after "
             f"{cfg.steps} iterations; mismatch k3 and masked fraction: means over the run's rollouts "
             f"({cfg.rollout_dtype} sampler vs fp32 trainer)", "",
             "| variant | correction | gold reward | no <eos> | mismatch k3 | masked fraction | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['correction']} | {r['gold_reward']:.3f} | {r['no_eos']:.3f} | "
                     f"{r['mismatch_k3']:.2e} | {r['masked_fraction']:.4f} | {r['wall_s']:.0f} |")
    lines += ["", "commands:"] + [f"    {r['command']}" for r in rows]
    return "\n".join(lines)


def plot_curves(curves, path, title=""):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (label, pts) in enumerate(curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if label.endswith(", none") else "-",
                color=f"C{i // 2 if len(curves) % 2 == 0 else i}", marker=".", label=label)
    ax.set_xlabel("GRPO iteration")
    ax.set_ylabel("held-out gold reward")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


exp_key = topic("GRPO variants experiment")


@dataclass
class GRPOExperimentConfig(GRPOConfig):
    """The GRPO keys apply to every run; each run then takes its variant's preset and its correction."""
    out: str = exp_key("runs/grpo-variants", "directory of the runs, table.md, summary.json and the plot")
    policy: str = exp_key("", "the SFT policy every run starts from; \"\": train one in out/sft (reused when present)")
    variants: str = exp_key("grpo,dr_grpo,dapo,gspo,cispo", "presets to compare (GRPO_PRESETS), comma-separated")
    corrections: str = exp_key("none,tis", "rollout corrections to run each variant with: none, tis, mis, icepop")
    rollout_dtype: RolloutDtype = "bf16"
    eval_every: int = 5

    def check(self):
        super().check()
        positive(self, "eval_every")
        bad = [v for v in names(self.variants) if v not in GRPO_PRESETS]
        bad += [c for c in names(self.corrections) if c not in CORRECTIONS]
        if bad or not names(self.variants) or not names(self.corrections):
            raise ConfigError(f"variants must name presets among {', '.join(GRPO_PRESETS)} and corrections among "
                              f"{', '.join(CORRECTIONS)} (comma-separated), got {self.variants!r} / {self.corrections!r}")


COMMAND = Command("experiment grpo_variants", GRPOExperimentConfig, run_experiment,
                  "GRPO loss variants (grpo, dr_grpo, dapo, gspo, cispo) with and without rollout correction")
