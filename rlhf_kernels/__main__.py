"""`python -m rlhf_kernels` is the `rlhf-kernels` command (see rlhf_kernels/train/cli.py)."""
import sys

from .train.cli import main

if __name__ == "__main__":
    sys.exit(main())
