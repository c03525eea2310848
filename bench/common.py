"""Shared measuring tools: interleaved timing, peak memory, copy bandwidth, tables and CSV.

Every benchmark measures its contenders side by side in one process, interleaved (A B C A B C ...),
and reports the median and the spread (min–max) of the repeats.
"""
import csv
import os
import platform
import statistics
import time

import torch


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import triton
    return (f"{cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
            f"triton {getattr(triton, '__version__', '?')}, python {platform.python_version()}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns, repeats=5, warmup=1, device=torch.device("cpu")):
    """{name: fn} -> {name: (median_s, min_s, max_s)}, timed round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}


def peak_bytes(fn):
    """Peak bytes of tensor memory `fn` allocates on the CPU beyond what was live before it
    (from the profiler's allocation events; tensors freed before returning count while live)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    # self_ (not total) usage: an op's total includes its children's allocations, so nested ops
    # (autograd node -> custom op -> aten::empty) would count one allocation several times
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def copy_bandwidth(nbytes=1 << 28, repeats=5):
    """Measured bytes/s of a large tensor copy (read + write): the ceiling for memory-bound kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, repeats=repeats)["copy"][0]
    return 2 * nbytes / t


def gemm_flops(n=2048, repeats=3):
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = interleaved({"mm": lambda: a @ b}, repeats=repeats)["mm"][0]
    return 2 * n ** 3 / t


def fmt_time(s):
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


# every table printed in this process, as (title, rows, columns): `python -m bench --plot` draws them
TABLES = []


def table(title, rows, columns):
    """Print rows (dicts) as a Markdown table under a title, record it in TABLES; return the text."""
    TABLES.append((title, rows, columns))
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join([f"### {title}", "", head, sep] + body + [""])
    print(text, flush=True)
    return text


def write_csv(path, rows, columns):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def timing_rows(results, baseline, nbytes=None, bandwidth=None):
    """Rows with median, spread, ratio to `baseline` (>1 means faster) and GB/s (% of copy bandwidth)."""
    base = results[baseline][0]
    rows = []
    for name, (med, lo, hi) in results.items():
        row = {"impl": name, "median": fmt_time(med), "spread": f"{fmt_time(lo)} – {fmt_time(hi)}",
               f"speedup vs {baseline}": f"{base / med:.2f}x"}
        if nbytes:
            gbs = nbytes / med / 1e9
            row["GB/s"] = f"{gbs:.1f}" + (f" ({100 * nbytes / med / bandwidth:.0f}% of copy)" if bandwidth else "")
        rows.append(row)
    return rows


def script_main(run):
    """`python -m bench.bench_<op> [--quick] [--csv DIR]`: run one benchmark script on its own."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.add_argument("--csv", default=None, help="write the tables as CSV into this folder")
    a = p.parse_args()
    run(a.quick, a.csv)
