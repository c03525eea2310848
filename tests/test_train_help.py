"""`rlhf-kernels COMMAND --help`: every key of the command's config, grouped by topic, with its type,
default, allowed values and the help its field declares; and mistyped keys get a suggestion."""
import dataclasses
import json
import typing

import pytest

from rlhf_kernels import _choices
from rlhf_kernels.train.cli import main
from rlhf_kernels.train.core.commands import registry
from rlhf_kernels.train.core.config import ConfigError, _metadata, describe

COMMANDS = sorted(registry())


def test_the_registry_holds_every_command():
    assert {"train sft", "train rm", "train ppo", "train dpo", "train rto", "train rrhf", "train grpo", "train cartpole",
            "demo", "generate", "bon", "experiment overoptimization", "experiment calibration",
            "experiment mcts"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_key_has_a_topic_and_a_one_line_help(name):
    cls = registry()[name].config
    for f in dataclasses.fields(cls):
        meta = _metadata(cls, f.name)
        assert meta.get("help", "").strip() and "\n" not in meta["help"], (name, f.name)
        assert meta.get("topic"), (name, f.name)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_key(name, flag, capsys):
    assert main([*name.split(), flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhf-kernels {name} ")
    cls = registry()[name].config
    for f in dataclasses.fields(cls):
        default = "null" if f.default is None else json.dumps(f.default)
        assert f"--{f.name}=" in out and f"(default {default})" in out, f.name
        assert _metadata(cls, f.name)["help"] in out, f.name


def test_ppo_help_groups_keys_and_lists_allowed_values(capsys):
    assert main(["train", "ppo", "--kl_coef=0.1", "--help"]) == 0  # --help wins over the other options
    out = capsys.readouterr().out
    topics = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert "KL penalty:" in topics and "PPO update:" in topics and "run:" in topics
    kl = out.index("KL penalty:")
    assert out.index("--kl_coef=float  (default 0.05)") > kl
    assert f"--kl_estimator={'|'.join(typing.get_args(_choices.KLEstimator))}  (default \"k1\")" in out
    assert "--clip_high=float or null  (default null)" in out
    assert "--aggregation=token-mean|seq-mean-token-mean|seq-mean-token-sum|token-sum" in out


def test_a_subclass_default_keeps_the_base_help():
    text = describe(registry()["train rto"].config)
    assert "--kl_coef=float  (default 0.01)" in text  # RTO's β2 changes only the default
    assert "weight of the per-token KL penalty" in text


def test_top_level_and_group_help(capsys):
    for argv in (["--help"], ["-h"], [], ["train", "--help"], ["experiment", "-h"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "train ppo" in out and "experiment mcts" in out and "bench" in out


def test_mistyped_key_suggests_the_closest(capsys):
    assert main(["train", "ppo", "--kl_coeff=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'kl_coeff' for 'ppo' (did you mean 'kl_coef'?)" in err and "valid keys" in err
    with pytest.raises(ConfigError, match="did you mean 'eval_every'"):
        registry()["train sft"].build(None, {"eval-evry": 3})
    assert main(["train", "ppo", "--zzzz=1"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_unknown_commands_name_the_choices(capsys):
    assert main(["train", "ppx"]) == 2
    assert "train needs one of: cartpole, dpo, grpo, ppo" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
