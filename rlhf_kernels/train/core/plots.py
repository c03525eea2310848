"""PNG curves of a run's metrics and of the demo's reward per stage (matplotlib, Agg backend)."""
import math
import os
from pathlib import Path

SKIP = {"step", "step_time_s"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def plot_metrics(rows, path, title=""):
    """One small panel per numeric metric against the step."""
    plt = _pyplot()
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in SKIP
            and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)]
    cols = 4
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_rewards(stages, path, key="gold_reward"):
    """`stages`: name -> metrics rows; each stage's `key` against its step, plus the SFT level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in stages.items():
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    ax.set_xlabel("step (optimizer step; PPO/RTO: iteration)")
    ax.set_ylabel(f"mean {key}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
