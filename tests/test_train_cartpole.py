"""Classic-RL PPO on CartPole: the environment's equations, the bootstrap and dones fed to rk.gae, the
CLI run (metrics, checkpoint, curves, resume), and that the default recipe solves CartPole-v1."""
import json
import math

import pytest
import torch

from rlhf_kernels.train import cartpole
from rlhf_kernels.train.cli import main
from rlhf_kernels.train.core import config
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.tasks import cartpole as cartpole_env

from train_helpers import interrupt_then_resume


def test_dynamics_hand_computed_from_rest():
    # θ = 0, pushed right: temp = F/M = 100/11, θ̈ = −temp / (l(4/3 − m/M)) = −600/41,
    # ẍ = temp − m·l·θ̈/M = 400/41; Euler moves the velocities only (positions use the old, zero ones)
    nxt = cartpole_env.dynamics(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([1]))
    torch.testing.assert_close(nxt, torch.tensor([[0.0, 0.02 * 400 / 41, 0.0, -0.02 * 600 / 41]], dtype=torch.float64))
    left = cartpole_env.dynamics(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([0]))
    torch.testing.assert_close(left, -nxt)


def test_dynamics_match_the_equations():
    x, xd, th, thd = 0.3, -0.7, 0.1, 0.5
    g, mc, mp, l, f, tau = 9.8, 1.0, 0.1, 0.5, -10.0, 0.02  # noqa: E741 (l: the pole length); action 0 pushes left
    M = mc + mp
    temp = (f + mp * l * thd ** 2 * math.sin(th)) / M
    thacc = (g * math.sin(th) - math.cos(th) * temp) / (l * (4 / 3 - mp * math.cos(th) ** 2 / M))
    xacc = temp - mp * l * thacc * math.cos(th) / M
    exp = torch.tensor([[x + tau * xd, xd + tau * xacc, th + tau * thd, thd + tau * thacc]], dtype=torch.float64)
    got = cartpole_env.dynamics(torch.tensor([[x, xd, th, thd]], dtype=torch.float64), torch.tensor([0]))
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_termination_truncation_and_reset():
    g = torch.Generator().manual_seed(0)
    env = cartpole_env.CartPole(3, max_steps=2, generator=g)
    env.state = torch.tensor([[2.399, 1.0, 0.0, 0.0],                  # leaves the track this step
                              [0.0, 0.0, 12 * math.pi / 180 - 1e-4, 1.0],  # the pole passes 12°
                              [0.0, 0.0, 0.0, 0.0]])
    s = env.step(torch.tensor([1, 1, 0]), g)
    assert s.terminated.tolist() == [True, True, False] and not s.truncated.any()
    assert s.episode_return.tolist() == [1.0, 1.0, 0.0]
    assert s.final_obs[0, 0] > 2.4 and (s.obs[:2].abs() <= 0.05).all()  # failed ones restart
    s = env.step(torch.tensor([1, 0, 1]), g)
    assert s.truncated.tolist() == [False, False, True] and s.episode_return[2] == 2.0  # the cap of 2 steps
    assert env.length.tolist() == [1, 1, 0]


def test_gae_inputs_bootstrap_truncation_and_row_end():
    # one row of 4 steps: a truncation at t=1 (next state's value 10), a termination at t=2, the row
    # ends at t=3 with the episode still running (value after it 20)
    r = torch.ones(1, 4, dtype=torch.float64)
    term = torch.tensor([[False, False, True, False]])
    trunc = torch.tensor([[False, True, False, False]])
    final_v = torch.tensor([[0.0, 10.0, 99.0, 0.0]], dtype=torch.float64)  # 99 at the termination is never used
    next_v = torch.tensor([20.0], dtype=torch.float64)
    g = 0.5
    rb, dones = cartpole.gae_inputs(r, term, trunc, final_v, next_v, g, "bootstrap")
    assert rb.tolist() == [[1.0, 1 + g * 10, 1.0, 1 + g * 20]] and dones.tolist() == [[False, True, True, False]]
    rd, _ = cartpole.gae_inputs(r, term, trunc, final_v, next_v, g, "done")
    assert rd.tolist() == [[1.0, 1.0, 1.0, 1 + g * 20]]
    # through rk.gae with V = 2 everywhere and λ = 1: t=3: A = 11 − 2; t=2: A = 1 − 2; t=1: A = 6 − 2;
    # t=0: δ = 1 + 0.5·2 − 2 = 0, A = 0 + 0.5·4 = 2
    import rlhf_kernels as rk
    v = torch.full((1, 4), 2.0, dtype=torch.float64)
    adv, ret = rk.gae(rb, v, torch.ones(1, 4, dtype=torch.bool), gamma=g, lam=1.0, dones=dones)
    assert adv.tolist() == [[2.0, 4.0, -1.0, 9.0]] and ret.tolist() == [[4.0, 6.0, 1.0, 11.0]]


def test_config_errors():
    with pytest.raises(config.ConfigError, match="truncation"):
        build("cartpole", None, {"truncation": "ignore"})
    with pytest.raises(config.ConfigError, match="minibatches"):
        build("cartpole", None, {"envs": 3, "horizon": 5, "minibatches": 4})
    with pytest.raises(config.ConfigError, match="envs"):
        build("cartpole", None, {"envs": 0})


SMALL = ["--progress=false", "--envs=4", "--horizon=16", "--minibatches=2", "--epochs=2", "--save_every=1",
         "--eval_every=2", "--eval_episodes=4", "--max_episode_steps=50"]


def _rows(d):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "step_time_s", "peak_mem_mb")}
            for line in (d / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_and_resume(tmp_path, monkeypatch):
    assert main(["train", "cartpole", *SMALL, "--steps=3", "--out", str(tmp_path / "straight")]) == 0
    d = tmp_path / "straight"
    assert (d / "curves.png").stat().st_size > 0 and torch.load(d / "checkpoint.pt", weights_only=True)["step"] == 3
    rows = _rows(d)
    assert [r["step"] for r in rows] == [1, 2, 3] and "eval_return" in rows[1]
    assert {"episode_return", "episodes", "env_steps", "pg_loss", "vf_loss", "clipfrac", "approx_kl"} <= set(rows[0])
    assert json.loads((d / "result.json").read_text())["env_steps"] == 3 * 4 * 16
    # a run stopped after step 2 and resumed gives the same metrics: the environments are checkpointed too
    assert interrupt_then_resume(monkeypatch, cartpole.ClassicPPO, 3, lambda: main(
        ["train", "cartpole", *SMALL, "--steps=3", "--out", str(tmp_path / "resumed")])) == 0
    assert _rows(tmp_path / "resumed") == rows


def test_default_recipe_solves_cartpole(tmp_path):
    """CartPole-v1's solved score, 475, as the mean return of 100 evaluation episodes of the sampling
    policy (the training-episode average lags behind; the README's CLI run reports when it gets there)."""
    cfg = build("cartpole", None, {"out": str(tmp_path / "run"), "progress": False, "eval_episodes": 100,
                                          "eval_every": 1000})
    out = cartpole.train(cfg)
    assert out["eval_return"] >= 475, out
    rows = _rows(tmp_path / "run")
    assert rows[0]["episode_return"] < 100  # it starts far from solved
