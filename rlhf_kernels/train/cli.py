"""Command line: `rlhf-kernels train {sft,rm,ppo,dpo,rto,cartpole} [--config FILE] [--key=value ...] --out DIR`
and `rlhf-kernels demo [--out DIR]` (also `python -m rlhf_kernels`)."""
import json
import sys

from .config import CONFIGS, ConfigError, build
from .runlog import CheckpointError, TrainingDiverged

USAGE = """usage:
  rlhf-kernels train {sft,rm,ppo,dpo,rto,rrhf,cartpole} [--config FILE] [--key=value ...] --out DIR
  rlhf-kernels demo [--out DIR] [--seed N]
  rlhf-kernels generate --policy=DIR [--mcts --critic=DIR [--reward_model=DIR] [--simulations=S] ...] [--out FILE]
  rlhf-kernels bon --policy=DIR --reward_model=DIR[,DIR...] [--n=16] [--ensemble_reduce=mean|wco|uwo] --out DIR
  rlhf-kernels experiment overoptimization [--key=value ...] --out DIR
  rlhf-kernels experiment calibration [--out DIR] [--seed N] [--full=true]
  rlhf-kernels experiment mcts [--policy=DIR --critic=DIR --reward_model=DIR] [--sweep_simulations=10,30,50] [--sweep_c_puct=8,2,1] [--out DIR]
  rlhf-kernels bench [--quick] [--only NAME ...] [--csv DIR] [--plot DIR]   (from a source checkout)
Keys are the fields of the trainer's config (rlhf_kernels/train/config.py); dashes or underscores."""


def parse_options(args):
    """(config file, {key: value string}) from `--config FILE`, `--key=value`, `--key value`, `--flag`."""
    file, overrides = None, {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a == "--":
            raise ConfigError(f"unexpected argument {a!r}; options look like --key=value")
        key, eq, value = a[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        if key == "config":
            file = value
        else:
            overrides[key.replace("-", "_")] = value
        i += 1
    return file, overrides


def trainer(kind):
    import importlib
    module = {"sft": "sft", "rm": "reward", "ppo": "ppo", "dpo": "dpo", "rto": "rto", "rrhf": "rrhf",
              "cartpole": "classic"}[kind]
    return importlib.import_module(f"rlhf_kernels.train.{module}").train


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
            return 0
        if argv[0] == "train":
            if len(argv) < 2 or argv[1] not in CONFIGS:
                raise ConfigError(f"train needs one of {', '.join(CONFIGS)}\n{USAGE}")
            file, overrides = parse_options(argv[2:])
            cfg = build(argv[1], file, overrides)
            result = trainer(argv[1])(cfg)
            print(json.dumps(result, indent=2))
            return 0
        if argv[0] == "demo":
            from .demo import run_demo
            _, opts = parse_options(argv[1:])
            unknown = set(opts) - {"out", "seed", "progress"}
            if unknown:
                raise ConfigError(f"demo takes --out, --seed and --progress, not {', '.join(sorted(unknown))}")
            run_demo(opts.get("out", "runs/demo"), seed=int(opts.get("seed", 0)),
                     progress=opts.get("progress", "true").lower() != "false")
            return 0
        if argv[0] == "generate":  # PPO-MCTS and plain decoding (generate.py)
            from .config import build_generate
            from .generate import run as run_generate
            file, overrides = parse_options(argv[1:])
            print(json.dumps(run_generate(build_generate(file, overrides)), indent=2))
            return 0
        if argv[0] in ("bon", "experiment"):  # reward-model ensembles (ALGORITHMS.md §7)
            return ensemble_command(argv)
        raise ConfigError(f"unknown command {argv[0]!r}\n{USAGE}")
    except (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError) as e:
        print(f"rlhf-kernels: error: {e}", file=sys.stderr)
        return 2


def ensemble_command(argv):
    """`bon`, `experiment overoptimization` (BoNConfig's and OveroptConfig's keys), `experiment calibration`
    and `experiment mcts`."""
    if argv[0] == "bon":
        from .bon import run_bon
        run_bon(build("bon", *parse_options(argv[1:])))
        return 0
    if len(argv) >= 2 and argv[1] == "calibration":  # PPO-C / PPO-M vs PPO (calibration_experiment.py)
        from .calibration_experiment import main as calibration_main
        calibration_main(argv[2:])
        return 0
    if len(argv) >= 2 and argv[1] == "mcts":  # PPO-MCTS vs greedy and sampled decoding (mcts_experiment.py)
        from . import mcts_experiment
        mcts_experiment.run_experiment(mcts_experiment.build(*parse_options(argv[2:])))
        return 0
    if len(argv) < 2 or argv[1] != "overoptimization":
        raise ConfigError(f"experiment needs a name: overoptimization, calibration or mcts\n{USAGE}")
    from .overopt import run_experiment
    run_experiment(build("overoptimization", *parse_options(argv[2:])))
    return 0
