"""`python -m rlhf_kernels` is the `rlhf-kernels` command: `bench` runs the benchmarks of the source
checkout (bench/); everything else is the trainer's CLI (rlhf_kernels/train/cli.py)."""
import os
import sys

from .train.cli import main as train_main


def bench_root():
    """The source checkout holding bench/ next to this package (an editable or in-place install), or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "bench", "__main__.py")) else None


def bench_main(argv):
    root = bench_root()
    if root is None:
        here = os.path.dirname(os.path.abspath(__file__))
        print(f"rlhf-kernels: error: the benchmarks live in the repository's bench/ folder, which is not next to "
              f"this install ({here}). Run them from a source checkout: `pip install -e .` there, then "
              f"`rlhf-kernels bench`, or `python -m bench` from the checkout's root.", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.__main__ import main as run_benchmarks
    return run_benchmarks(argv) or 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
