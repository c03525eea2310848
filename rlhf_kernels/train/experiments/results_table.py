"""The results file's side of `rlhf-kernels reproduce` (reproduce.py): comparing a run with docs/results.json,
counting the claims per seed, the entries it records and the markdown tables the docs pages show."""
import platform
from datetime import date
from pathlib import Path


def _fmt(x, digits):
    return f"{x:.{digits}f}"


def _spread(values, digits):
    mean = sum(values) / len(values)
    return f"{_fmt(mean, digits)} ({_fmt(min(values), digits)}–{_fmt(max(values), digits)})"


def compare(exp, recorded, got):
    """Rows (label, recorded, got, ok) of one experiment: per seed |got − recorded| ≤ the metric's tol."""
    rows = []
    for m in exp.metrics:
        rec = recorded["metrics"].get(m.key, {}).get("values") if recorded else None
        new = [got[s][m.key] for s in sorted(got, key=int)]
        ok = rec is not None and len(rec) == len(new) and all(abs(a - b) <= m.tol for a, b in zip(rec, new))
        rows.append((f"{exp.id}: {m.name}", "—" if rec is None else _spread(rec, m.digits), _spread(new, m.digits),
                     ok))
    return rows


def claim_counts(exp, per_seed):
    """[(claim text, seeds where it holds, seeds)]."""
    seeds = sorted(per_seed, key=int)
    return [(c.text, sum(bool(c.holds(per_seed[s])) for s in seeds), len(seeds)) for c in exp.claims]


def entry(exp, per_seed, machine, versions):
    seeds = sorted(per_seed, key=int)
    return {"page": f"docs/{exp.page}", "command": exp.command, "seeds": [int(s) for s in seeds],
            "metrics": {m.key: {"name": m.name, "tol": m.tol, "digits": m.digits,
                                "values": [round(per_seed[s][m.key], 6) for s in seeds]} for m in exp.metrics},
            "claims": [{"text": t, "holds": k, "of": n} for t, k, n in claim_counts(exp, per_seed)],
            "note": exp.note, "date": date.today().isoformat(), "machine": machine, "versions": versions}


def markdown(exp_id, e):
    """The docs table of one results entry."""
    lines = [f"| {exp_id} | mean (min–max) over seeds {', '.join(map(str, e['seeds']))} | per seed | tolerance |",
             "|---|---|---|---|"]
    for m in e["metrics"].values():
        d = m["digits"]
        lines.append(f"| {m['name']} | {_spread(m['values'], d)} | {' / '.join(_fmt(v, d) for v in m['values'])} | "
                     f"{m['tol']:g} |")
    if e["note"]:
        lines.append(f"\n{e['note']}.")
    for c in e["claims"]:
        verdict = ("holds for every seed" if c["holds"] == c["of"] else
                   "does not hold on any seed" if c["holds"] == 0 else "does not hold robustly")
        lines.append(f"- {c['text']}: {verdict} ({c['holds']} of {c['of']} seeds)")
    command = e["command"].replace("{seed}", "S")
    lines.append(f"\n`{command}` for S in {', '.join(map(str, e['seeds']))}; regenerate with "
                 f"`rlhf-kernels reproduce --only={exp_id}` (docs/results.json: {e['date']}, {e['machine']}, "
                 f"{', '.join(f'{k} {v}' for k, v in e['versions'].items())}).")
    return "\n".join(lines)


def pending(exp_id):
    """The block of an experiment the results file does not hold yet."""
    return (f"*Not measured over seeds yet*: `rlhf-kernels reproduce --only={exp_id} --update` records it in "
            "docs/results.json and fills this table. The single-seed numbers below predate the results file and are "
            "not checked by `make reproduce`.")


def render_pages(results, experiments, root):
    """{page path: new text} with every results block of `experiments` regenerated (pages whose text would
    change); an experiment `results` lacks gets the pending block."""
    changed = {}
    for page in sorted((root / "docs").glob("*.md")):
        text = new = page.read_text()
        for exp in experiments:
            start, end = f"<!-- results:{exp.id} -->", f"<!-- /results:{exp.id} -->"
            if start in new and end in new:
                head, rest = new.split(start, 1)
                _, tail = rest.split(end, 1)
                e = results.get(exp.id)
                body = markdown(exp.id, e) if e else pending(exp.id)
                new = f"{head}{start}\n{body}\n{end}{tail}"
        if new != text:
            changed[page] = new
    return changed


def machine_and_versions():
    import torch
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads",
            {"torch": torch.__version__, "transformers": transformers.__version__})
