"""Reward-model ensembles (docs/algorithms.md §7): the mean/WCO/UWO aggregations on hand-built [k, B]
scores against numpy, their validation, the best-of-n estimator, and, on the tiny task, an
ensemble trained by `train rm --ensemble=2` scoring PPO rollouts, best-of-n and the
overoptimisation experiment end to end."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from rlhf_kernels.train import ppo
from rlhf_kernels.train.cli import main
from rlhf_kernels.train.core import config
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.core.models import ScalarModel
from rlhf_kernels.train.core.runlog import Run
from rlhf_kernels.train.decode import bon
from rlhf_kernels.train.rewards.ensemble import EnsembleRM, load_reward, member_dirs, reduce_scores

from train_helpers import PPO_FAST, metrics

SCORES = [[0.5, -1.0, 2.0, 0.0], [1.5, -3.0, 2.0, 4.0], [-0.5, 0.5, 2.0, 1.0]]


def test_reductions_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert reduce_scores(s, "mean").tolist() == [2.0, 4.0]
    assert reduce_scores(s, "wco").tolist() == [1.0, 2.0]
    # variance /k: [1, 4]; /(k-1): [2, 8]
    assert reduce_scores(s, "uwo", uwo_lambda=0.5).tolist() == [1.5, 2.0]
    assert reduce_scores(s, "uwo", uwo_lambda=0.5, unbiased=True).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 2.0])
def test_reductions_match_numpy(lam):
    x = np.array(SCORES)
    s = torch.tensor(SCORES, dtype=torch.float64)
    np.testing.assert_allclose(reduce_scores(s, "mean").numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(reduce_scores(s, "wco").numpy(), x.min(0), rtol=1e-12)
    np.testing.assert_allclose(reduce_scores(s, "uwo", lam).numpy(), x.mean(0) - lam * np.var(x, 0), rtol=1e-12)
    np.testing.assert_allclose(reduce_scores(s, "uwo", lam, unbiased=True).numpy(),
                               x.mean(0) - lam * np.var(x, 0, ddof=1), rtol=1e-12)


def test_single_member_and_validation():
    one = torch.tensor([[0.3, -2.0]])
    for reduce in ("mean", "wco", "uwo"):
        assert reduce_scores(one, reduce, 0.5).tolist() == one[0].tolist()  # biased Var of one score is 0
    with pytest.raises(ValueError, match="uwo_unbiased.*k=1"):
        reduce_scores(one, "uwo", 0.5, unbiased=True)
    with pytest.raises(ValueError, match="ensemble_reduce.*mean, wco, uwo.*'max'"):
        reduce_scores(one, "max")
    with pytest.raises(ValueError, match=r"\[k, B\]"):
        reduce_scores(torch.zeros(3), "mean")
    with pytest.raises(ValueError, match="uwo_unbiased"):
        EnsembleRM([torch.nn.Identity()], "uwo", unbiased=True)


@pytest.mark.parametrize("kind,key,value,match", [
    ("ppo", "ensemble_reduce", "max", "ensemble_reduce must be one of mean, wco, uwo"),
    ("ppo", "uwo_lambda", "-1", "uwo_lambda must be >= 0"),
    ("rm", "ensemble", "0", "ensemble must be >= 1"),
    ("bon", "n", "0", "n must be >= 1"),
    ("overoptimization", "runs", "single,max", "runs must be"),
    ("overoptimization", "rm_label_noise", "0.5", "rm_label_noise must be in"),
])
def test_config_validation(kind, key, value, match):
    with pytest.raises(config.ConfigError, match=match):
        build(kind, None, {key: value})


def test_best_of_n_estimator_is_the_subset_average():
    """The weighted estimator equals brute force over every m-subset of each prompt's samples."""
    g = torch.Generator().manual_seed(0)
    n, P = 6, 5
    proxy, gold = torch.randn(n, P, generator=g), torch.rand(n, P, generator=g)
    rows = bon.bon_table(proxy, gold, [1, 2, 3, 6])
    for r in rows:
        m = r["n"]
        want_g, want_p = [], []
        for p in range(P):
            best = [max(c, key=lambda i: proxy[i, p]) for c in itertools.combinations(range(n), m)]
            want_g.append(np.mean([gold[i, p].item() for i in best]))
            want_p.append(np.mean([proxy[i, p].item() for i in best]))
        assert r["gold_reward"] == pytest.approx(np.mean(want_g), abs=1e-12)
        assert r["proxy_reward"] == pytest.approx(np.mean(want_p), abs=1e-12)
        assert r["kl_bon"] == pytest.approx(math.log(m) - (m - 1) / m)
    assert rows[0]["gold_reward"] == pytest.approx(gold.double().mean().item())
    assert bon.sizes_up_to(16) == [1, 2, 4, 8, 16] and bon.sizes_up_to(6) == [1, 2, 4, 6]


def test_member_dirs(tmp_path):
    for i in (0, 2, 10):
        (tmp_path / "ens" / f"member_{i}" / "model").mkdir(parents=True)
    assert member_dirs(str(tmp_path / "ens")) == [str(tmp_path / "ens" / f"member_{i}" / "model") for i in (0, 2, 10)]
    assert member_dirs(" a, b ,c") == ["a", "b", "c"]
    with pytest.raises(config.ConfigError, match="reward_model"):
        member_dirs(" , ")


