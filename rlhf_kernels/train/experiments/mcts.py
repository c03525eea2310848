"""`rlhf-kernels experiment mcts` (docs/algorithms.md §9): PPO-MCTS against greedy and sampled decoding
of the same PPO policy, on the held-out prompts every trainer evaluates on.

The policy, critic and reward model default to `make demo`'s PPO run and reward model. The
experiment decodes greedily, by sampling at `temperature`, and by MCTS for every (S, c_puct) of the
sweep; every other `generate` key applies to all of them. Each decoding is an ordinary
`generate --out` file under `out/decode/`, reused when its settings are unchanged, so a rerun with
a wider sweep only decodes what is new. It writes `out/table.md`, `out/summary.json` and
`out/mcts.png` (gold reward against S, one line per c_puct, greedy and sampled as flat lines).
"""
import dataclasses
import json
from pathlib import Path

from ..core.commands import Command
from ..core.config import ConfigError, to_dict, topic
from ..core.plots import _pyplot, _save
from ..decode.generate import GenerateConfig, run as decode

sweep_key = topic("experiment")


@dataclasses.dataclass
class MCTSExperimentConfig(GenerateConfig):
    policy: str = "runs/demo/ppo/model"
    critic: str = "runs/demo/ppo/critic"
    reward_model: str = "runs/demo/rm/model"
    sweep_simulations: str = sweep_key("10,30,50", "simulations S of the MCTS decodings (comma-separated)")
    sweep_c_puct: str = sweep_key("8,2,1", "c_puct of the MCTS decodings (comma-separated; 8 is the released "
                                           "code's default)")
    out: str = sweep_key("runs/mcts", "a directory here (generate's `out` is one JSON file)")

    def check(self):
        """As `generate`'s, plus the sweep lists and the model directories."""
        super().check()
        _numbers(self, "sweep_simulations", int)
        _numbers(self, "sweep_c_puct", float)
        for key in ("policy", "critic"):
            if not Path(getattr(self, key)).exists():
                raise ConfigError(f"{key} {getattr(self, key)!r} does not exist: run `make demo` first (its PPO "
                                  f"run is the default), or pass --policy, --critic and --reward_model")


def _numbers(cfg, key, kind):
    text = getattr(cfg, key)
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{key} must be a comma-separated list of positive {kind.__name__}s, got {text!r}")
    return values


def decodings(cfg):
    """(name, generate config) of every decoding the experiment compares."""
    base = GenerateConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(GenerateConfig)})
    out = Path(cfg.out, "decode")
    runs = [("greedy", dataclasses.replace(base, mcts=False, do_sample=False, out=str(out / "greedy.json"))),
            ("sampled", dataclasses.replace(base, mcts=False, do_sample=True, out=str(out / "sampled.json")))]
    for c in _numbers(cfg, "sweep_c_puct", float):
        for s in _numbers(cfg, "sweep_simulations", int):
            name = f"mcts_S{s}_c{c:g}"
            runs.append((name, dataclasses.replace(base, mcts=True, simulations=s, c_puct=c,
                                                    out=str(out / f"{name}.json"))))
    return runs


def _cached(gcfg):
    """The summary of an earlier decoding with exactly these settings, or None."""
    path = Path(gcfg.out)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("settings") != json.loads(json.dumps(to_dict(gcfg))):
        return None
    return {k: v for k, v in saved.items() if k not in ("settings", "samples")}


def run_experiment(cfg):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, gcfg in decodings(cfg):
        result = _cached(gcfg)
        if result is None:
            if cfg.progress:
                print(f"== mcts experiment: {name}", flush=True)
            result = decode(gcfg)
        rows[name] = {**result, "c_puct": gcfg.c_puct if gcfg.mcts else None}
    text = table(rows, cfg)
    plot_path = out / "mcts.png"
    plot_sweep(rows, plot_path, title=f"PPO-MCTS vs greedy and sampled decoding ({cfg.prompts} held-out prompts)")
    (out / "table.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"decodings": rows, "plot": str(plot_path),
                                                  "settings": to_dict(cfg)}, indent=2) + "\n")
    print(text)
    print(f"plot: {plot_path}; summary: {out / 'summary.json'}")
    return rows


def _label(name, row, cfg):
    if row["method"] != "mcts":
        return f"sampled, temperature {cfg.temperature:g}" if name == "sampled" else name
    return f"MCTS S={row['simulations']}, c_puct={row['c_puct']:g}"


def table(rows, cfg):
    best = max(r["gold_reward"] for r in rows.values())
    lines = [f"mean gold reward on {cfg.prompts} held-out prompts; policy {cfg.policy}, critic {cfg.critic}, "
             f"<eos> nodes valued by {cfg.reward_model or 'the critic'}", "",
             "| decoding | gold reward | no `<eos>` | length | wall s |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        gold = f"{r['gold_reward']:.3f}"
        if r["gold_reward"] == best:
            gold = f"**{gold}**"
        lines.append(f"| {_label(name, r, cfg)} | {gold} | {r['no_eos']:.3f} | {r['response_len']:.2f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def plot_sweep(rows, path, title=""):
    """Gold reward (left) and wall time (right) against S, one line per c_puct; greedy and sampled
    decoding have no S and are drawn as horizontal lines."""
    plt = _pyplot()
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    by_c = {}
    for r in rows.values():
        if r["method"] == "mcts":
            by_c.setdefault(r["c_puct"], []).append((r["simulations"], r["gold_reward"], r["wall_s"]))
    for i, (c, pts) in enumerate(sorted(by_c.items(), reverse=True)):
        pts.sort()
        s = [p[0] for p in pts]
        ax.plot(s, [p[1] for p in pts], "o-", color=f"C{i}", label=f"MCTS c_puct={c:g}")
        ax_t.plot(s, [p[2] for p in pts], "o-", color=f"C{i}", label=f"MCTS c_puct={c:g}")
    for name, style in (("greedy", "k--"), ("sampled", "k:")):
        if name in rows:
            ax.axhline(rows[name]["gold_reward"], linestyle=style[1:], color=style[0], label=name)
            ax_t.axhline(rows[name]["wall_s"], linestyle=style[1:], color=style[0], label=name)
    ax.set_xlabel("simulations per token (S)")
    ax.set_ylabel("mean gold reward")
    ax_t.set_xlabel("simulations per token (S)")
    ax_t.set_ylabel("wall time (s)")
    for a in (ax, ax_t):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


COMMAND = Command("experiment mcts", MCTSExperimentConfig, run_experiment,
                  "PPO-MCTS against greedy and sampled decoding of the same PPO policy")
