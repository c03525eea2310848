"""PNG bar charts of the tables a benchmark run printed (`python -m bench --plot DIR`).

Each table's label column is its first; bars are its median times, and a second panel shows a
column of peak memory when the table has one. Times are read back from the printed cells
("1.234 ms", "2.5 s"); a table with no median column (e.g. an agreement table) gets no chart.
"""
import os
import re

_TIME = re.compile(r"^\s*([0-9.]+)\s*(ms|s)\s*$")
_NUMBER = re.compile(r"^\s*([0-9.]+)")


def _seconds(cell):
    m = _TIME.match(str(cell))
    return None if not m else float(m.group(1)) * (1e-3 if m.group(2) == "ms" else 1.0)


def _number(cell):
    m = _NUMBER.match(str(cell))
    return None if not m else float(m.group(1))


def slug(title):
    """File name stem from the title up to its parenthesis (the rest holds measured numbers that
    change from run to run, which would make the names unstable)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", title.split("(")[0]).strip("_")[:80].lower() or "table"


def plot_table(title, rows, columns, out_dir, name=None):
    """Write one PNG for a table (`name`.png, default from the title); return its path, or None if
    the table has no timings."""
    if not rows or "median" not in columns:
        return None
    label = columns[0]
    timed = [(str(r.get(label, "")), _seconds(r.get("median"))) for r in rows]
    timed = [(n, t) for n, t in timed if t is not None]
    if not timed:
        return None
    peak_col = next((c for c in columns if "peak" in c.lower()), None)
    peaks = [(str(r.get(label, "")), _number(r.get(peak_col))) for r in rows] if peak_col else []
    peaks = [(n, v) for n, v in peaks if v is not None]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if peaks else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 0.45 * len(rows) + 1.8), squeeze=False)
    ax = axes[0][0]
    ax.barh([n for n, _ in timed], [t * 1e3 for _, t in timed], color="tab:blue")
    ax.invert_yaxis()
    ms = [t * 1e3 for _, t in timed]
    log = max(ms) > 20 * min(ms)  # one slow contender would flatten the others to slivers
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale), lower is better" if log else "median time (ms), lower is better")
    if peaks:
        ax2 = axes[0][1]
        ax2.barh([n for n, _ in peaks], [v for _, v in peaks], color="tab:orange")
        ax2.invert_yaxis()
        ax2.set_xlabel(peak_col)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name or slug(title)}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(tables, out_dir):
    """Write a PNG per table with timings; return the paths written."""
    paths, seen = [], {}
    for t, r, c in tables:
        stem = slug(t)
        seen[stem] = seen.get(stem, 0) + 1
        p = plot_table(t, r, c, out_dir, name=stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
        if p:
            paths.append(p)
    return paths