def opts(d):
    return [f"--{k}={v}" for k, v in d.items()]


TINY_PPO = {**PPO_FAST, "batch_size": 4, "minibatches": 1, "micro_batch_size": 4, "epochs": 1, "save_every": 25}
TINY_EXPERIMENT = {**TINY_PPO, "sft_steps": 2, "members": 2, "rm_pairs": 16, "rm_steps": 2, "eval_every": 1}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """The overoptimisation experiment at a tiny size: SFT, a 2-member ensemble, three PPO runs."""
    out = tmp_path_factory.mktemp("overopt")
    assert main(["experiment", "overoptimization", *opts(TINY_EXPERIMENT), "--out", str(out)]) == 0
    return out


def test_experiment_writes_plot_and_table(experiment, capsys):
    out = experiment
    assert (out / "overoptimization.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["single", "wco", "uwo"]
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 4  # header + three runs
    for name in ("single", "wco", "uwo"):
        rows = metrics(out / f"ppo_{name}")
        assert [r["step"] for r in rows] == [1, 2] and all("gold_reward" in r and "score" in r for r in rows)
        assert summary["runs"][name]["final_proxy"] == rows[-1]["score"]
        assert summary["runs"][name]["peak_gold"] == max(r["eval_gold_reward"] for r in rows)
        assert (out / f"ppo_{name}" / "curves.png").exists()
    # the ensemble runs log member statistics, the single-RM run does not
    assert "proxy_member_std" in metrics(out / "ppo_wco")[0] and "proxy_member_std" not in metrics(out / "ppo_single")[0]
    # both members saw the same data (same held-out accuracy set and pairs) but differ by seed
    rm_cfgs = [json.loads((out / "rms" / f"member_{i}" / "config.json").read_text()) for i in (0, 1)]
    assert [c["seed"] for c in rm_cfgs] == [0, 1] and [c["data_seed"] for c in rm_cfgs] == [0, 0]
    heads = [ScalarModel.load(d).head.weight for d in member_dirs(str(out / "rms"))]
    assert not torch.equal(*heads)


def test_ppo_scores_with_the_ensemble(experiment, tmp_path):
    """PPO's score of its rollouts is the aggregate of the members' own scores."""
    out = experiment
    dirs = member_dirs(str(out / "rms"))
    cfg = build("ppo", None, {**TINY_PPO, "policy": str(out / "sft" / "model"), "reward_model": str(out / "rms"),
                                     "ensemble_reduce": "wco", "uwo_lambda": 0.7, "out": str(tmp_path / "p")})
    trainer = ppo.PPO(cfg)
    trainer.run = Run(cfg, "ppo")
    ex = trainer.make_experience(1, torch.Generator().manual_seed(0))
    s = ex["samples"]
    with torch.no_grad():
        each = torch.stack([ScalarModel.load(d).score(s.ids, s.attn) for d in dirs])
    assert torch.allclose(trainer.score(s), each.amin(0), atol=1e-6)
    assert ex["stats"]["score"] == pytest.approx(each.amin(0).mean().item(), abs=1e-5)
    assert ex["stats"]["proxy_member_mean"] == pytest.approx(each.mean().item(), abs=1e-5)
    trainer.rm.reduce = "uwo"
    assert torch.allclose(trainer.score(s), each.mean(0) - 0.7 * each.var(0, correction=0), atol=1e-6)
    # the critic starts from member 0
    assert torch.equal(trainer.critic.head.weight, ScalarModel.load(dirs[0]).head.weight)


def test_uwo_unbiased_needs_two_members(experiment):
    one = member_dirs(str(experiment / "rms"))[0]
    cfg = build("ppo", None, {"reward_model": one, "ensemble_reduce": "uwo", "uwo_unbiased": "true"})
    with pytest.raises(config.ConfigError, match="uwo_unbiased.*2 reward models"):
        load_reward(cfg)
    cfg.uwo_unbiased = False
    assert isinstance(load_reward(cfg), ScalarModel)  # one RM: the plain reward model, as before


def test_bon_command(experiment, tmp_path, capsys):
    out = experiment
    args = {"policy": out / "sft" / "model", "reward_model": out / "rms", "n": 4, "ensemble_reduce": "wco",
            "eval_prompts": 6, "max_new_tokens": 6, "progress": False}
    assert main(["bon", *opts(args), "--out", str(tmp_path / "bon")]) == 0
    result = json.loads((tmp_path / "bon" / "result.json").read_text())
    rows = result["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4]
    proxies = [r["proxy_reward"] for r in rows]
    assert proxies == sorted(proxies)  # the expected best of more samples is never lower
    assert (tmp_path / "bon" / "curves.png").stat().st_size > 0
    assert "| 4 | 0.64 |" in capsys.readouterr().out
    assert main(["bon", "--policy", str(out / "sft" / "model"), "--out", str(tmp_path / "b2")]) == 2
    assert "reward_model" in capsys.readouterr().err
