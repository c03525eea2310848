"""`rlhf-kernels experiment overoptimization` (Coste et al., docs/algorithms.md §7) on the embedded task:
an SFT policy, k proxy reward models trained on few, noisily labelled preference pairs (different
seeds, same data), then PPO with a small KL penalty against a single proxy (member 0) and against
the WCO and UWO ensembles, same seed and steps. Each PPO run logs, per iteration, the gold reward
and the proxy reward it optimises of its own rollouts; one plot shows gold (solid) and proxy
(dashed) for every run, and a table gives final and peak gold (held-out evaluation) and the final
proxy. Every stage is an ordinary run directory under `out`: rerunning the command resumes
unfinished stages and reuses finished ones (a finished stage only reloads and re-evaluates).
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .. import ppo, rm, sft
from ..core.commands import Command
from ..core.config import ConfigError, positive, topic
from ..core.plots import _pyplot, _save
from ..core.run_config import optim_key
from ..core.runlog import Run
from ..ppo import PPOConfig
from ..rewards import ensemble

COLORS = {"single": "C3", "mean": "C2", "wco": "C0", "uwo": "C1"}
LABELS = {"single": "single RM", "mean": "ensemble mean", "wco": "WCO (min)", "uwo": "UWO (mean - λ·var)"}


def _say(cfg, text):
    if cfg.progress:
        print(f"== overoptimization: {text}", flush=True)


def ppo_config(cfg, name, policy, dirs):
    """The PPO run `name` of the experiment: every PPO key of `cfg`, the given policy and proxy."""
    keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PPOConfig)}
    single = name == "single"
    keys.update(out=str(Path(cfg.out, f"ppo_{name}")), policy=policy,
                reward_model=dirs[0] if single else ",".join(dirs), ensemble_reduce="mean" if single else name)
    out = PPOConfig(**keys)
    out.check()
    return out


def run_experiment(cfg):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"seed": cfg.seed, "progress": cfg.progress, "device": cfg.device, "temperature": cfg.temperature,
              "max_new_tokens": cfg.max_new_tokens, "logprob_impl": cfg.logprob_impl, "eval_prompts": cfg.eval_prompts}
    policy = cfg.policy
    if not policy:
        _say(cfg, f"SFT policy ({cfg.sft_steps} steps) -> {out / 'sft'}")
        policy = sft.train(sft.COMMAND.build(overrides={**common, "steps": cfg.sft_steps, "out": str(out / "sft")}))["model"]
    rms = cfg.reward_model
    if not rms:
        _say(cfg, f"{cfg.members} proxy reward models ({cfg.rm_pairs} pairs, label noise {cfg.rm_label_noise}, "
                  f"{cfg.rm_steps} steps each) -> {out / 'rms'}")
        rms = rm.train(rm.COMMAND.build(overrides={
            **common, "model": policy, "ensemble": cfg.members, "pairs": cfg.rm_pairs,
            "label_noise": cfg.rm_label_noise, "steps": cfg.rm_steps, "lr": cfg.rm_lr,
            "eval_every": cfg.rm_steps, "out": str(out / "rms")}))["model"]
    dirs = ensemble.member_dirs(rms)
    curves, summary = {}, {}
    for name in [r.strip() for r in cfg.runs.split(",") if r.strip()]:
        if name != "single" and len(dirs) < 2:
            raise ConfigError(f"the {name} run needs an ensemble of at least 2 reward models; reward_model={rms!r} "
                             f"names {len(dirs)}")
        pcfg = ppo_config(cfg, name, policy, dirs)
        _say(cfg, f"PPO against {LABELS[name]} ({pcfg.steps} iterations) -> {pcfg.out}")
        result = ppo.train(pcfg)
        rows = Run(pcfg, "ppo").read_metrics()
        curves[name] = rows
        evals = [(r["step"], r["eval_gold_reward"]) for r in rows if "eval_gold_reward" in r]
        peak_step, peak = max(evals, key=lambda e: e[1])
        summary[name] = {"final_gold": result["gold_reward"], "peak_gold": peak, "peak_step": peak_step,
                         "final_proxy": rows[-1]["score"], "final_kl": rows[-1]["kl"],
                         "no_eos": result["no_eos"], "dir": pcfg.out}
    plot_path = out / "overoptimization.png"
    plot_overoptimization(curves, plot_path, title=f"PPO vs proxy RMs (k={len(dirs)}, label noise "
                                                   f"{cfg.rm_label_noise}, kl_coef {cfg.kl_coef})")
    text = table(summary, cfg)
    (out / "summary.json").write_text(json.dumps({"runs": summary, "plot": str(plot_path), "reward_models": dirs,
                                                  "policy": policy}, indent=2) + "\n")
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"plot: {plot_path}; summary: {out / 'summary.json'}")
    return summary


def table(summary, cfg):
    lines = [f"gold reward on {cfg.eval_prompts} held-out prompts (eval every {cfg.eval_every} iterations); proxy = "
             "the reward each run optimises, on its last batch", "",
             "| PPO against | final gold | peak gold (iteration) | final proxy | final KL |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {LABELS[name]} | {s['final_gold']:.3f} | {s['peak_gold']:.3f} ({s['peak_step']}) | "
                     f"{s['final_proxy']:.3f} | {s['final_kl']:.2f} |")
    return "\n".join(lines)


def plot_overoptimization(curves, path, title=""):
    """Per-iteration gold (solid, left axis) and proxy (dashed, right axis) of each run; gold and
    proxy live on different scales, hence two axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax2 = ax.twinx()
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        c = COLORS[name]
        ax.plot(steps, [r["gold_reward"] for r in rows], "-", color=c, label=f"{LABELS[name]}: gold")
        ax2.plot(steps, [r["score"] for r in rows], "--", color=c, alpha=0.8, label=f"{LABELS[name]}: proxy")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("gold reward (solid)")
    ax2.set_ylabel("proxy reward (dashed)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best", ncol=2)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


