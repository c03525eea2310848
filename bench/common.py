"""Shared measuring tools: the device, the ceilings, interleaved timing, peak memory, optional peers,
and the one table/CSV writer every script ends with.

Every benchmark measures its contenders side by side in one process, interleaved (A B C A B C ...),
and reports the median and the spread (min–max) of the repeats. On CUDA each timing is
`triton.testing.do_bench` (L2 flushed between calls, CUDA events); on CPU it is wall time.
"""
import csv
import functools
import importlib
import importlib.metadata
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

# the tensors' device: the GPU where there is one, so the same tables come from a GPU run
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine():
    if DEVICE.type == "cuda":
        where = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        where = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                where = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        where += f", {torch.get_num_threads()} threads"
    return (f"{where}; torch {torch.__version__}, {_version('triton')}, "
            f"python {platform.python_version()}; peers: {peer_versions()}")


def _version(dist):
    """'<dist> <version>', or '<dist> not installed' (a CPU-only install has no triton: the CPU rows still run)."""
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} not installed"


def peer_versions():
    return ", ".join(_version(dist) for dist in ("trl", "liger-kernel", "cut-cross-entropy"))


def rk_backends(op):
    """{row label: backend} of rk's fast backends for `op` that run on DEVICE (the cpu kernels on a
    CPU, the triton and cuda kernels on a GPU; never the interpreter, which is not timed)."""
    import rlhf_kernels as rk
    implemented = importlib.import_module(f"rlhf_kernels.ops.{op}").IMPLEMENTED
    avail = rk.available_backends()
    wanted = ("cpu",) if DEVICE.type == "cpu" else ("triton", "cuda")
    return {f"rk {b}": b for b in wanted if b in implemented and avail[b] == "available"}


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _once(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _do_bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e-3


def interleaved(fns, repeats=5, warmup=1):
    """{name: fn} -> {name: (median_s, min_s, max_s, repeats)}, timed round-robin so drift hits all
    alike. On CUDA each sample is a do_bench median; on CPU one wall-clock call."""
    one = _do_bench if DEVICE.type == "cuda" else _once
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(one(fn))
    return {k: (statistics.median(v), min(v), max(v), len(v)) for k, v in times.items()}


def peak_bytes(fn):
    """Peak bytes of tensor memory `fn` allocates beyond what was live before it (tensors freed
    before returning count while live): the CUDA caching allocator's peak on a GPU, the profiler's
    allocation events on a CPU."""
    if DEVICE.type == "cuda":
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - before
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


@dataclass
class Ceilings:
    """What this machine does at best, measured in the same run: bytes/s of a large copy (the
    ceiling of memory-bound kernels) and flop/s of a large fp32 GEMM (of compute-bound ones)."""
    copy: float
    gemm: float

    def __str__(self):
        return f"copy {self.copy / 1e9:.1f} GB/s, fp32 GEMM {self.gemm / 1e9:.0f} GFLOP/s"


@functools.lru_cache(None)
def measure_ceilings(quick=False):
    nbytes, n = (1 << 26, 1024) if quick else (1 << 28, 2048)
    if DEVICE.type == "cuda":  # a GPU needs larger problems to reach its peak
        nbytes, n = 1 << 30, 8192
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    a, b = (torch.randn(n, n, device=DEVICE) for _ in range(2))
    res = interleaved({"copy": lambda: dst.copy_(src), "mm": lambda: a @ b}, repeats=5)
    return Ceilings(copy=2 * nbytes / res["copy"][0], gemm=2 * n ** 3 / res["mm"][0])


def peers(makers, trial=lambda fn: fn()):
    """{name: make} -> ({name: fn}, {name: reason}). `make()` imports a peer and returns its
    contender, which `trial` calls once here; a peer that is not installed or does not run here becomes
    a skipped row with the reason, never an error."""
    fns, skipped = {}, {}
    for name, make in makers.items():
        try:
            fn = make()
            trial(fn)
            fns[name] = fn
        except Exception as e:  # ImportError, a version without the function, a backend that fails here
            skipped[name] = f"skipped: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    return fns, skipped


def fmt_time(s):
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


# every table printed in this process, as (title, rows, columns): `python -m bench --plot` draws them
TABLES = []


def _cell(v):
    return str(v).replace("|", "\\|")  # a bare | would end the Markdown cell


def table(title, rows, columns):
    """Print rows (dicts) as a Markdown table under a title, record it in TABLES; return the text."""
    TABLES.append((title, rows, columns))
    head = "| " + " | ".join(_cell(c) for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    text = "\n".join([f"### {title}", "", head, sep] + body + [""])
    print(text, flush=True)
    return text


def write_csv(path, rows, columns):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def roofline_column(results, nbytes, flops, dtype, device_name):
    """(column name, {contender: measured / predicted}) against the roofline prediction (bench/roofline.py) of
    `nbytes` and `flops` on the GPU called `device_name`; (None, {}) off a GPU with published figures there."""
    from .roofline import gpu_named, predict
    gpu = gpu_named(device_name) if device_name else None
    if gpu is None or not (nbytes or flops):
        return None, {}
    t = predict(gpu, nbytes or 0, flops or 0, dtype)
    return (f"measured / predicted ({gpu.name} roofline {fmt_time(t)})",
            {name: f"{med / t:.2f}" for name, (med, *_rest) in results.items()})


def report(title, results, baseline, ceilings, *, csv_name, csv_dir=None, nbytes=None, flops=None,
           peaks=None, skipped=None, extra=None, dtype="fp32"):
    """The table (and CSV) every script ends with. One row per contender in `results` (from
    `interleaved`): median, spread, speedup vs `baseline` (>1: faster), peak MiB (from `peaks`,
    {name: bytes or None}), and the throughput against the ceilings: GB/s of `nbytes` for memory-bound
    ops, GFLOP/s of `flops` for compute-bound ones. `skipped`: {name: reason} rows for missing peers;
    `extra`: {name: {column: cell}} for columns of the op's own (accuracy, × floor, ...). On an A100-80GB or
    H100-SXM a column gives measured / predicted against the roofline of `nbytes` and `flops` at `dtype`'s peak
    ("fp32", "tf32", "bf16", "fp16"; fp32 means tf32 when torch allows TF32 matmuls)."""
    ceilings = ceilings or measure_ceilings()
    base = results[baseline][0]
    speedup = f"speedup vs {baseline}"
    extra = extra or {}
    if dtype == "fp32" and DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        dtype = "tf32"
    roof, ratio = roofline_column(results, nbytes, flops, dtype,
                                  torch.cuda.get_device_name() if DEVICE.type == "cuda" else None)
    rows = []
    for name, (med, lo, hi, n) in results.items():
        row = {"impl": name, "median": fmt_time(med),
               "spread": f"{fmt_time(lo)} – {fmt_time(hi)}" if n > 1 else "1 run",
               speedup: f"{base / med:.2f}x"}
        if peaks is not None:
            row["peak MiB"] = "-" if peaks.get(name) is None else f"{peaks[name] / 2 ** 20:.1f}"
        if nbytes:
            row["GB/s (% of copy)"] = f"{nbytes / med / 1e9:.3g} ({100 * nbytes / med / ceilings.copy:.0f}%)"
        if flops:
            row["GFLOP/s (% of GEMM)"] = f"{flops / med / 1e9:.3g} ({100 * flops / med / ceilings.gemm:.0f}%)"
        if roof:
            row[roof] = ratio[name]
        row.update(extra.get(name, {}))
        rows.append(row)
    for name, reason in (skipped or {}).items():
        rows.append({"impl": name, "median": reason})
    columns = list(dict.fromkeys(c for r in rows for c in r))
    text = table(f"{title} ({DEVICE.type}; ceilings: {ceilings})", rows, columns)
    if csv_dir:
        write_csv(os.path.join(csv_dir, f"{csv_name}.csv"), rows, columns)
    return text


def measure(fns, *, repeats, warmup=1):
    """Timings of `fns` (see `interleaved`) and each one's peak memory."""
    return interleaved(fns, repeats=repeats, warmup=warmup), {k: peak_bytes(fn) for k, fn in fns.items()}


def script_main(run):
    """`python -m bench.bench_<op> [--quick] [--csv DIR]`: run one benchmark script on its own."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.add_argument("--csv", default=None, help="write the tables as CSV into this folder")
    a = p.parse_args()
    run(a.quick, a.csv, measure_ceilings(a.quick))
