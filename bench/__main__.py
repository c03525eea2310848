"""python -m bench [--quick] [--only NAME ...] [--csv DIR] [--plot DIR]: run the benchmarks, print one
table per op (also `rlhf-kernels bench ...`, from a checkout or an installed wheel)."""
import argparse
import importlib
import time

from .common import TABLES, machine, measure_ceilings

ALL = ["token_kl", "logprobs_from_logits", "linear_logprobs", "token_rewards", "gae", "masked_whiten",
       "group_advantages", "rollout_correction", "ppo_policy_loss", "ppo_value_loss", "dpo_loss", "train_step"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="rlhf-kernels bench" if __package__ == "rlhf_kernels.bench" else "python -m bench")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    p.add_argument("--only", nargs="*", default=None, choices=ALL)
    p.add_argument("--csv", default=None, help="write one CSV per table into this folder")
    p.add_argument("--plot", default=None, help="write one PNG bar chart per table into this folder")
    a = p.parse_args(argv)
    if a.plot:
        try:
            import matplotlib  # noqa: F401  (checked up front: a missing plotter must not cost a whole run)
        except ImportError as e:
            p.error(f"--plot needs matplotlib ({e}); pip install matplotlib")
    print(f"machine: {machine()}", flush=True)
    ceilings = measure_ceilings(a.quick)  # once, so every table is read against the same ceilings
    print(f"ceilings measured in this run: {ceilings}\n", flush=True)
    for name in a.only or ALL:
        wall, cpu = time.perf_counter(), time.process_time()
        importlib.import_module(f".bench_{name}", __package__).run(quick=a.quick, csv_dir=a.csv, ceilings=ceilings)
        # CPU time too: on a shared machine it, not the wall time, says what an idle run would take
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"({name}: {wall:.0f} s wall, {cpu:.0f} s CPU in this process)\n", flush=True)
    if a.plot:
        from .plot import plot_all
        for path in plot_all(TABLES, a.plot):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    main()