exp_key = topic("overoptimization experiment")


@dataclass
class OveroptConfig(PPOConfig):
    """The PPO keys apply to every PPO run of the experiment; the rest set up its SFT and proxy RMs."""
    policy: str = exp_key("", "\"\": train an SFT policy in out/sft (reused when present)")
    reward_model: str = exp_key("", "\"\": train the proxy ensemble in out/rms (reused when present)")
    runs: str = exp_key("single,wco,uwo", "PPO runs, any of single (member 0 alone), mean, wco, uwo")
    sft_steps: int = exp_key(150, "steps of the SFT policy")
    members: int = exp_key(3, "proxy reward models")
    rm_pairs: int = exp_key(150, "few, noisy pairs: proxies good enough to learn from, flawed")
    rm_label_noise: float = exp_key(0.35, "enough to be exploited (README: the measured run)")
    rm_steps: int = exp_key(40, "steps of each proxy reward model")
    rm_lr: float = exp_key(1e-3, "learning rate of the proxy reward models")
    steps: int = optim_key(150, "long enough for the single proxy's gold reward to peak and fall")
    batch_size: int = 32
    minibatches: int = 2
    micro_batch_size: int = 16
    kl_coef: float = 0.01  # Coste et al.: a small KL penalty
    uwo_lambda: float = 0.5
    eval_every: int = 5
    eval_prompts: int = 128

    def check(self):
        super().check()
        positive(self, "members", "sft_steps", "rm_pairs", "rm_steps")
        if not 0 <= self.rm_label_noise < 0.5:
            raise ConfigError(f"rm_label_noise must be in [0, 0.5), got {self.rm_label_noise}")
        runs = [r.strip() for r in self.runs.split(",") if r.strip()]
        bad = [r for r in runs if r not in ("single", "mean", "wco", "uwo")]
        if bad or not runs or len(set(runs)) < len(runs):
            raise ConfigError(f"runs must be distinct names among single, mean, wco, uwo (comma-separated), "
                              f"got {self.runs!r}")


COMMAND = Command("experiment overoptimization", OveroptConfig, run_experiment,
                  "reward overoptimization: PPO against a single proxy RM and against ensembles")
