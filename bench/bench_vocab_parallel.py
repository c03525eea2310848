"""linear_logprobs with a vocabulary-parallel head over 2 CPU processes (gloo, 1 thread each) against the
single-process op on the whole weight (1 and 2 threads): forward + backward time and peak memory per rank.

python -m bench.bench_vocab_parallel [--quick] [--csv DIR]

One job of 2 processes measures everything, interleaved: each repeat times one vocab-parallel step (both ranks,
the wall time of rank 0, which includes waiting for rank 1 in the collectives), then the single-process op on rank 0
with 1 thread and with 2 threads while rank 1 waits in a barrier. Peak memory is the profiler's peak of tensor
allocations during one step (bench/common.py peak_bytes), on each rank; hidden, the weight (shard) and the tokens
are live before and not counted, the gradients are.
The communication it needs per step is computed from the shapes (rlhf_kernels/ops/vocab_parallel.py states it).
"""
import argparse
import datetime
import os
import subprocess
import sys
import tempfile

import torch

FULL, QUICK = (1024, 256, 32768), (256, 128, 4096)
WORLD = 2


def _worker(rank, store, N, H, V, repeats, out):
    import torch.distributed as dist

    import rlhf_kernels as rk

    from .common import peak_bytes
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = torch.randn(V, H, generator=g) / H ** 0.5
    tok = torch.randint(0, V, (N,), generator=g)
    vr = V // WORLD
    w_r = w[rank * vr:(rank + 1) * vr].clone().requires_grad_()
    w = w.requires_grad_()

    def vp():
        lp = rk.linear_logprobs(h, w_r, tok, backend="cpu", process_group=dist.group.WORLD)
        torch.autograd.grad(lp.sum(), (h, w_r))

    def single(threads):
        torch.set_num_threads(threads)
        torch.autograd.grad(rk.linear_logprobs(h, w, tok, backend="cpu").sum(), (h, w))
        torch.set_num_threads(1)

    def timed(fn):
        dist.barrier()
        t0 = datetime.datetime.now()
        fn()
        return (datetime.datetime.now() - t0).total_seconds()

    times = {"vp": [], "single 1": [], "single 2": []}
    for i in range(repeats + 1):  # the first round warms up
        t = timed(vp)
        s1 = s2 = None
        if rank == 0:
            s1, s2 = timed(lambda: single(1)), timed(lambda: single(2))
        else:
            dist.barrier()
            dist.barrier()
        if i:
            times["vp"].append(t)
            if rank == 0:
                times["single 1"].append(s1)
                times["single 2"].append(s2)
    dist.barrier()
    peaks = {"vp": peak_bytes(vp)}
    if rank == 0:
        dist.barrier()
        peaks["single"] = peak_bytes(lambda: single(1))
    else:
        dist.barrier()
    torch.save(dict(times=times, peaks=peaks), out)
    dist.destroy_process_group()


def run(quick=False, csv_dir=None, ceilings=None):
    import statistics

    from .common import machine, table, write_csv
    N, H, V = QUICK if quick else FULL
    repeats = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs = [subprocess.Popen([sys.executable, "-m", "bench.bench_vocab_parallel", "--worker", str(r),
                                   os.path.join(tmp, "store"), str(N), str(H), str(V), str(repeats),
                                   os.path.join(tmp, f"out{r}.pt")], env=env, cwd=root) for r in range(WORLD)]
        try:
            for p in procs:
                p.wait(timeout=3600)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a rank failed: exit codes {[p.returncode for p in procs]}")
        res = [torch.load(os.path.join(tmp, f"out{r}.pt"), weights_only=True) for r in range(WORLD)]
    t = res[0]["times"]
    base = statistics.median(t["single 1"])
    mib = (lambda b: f"{b / 2 ** 20:.1f}")
    grad_ar = N * H * 4  # the hidden gradient's all_reduce (fp32), each rank's buffer
    rows = []
    for label, key, peak in [("single process, 1 thread", "single 1", mib(res[0]["peaks"]["single"])),
                             ("single process, 2 threads", "single 2", mib(res[0]["peaks"]["single"])),
                             (f"vocab-parallel, {WORLD} ranks x 1 thread", "vp",
                              " / ".join(mib(r["peaks"]["vp"]) for r in res))]:
        v = t[key]
        rows.append({"contender": label, "median s": f"{statistics.median(v):.3f}", "min s": f"{min(v):.3f}",
                     "max s": f"{max(v):.3f}", "x single 1 thread": f"{statistics.median(v) / base:.2f}",
                     "peak MiB (per rank)": peak})
    cols = ["contender", "median s", "min s", "max s", "x single 1 thread", "peak MiB (per rank)"]
    title = (f"linear_logprobs fwd+bwd, vocabulary-parallel over {WORLD} CPU processes (gloo) vs one process, "
             f"N={N} H={H} V={V} fp32, median of {repeats}, interleaved; per step the group moves "
             f"{2 * N * 4 * (WORLD - 1)} B per rank forward (all_gather) and all-reduces {grad_ar} B backward")
    text = table(title, rows, cols)
    print(f"machine: {machine()}")
    if csv_dir:
        write_csv(os.path.join(csv_dir, "vocab_parallel.csv"), rows, cols)
    return text


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        r, store, N, H, V, rep, out = sys.argv[2:9]
        _worker(int(r), store, int(N), int(H), int(V), int(rep), out)
    else:
        p = argparse.ArgumentParser(prog="python -m bench.bench_vocab_parallel")
        p.add_argument("--quick", action="store_true")
        p.add_argument("--csv", default=None)
        a = p.parse_args()
        run(quick=a.quick, csv_dir=a.csv)
