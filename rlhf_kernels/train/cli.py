"""Command line: `rlhf-kernels COMMAND [--config FILE] [--key=value ...]` for every command of the
registry (core/commands.py: `train sft`, `train ppo`, ..., `demo`, `generate`, `bon`, `experiment
...`), `rlhf-kernels COMMAND --help` for its keys; also `python -m rlhf_kernels`."""
import json
import os
import sys

from .core.commands import registry
from .core.config import ConfigError, describe
from .core.parallel import world_size
from .core.runlog import CheckpointError, TrainingDiverged

HELP_FLAGS = ("-h", "--help")


def usage():
    commands = registry()
    width = max(len(name) for name in commands)
    lines = ["usage: rlhf-kernels COMMAND [--config FILE] [--key=value ...]", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {c.summary}" for name, c in commands.items()]
    lines += [f"  {'bench':<{width}}  microbenchmarks of every op (`rlhf-kernels bench --help`)", "",
              "`rlhf-kernels COMMAND --help` lists the command's keys (`--key=value`, `--key value`, `--key` for "
              "true; dashes or underscores); `--config FILE` reads them from a JSON or YAML file first."]
    return "\n".join(lines)


def command_help(command):
    return (f"usage: rlhf-kernels {command.name} [--config FILE] [--key=value ...]\n{command.summary}\n\n"
            f"{describe(command.config)}")


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


def split_command(argv):
    """(Command, the rest of argv) for the longest command name that starts argv."""
    commands = registry()
    for n in (2, 1):
        name = " ".join(argv[:n])
        if len(argv) >= n and name in commands:
            return commands[name], argv[n:]
    group = [name for name in commands if name.split()[0] == argv[0]]
    if group:
        raise ConfigError(f"{argv[0]} needs one of: {', '.join(name.split()[1] for name in group)}\n\n{usage()}")
    raise ConfigError(f"unknown command {argv[0]!r}\n\n{usage()}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] in HELP_FLAGS or (len(argv) == 2 and argv[1] in HELP_FLAGS and
                                                 any(name.startswith(argv[0] + " ") for name in registry())):
            print(usage())
            return 0
        command, rest = split_command(argv)
        if any(a in HELP_FLAGS for a in rest):
            print(command_help(command))
            return 0
        if world_size() > 1 and not command.data_parallel:
            runs = ", ".join(c.name for c in registry().values() if c.data_parallel)
            raise ConfigError(f"{command.name} does not run data-parallel: run it without torchrun (or with "
                              f"--nproc_per_node=1); these do: {runs} (docs/distributed.md)")
        cfg = command.build(*parse_options(rest))
        result = command.run(cfg)
        if command.print_result and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0 alone
            print(json.dumps(result, indent=2))
        return 0
    except (ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError) as e:
        print(f"rlhf-kernels: error: {e}", file=sys.stderr)
        return 2
