"""`python -m rlhf_kernels` is the `rlhf-kernels` command: `bench` runs the benchmarks (bench/, shipped in the
wheel as rlhf_kernels.bench); everything else is the trainer's CLI (rlhf_kernels/train/cli.py)."""
import importlib.util
import os
import sys

from .train.cli import main as train_main


def bench_root():
    """The source checkout holding bench/ next to this package (an editable or in-place install), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "bench", "__main__.py")) else None


def bench_package():
    """Where the benchmarks are imported from: the checkout's bench/ (so edits there run as they are),
    else the copy an installed wheel carries as rlhf_kernels.bench; None when neither exists."""
    root = bench_root()
    if root is not None:
        if root not in sys.path:
            sys.path.insert(0, root)
        return "bench"
    return "rlhf_kernels.bench" if importlib.util.find_spec("rlhf_kernels.bench") is not None else None


def bench_main(argv):
    package = bench_package()
    if package is None:
        here = os.path.dirname(os.path.abspath(__file__))
        print(f"rlhf-kernels: error: the benchmarks are neither in this install ({here}/bench, which a wheel "
              f"carries) nor in a source checkout's bench/ next to it. Reinstall from the sdist or wheel, or "
              f"run `python -m bench` from the checkout's root.", file=sys.stderr)
        return 2
    run_benchmarks = importlib.import_module(f"{package}.__main__").main
    return run_benchmarks(argv) or 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
