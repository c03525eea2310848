"""python -m bench.gpu_check [--out FILE] [--quick]: what a person with an NVIDIA GPU runs (`make gpu-check`).

1. the GPU tests, compiled (TRITON_INTERPRET=0: Triton kernels built for the GPU, not interpreted; the CUDA tests
   of the extension run instead of skipping);
2. the GPU tables of `rlhf-kernels bench` (rk's triton and cuda backends against torch, Liger-Kernel and Cut
   Cross-Entropy where installed), each row with measured / predicted against the roofline (bench/roofline.py);
3. the peak memory of a linear_logprobs forward + backward at V=128256 on each backend, beside the naive
   composition;
and writes everything into one Markdown file to paste into BENCHMARKS.md. Without a visible GPU it runs nothing,
says so and exits 2.
"""
import argparse
import datetime
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
ALWAYS_TESTED = ["test_build.py", "test_triton_launch.py"]  # the build and the launch plans, beside the GPU tests
BENCH_OPS = ["token_kl", "logprobs_from_logits", "linear_logprobs", "token_rewards", "gae", "masked_whiten",
             "ppo_policy_loss", "ppo_value_loss", "dpo_loss"]
NO_GPU = 2


def no_gpu_reason():
    """Why this machine cannot run the check (None when a CUDA GPU is visible to torch)."""
    import torch
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return (f"no CUDA GPU is visible (torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    return None


def test_files():
    """Every test file with GPU tests (it uses conftest's needs_gpu), and ALWAYS_TESTED: a new file of GPU
    tests is run without being listed here."""
    def has_gpu_tests(f):
        with open(os.path.join(TESTS, f)) as fh:
            return "needs_gpu" in fh.read()
    found = {f for f in os.listdir(TESTS) if f.startswith("test_") and f.endswith(".py") and has_gpu_tests(f)}
    return sorted(found | set(ALWAYS_TESTED))


def _env():
    # explicit, so that no TRITON_INTERPRET=1 of the caller's shell makes the GPU triton tests interpreted
    # (tests/conftest.py keeps an explicit setting; unset, it also picks 0 when a GPU is visible)
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_tests():
    """(exit code, pytest's summary with the reasons of every skip)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        *[os.path.join("tests", f) for f in test_files()]], cwd=ROOT, env=_env(), capture_output=True,
                       text=True)
    lines = r.stdout.strip().splitlines()
    keep = [ln for ln in lines if ln.startswith(("SKIPPED", "FAILED", "ERROR"))] + lines[-1:]
    return r.returncode, "\n".join(keep)


def run_bench(quick):
    """(exit code, the tables `python -m bench` prints on this GPU)."""
    cmd = [sys.executable, "-m", "bench", "--only", *BENCH_OPS] + (["--quick"] if quick else [])
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    return r.returncode, r.stdout + (f"\n(stderr tail)\n{r.stderr[-3000:]}" if r.returncode else "")


def head_memory(N=2048, H=4096, V=128256):
    """Markdown rows: peak bytes beyond the inputs of linear_logprobs forward + backward, bf16, per backend."""
    import torch

    import rlhf_kernels as rk

    from .common import peak_bytes

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(V, H, device="cuda", generator=g, dtype=torch.bfloat16) / H ** 0.5).requires_grad_(True)
    tok = torch.randint(0, V, (N,), device="cuda", generator=g)

    def naive():
        logp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, tok[:, None]).squeeze(-1)
        torch.autograd.grad(logp.sum(), (h, w))

    fns = {"naive (matmul, log_softmax, gather)": naive}
    for b in ("triton", "cuda"):
        if rk.available_backends()[b] == "available":
            fns[f"rk {b}"] = lambda b=b: torch.autograd.grad(rk.linear_logprobs(h, w, tok, backend=b).sum(), (h, w))
    rows = [f"linear_logprobs forward + backward, N={N} H={H} V={V} bf16 (inputs {(N + V) * H * 2 / 2 ** 20:.0f} MiB; "
            f"the gradients of hidden and weight are outputs and count)", "", "| impl | peak MiB beyond the inputs |",
            "|---|---|"]
    for name, fn in fns.items():
        try:
            fn()  # compile / warm up first: the peak is the steady state's
            rows.append(f"| {name} | {peak_bytes(fn) / 2 ** 20:.0f} |")
        except Exception as e:  # e.g. out of memory for the naive composition on a small GPU
            rows.append(f"| {name} | failed: {type(e).__name__}: {' '.join(str(e).split())[:160]} |")
        torch.cuda.empty_cache()
    return "\n".join(rows) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check_results.md")
    p.add_argument("--quick", action="store_true", help="the benchmarks' small sizes")
    a = p.parse_args(argv)
    why = no_gpu_reason()
    if why:
        print(f"gpu-check: NO GPU VISIBLE: {why}.\ngpu-check: nothing was run and no results were written; run "
              "`make gpu-check` on a machine with an NVIDIA GPU.", file=sys.stderr)
        return NO_GPU
    import torch

    from .common import machine
    parts = [f"# GPU check: {torch.cuda.get_device_name()}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", "",
             f"machine: {machine()}", "", "Command: `make gpu-check` (python -m bench.gpu_check"
             + (" --quick" if a.quick else "") + ")", ""]
    code, text = run_tests()
    parts += ["## GPU tests (TRITON_INTERPRET=0)", "", "```", text, "```", ""]
    bcode, tables = run_bench(a.quick)
    parts += ["## Benchmarks on this GPU (measured)", "", tables, ""]
    parts += ["## Peak memory, measured", "", head_memory()]
    with open(a.out, "w") as f:
        f.write("\n".join(parts))
    print("\n".join(parts))
    print(f"gpu-check: wrote {a.out}" + ("" if code == 0 and bcode == 0 else " (tests or benchmarks FAILED)"))
    return 0 if code == 0 and bcode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
