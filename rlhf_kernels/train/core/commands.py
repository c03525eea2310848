"""The command registry: every command is a `Command` declared next to the code it runs (a module's
`COMMAND`), found by walking this package, so the CLI, `--help` and `build` share one list."""
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from .config import ConfigError, build as build_config


@dataclass(frozen=True)
class Command:
    name: str              # the words after `rlhf-kernels`: "train ppo", "bon", "experiment mcts", ...
    config: type           # its config dataclass (keys, help, checks)
    run: Callable          # run(cfg) -> result
    summary: str           # one line for the list of commands
    print_result: bool = False  # print run()'s result as JSON
    data_parallel: bool = False  # runs under torchrun with several processes (docs/distributed.md)

    @property
    def kind(self):
        """What config errors call the command: its name without `train`."""
        return self.name.removeprefix("train ")

    def build(self, file=None, overrides=None):
        return build_config(self.config, file, overrides, kind=self.kind)


_REGISTRY = None


def registry():
    """{name: Command} of every module of rlhf_kernels.train that declares a COMMAND."""
    global _REGISTRY
    if _REGISTRY is None:
        package = importlib.import_module(__name__.rsplit(".", 2)[0])
        found = {}
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            command = getattr(importlib.import_module(info.name), "COMMAND", None)
            if command is not None:
                if command.name in found:
                    raise RuntimeError(f"two modules declare the command {command.name!r}")
                found[command.name] = command
        _REGISTRY = dict(sorted(found.items()))
    return _REGISTRY


def find(kind):
    """The command named `kind`, or the one whose last word is `kind` ("ppo" is "train ppo")."""
    commands = registry()
    if kind in commands:
        return commands[kind]
    matches = [c for c in commands.values() if c.kind == kind or c.name.split()[-1] == kind]
    if len(matches) != 1:
        trainers = [c.kind for c in commands.values() if c.name.startswith("train ")]
        raise ConfigError(f"unknown trainer {kind!r}; expected one of {', '.join(trainers)}")
    return matches[0]


def build(kind, file=None, overrides=None):
    """The checked config of command `kind` ("ppo", "train ppo", "bon", ...) from its defaults, a
    preset, `file` and `overrides`."""
    return find(kind).build(file, overrides)
