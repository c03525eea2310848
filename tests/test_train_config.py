import json

import pytest

from rlhf_kernels.train.cli import main, parse_options
from rlhf_kernels.train.core import config
from rlhf_kernels.train.core.commands import build


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\nkl_estimator: k3\nclip_high: 0.28\n")
    cfg = build("ppo", f, {"steps": "7", "dual-clip": "3", "whiten_rewards": "true", "kl_target": "none"})
    assert (cfg.lr, cfg.kl_estimator, cfg.clip_high, cfg.steps, cfg.dual_clip, cfg.whiten_rewards) == \
        (0.01, "k3", 0.28, 7, 3.0, True)
    assert cfg.kl_target is None
    assert build("dpo", None, {"loss_type": "ipo"}).loss_type == "ipo"
    # YAML 1.1 reads exponent notation without a dot as a string; a float key still takes it
    assert build("ppo", None, {"lr": "5e-3", "critic_lr": "1E-4"}).lr == 0.005
    f.write_text("lr: 3e-4\n")
    assert build("ppo", f).lr == 3e-4


def test_json_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"beta": 0.3, "reference_free": True}))
    cfg = build("dpo", f)
    assert cfg.beta == 0.3 and cfg.reference_free


@pytest.mark.parametrize("name,text", [("bad.json", "{\"lr\": 1e-3,"), ("bad.yaml", "lr: [1, 2\n"),
                                       ("list.yaml", "- 1\n- 2\n")])
def test_unparseable_file_names_it(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=name):
        build("sft", f)


def test_yaml_is_data_only(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(config.ConfigError, match="evil.yaml"):
        build("sft", f)


def test_missing_file():
    with pytest.raises(config.ConfigError, match="nope.yaml"):
        build("sft", "nope.yaml")


def test_unknown_key_lists_valid_ones():
    with pytest.raises(config.ConfigError, match=r"unknown key 'lrr'.*valid keys:.*\blr\b.*kl_coef"):
        build("ppo", None, {"lrr": "1"})


@pytest.mark.parametrize("key,value,match", [("lr", "abc", "lr must be float"), ("steps", "1.5", "steps must be int"),
                                             ("kl_estimator", "k4", "k1, k2, k3"), ("steps", "0", "steps must be >= 1"),
                                             ("dual_clip", "0.5", "dual_clip must be > 1"),
                                             ("minibatches", "3", "divisible"), ("aggregation", "mean", "token-mean")])
def test_bad_values(key, value, match):
    with pytest.raises(config.ConfigError, match=match):
        build("ppo", None, {key: value})


def test_rto_needs_dpo_model():
    with pytest.raises(config.ConfigError, match="dpo_model"):
        build("rto", None, {})


def test_cli_options_and_errors(tmp_path, capsys):
    assert parse_options(["--config", "a.yaml", "--lr=0.1", "--out", "d", "--progress"]) == \
        ("a.yaml", {"lr": "0.1", "out": "d", "progress": "true"})
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["train", "sft", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main(["train", "nope"]) == 2
    assert main(["train", "sft", "--bogus=1", "--out", str(tmp_path / "o")]) == 2
    assert "valid keys" in capsys.readouterr().err
