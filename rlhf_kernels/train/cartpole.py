"""Classic-RL PPO on CartPole (tasks/cartpole.py) with the library's PPO ops: a small categorical action
space, N vectorised environments, rows of `horizon` steps that hold several episodes.

One iteration: act for `horizon` steps in every environment (auto-reset), compute values, cut each row
at its episode ends with `rk.gae(..., dones=...)` (γ = 0.99, λ = 0.95: docs/algorithms.md §1.3, done-mask
form), whiten advantages with `rk.masked_whiten`, then `epochs` × `minibatches` updates of
`rk.ppo_policy_loss` + vf_coef·`rk.ppo_value_loss` − ent_coef·entropy over shuffled steps.

Where a row's segment stops without the pole having fallen, the value of the state reached is
bootstrapped by folding γ·V(s_next) into that step's reward:
- at the end of the row (the episode goes on in the next iteration), always; rk.gae then sees nothing
  past the row's end, so δ = r + γV(s_next) − V(s) there;
- at a truncation (the 500-step cap), with `truncation="bootstrap"` (the default), and the step is
  marked done so that the reset state's value does not leak in; `truncation="done"` treats the cap as
  a termination (no bootstrap, the common shortcut).
A termination is done with nothing bootstrapped. Log-probs are `torch.log_softmax` over the 2 actions.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import rlhf_kernels as rk

from .._choices import Truncation
from .core.commands import Command
from .core.config import ConfigError, positive, topic
from .core.optim import make_optimizer
from .core.run_config import RunConfig, evaluation_key, optim_key
from .core.runlog import Run, clip_and_step, finish, loop, step_generator
from .tasks import cartpole

RECENT = 100  # "solved" is judged on the mean return of the last 100 finished episodes


def mlp(sizes, out_gain):
    """tanh MLP, orthogonal init (gain √2 inside, `out_gain` at the output, zero biases)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        nn.init.orthogonal_(lin.weight, out_gain if i == len(sizes) - 2 else math.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs; a small output gain starts the policy near uniform."""

    def __init__(self, obs_dim, n_actions, hidden):
        super().__init__()
        self.actor = mlp([obs_dim, hidden, hidden, n_actions], 0.01)
        self.critic = mlp([obs_dim, hidden, hidden, 1], 1.0)

    def log_probs(self, obs):
        return torch.log_softmax(self.actor(obs), -1)

    def value(self, obs):
        return self.critic(obs).squeeze(-1)


def gae_inputs(rewards, terminated, truncated, final_values, next_values, gamma, truncation):
    """rewards[N, H] with the bootstraps folded in, and dones[N, H], as the module docstring says.
    final_values: V of the state each step reached (before a reset); next_values[N]: V of the state
    after the row's last step."""
    dones = terminated | truncated
    r = rewards.clone()
    if truncation == "bootstrap":
        r = r + gamma * torch.where(truncated, final_values, torch.zeros_like(final_values))
    r[:, -1] += gamma * torch.where(dones[:, -1], torch.zeros_like(next_values), next_values)
    return r, dones


class ClassicPPO:
    kind = "cartpole"

    def __init__(self, cfg):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.agent = ActorCritic(cartpole.OBS_DIM, cartpole.N_ACTIONS, cfg.hidden)
        self.optimizer = make_optimizer([(self.agent.parameters(), cfg.lr)])
        self.env = cartpole.CartPole(cfg.envs, cfg.max_episode_steps, torch.Generator().manual_seed(cfg.seed))
        # checkpointed with the run (runlog.loop's extra state): a resumed run continues the same episodes
        self.state = {"env": self.env.state_dict(), "recent_returns": [], "episodes": 0, "env_steps": 0}

    @torch.no_grad()
    def rollout(self, g):
        cfg, env = self.cfg, self.env
        N, H = cfg.envs, cfg.horizon
        obs = torch.empty(H, N, cartpole.OBS_DIM)
        final_obs = torch.empty(H, N, cartpole.OBS_DIM)
        actions = torch.empty(H, N, dtype=torch.long)
        rewards, episode_returns = torch.empty(H, N), torch.empty(H, N)
        terminated, truncated, ended = (torch.empty(H, N, dtype=torch.bool) for _ in range(3))
        o = env.obs()
        for t in range(H):
            obs[t] = o
            actions[t] = torch.multinomial(self.agent.log_probs(o).exp(), 1, generator=g).squeeze(-1)
            s = env.step(actions[t], g)
            rewards[t], terminated[t], truncated[t], final_obs[t] = s.reward, s.terminated, s.truncated, s.final_obs
            episode_returns[t], ended[t] = s.episode_return, s.terminated | s.truncated
            o = s.obs
        finished = episode_returns[ended].tolist()  # in time order
        rows = lambda x: x.transpose(0, 1).contiguous()  # [H, N, ...] -> [N, H, ...]: one row per env
        obs, actions, final_obs = rows(obs), rows(actions), rows(final_obs)
        logp_all = self.agent.log_probs(obs)
        old_logp = logp_all.gather(-1, actions[..., None]).squeeze(-1)
        values = self.agent.value(obs)
        r, dones = gae_inputs(rows(rewards), rows(terminated), rows(truncated), self.agent.value(final_obs),
                              self.agent.value(o), cfg.gamma, cfg.truncation)
        mask = torch.ones_like(dones)
        advantages, returns = rk.gae(r, values, mask, gamma=cfg.gamma, lam=cfg.lam, dones=dones)
        if cfg.whiten_advantages:
            advantages = rk.masked_whiten(advantages, mask)
        return dict(obs=obs, actions=actions, old_logp=old_logp, values=values, advantages=advantages,
                    returns=returns, finished=finished, entropy=-(logp_all.exp() * logp_all).sum(-1).mean().item())

    def step(self, step):
        cfg = self.cfg
        g = step_generator(cfg, step)
        self.env.load_state_dict(self.state["env"])
        ex = self.rollout(g)
        self.state["env"] = self.env.state_dict()
        recent = (self.state["recent_returns"] + ex["finished"])[-RECENT:]
        self.state.update(recent_returns=recent, episodes=self.state["episodes"] + len(ex["finished"]),
                          env_steps=self.state["env_steps"] + cfg.envs * cfg.horizon)
        flat = {k: ex[k].reshape(-1, *ex[k].shape[2:]) for k in ("obs", "actions", "old_logp", "values", "advantages",
                                                                  "returns")}
        n = cfg.envs * cfg.horizon
        sums = {"pg_loss": 0.0, "vf_loss": 0.0, "entropy_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0,
                "vf_clipfrac": 0.0, "grad_norm": 0.0}
        updates = 0
        for _ in range(cfg.epochs):
            for idx in torch.randperm(n, generator=g).split(n // cfg.minibatches):
                logp_all = self.agent.log_probs(flat["obs"][idx])
                logp = logp_all.gather(-1, flat["actions"][idx, None]).squeeze(-1)
                mask = torch.ones_like(logp, dtype=torch.bool)
                pg, pst = rk.ppo_policy_loss(logp, flat["old_logp"][idx], flat["advantages"][idx], mask,
                                             clip_low=cfg.clip_low)
                vf, vst = rk.ppo_value_loss(self.agent.value(flat["obs"][idx]), flat["values"][idx],
                                            flat["returns"][idx], mask, clip=cfg.vf_clip)
                entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
                loss = pg + cfg.vf_coef * vf - cfg.ent_coef * entropy
                self.run.check_finite(step, policy_loss=pg, value_loss=vf)
                loss.backward()
                sums["grad_norm"] += clip_and_step(self.run, step, self.optimizer, list(self.agent.parameters()),
                                                   cfg.max_grad_norm)
                for k, v in (("pg_loss", pg), ("vf_loss", vf), ("entropy_loss", entropy), ("clipfrac", pst["clipfrac"]),
                             ("approx_kl", pst["approx_kl"]), ("vf_clipfrac", vst["vf_clipfrac"])):
                    sums[k] += float(v.detach())
                updates += 1
        metrics = {"episode_return": sum(recent) / len(recent) if recent else float("nan"),
                   "episodes": self.state["episodes"], "env_steps": self.state["env_steps"],
                   "entropy": ex["entropy"], "value_mean": ex["values"].mean().item(),
                   "return_mean": ex["returns"].mean().item(), **{k: v / updates for k, v in sums.items()}}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["eval_return"] = self.evaluate()
        return metrics, n

    @torch.no_grad()
    def evaluate(self):
        """Mean return of `eval_episodes` fresh episodes (one per environment, run to their end) of the
        sampling policy, or of its argmax with `greedy_eval`; a separate seeded stream, so training is
        unaffected."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed + 1)
        env = cartpole.CartPole(cfg.eval_episodes, cfg.max_episode_steps, g)
        returns = torch.full((cfg.eval_episodes,), float("nan"))
        o = env.obs()
        while returns.isnan().any():
            logp = self.agent.log_probs(o)
            a = logp.argmax(-1) if cfg.greedy_eval else torch.multinomial(logp.exp(), 1, generator=g).squeeze(-1)
            s = env.step(a, g)
            ended = (s.terminated | s.truncated) & returns.isnan()
            returns = torch.where(ended, s.episode_return, returns)
            o = s.obs
        return returns.mean().item()

    def train(self):
        self.run = Run(self.cfg, self.kind)
        rows = loop(self.run, {"agent": self.agent}, self.optimizer, self.step, self.state)
        last, target = rows[-1], solved_score(self.cfg)
        # solved: the last 100 finished training episodes (once there are 100), or an evaluation, ≥ 475
        trained = next((r["env_steps"] for r in rows if r["episodes"] >= RECENT and r["episode_return"] >= target), None)
        evaluated = next((r["env_steps"] for r in rows if r.get("eval_return", -1) >= target), None)
        return finish(self.run, {"episode_return": last["episode_return"], "eval_return": last["eval_return"],
                                 "env_steps": last["env_steps"], "episodes": last["episodes"],
                                 "env_steps_to_solve": trained, "env_steps_to_solve_eval": evaluated})


def solved_score(cfg):
    """CartPole-v1's solved threshold (475 of the 500-step cap), scaled with the cap."""
    return 0.95 * cfg.max_episode_steps


@contextlib.contextmanager
def one_thread():
    """Run with one intra-op thread: these tensors are tiny, so a second thread brings only its
    synchronisation, which costs 100× the work on a loaded machine (measured: a policy forward on 32
    observations took 330 ms with 2 threads and 1.4 ms with 1 while other jobs shared the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train(cfg):
    with one_thread():
        return ClassicPPO(cfg).train()


env_key = topic("CartPole environment")
ppo_key = topic("PPO")


@dataclass
class CartPoleConfig(RunConfig):
    """Classic-RL PPO on CartPole (issue 6 item 9). Of RunConfig it uses out, seed, steps, lr,
    max_grad_norm, anneal_lr, save_every, eval_every, device, progress; the LM keys are unused."""
    steps: int = optim_key(60, "PPO iterations, each envs × horizon environment steps")
    lr: float = 2.5e-3
    max_grad_norm: Optional[float] = 0.5
    envs: int = env_key(16, "CartPoles stepped side by side (rows of the batch)")
    horizon: int = env_key(128, "steps per row and iteration; a row holds several episodes")
    max_episode_steps: int = env_key(500, "CartPole-v1's cap; reaching it truncates the episode")
    truncation: Truncation = env_key("bootstrap", "bootstrap: fold γ·V(final state) into the capped step; "
                                              "done: treat as terminal")
    epochs: int = ppo_key(4, "update epochs per iteration")
    minibatches: int = ppo_key(4, "minibatches per epoch")
    gamma: float = ppo_key(0.99, "discount γ")
    lam: float = ppo_key(0.95, "GAE λ")
    clip_low: float = ppo_key(0.2, "ε of the clipped ratio")
    vf_clip: Optional[float] = ppo_key(None, "value clip ε_v; returns reach ~100 here, so 0.2 would only slow the critic")
    vf_coef: float = ppo_key(0.5, "weight of the value loss")
    ent_coef: float = ppo_key(0.0, "weight of the entropy bonus")
    whiten_advantages: bool = ppo_key(True, "whiten advantages over the batch")
    hidden: int = ppo_key(64, "width of the two tanh layers of the actor and of the critic")
    eval_every: int = 10
    eval_episodes: int = evaluation_key(32, "episodes of each evaluation")
    greedy_eval: bool = evaluation_key(False, "evaluate the argmax action instead of sampling the policy")

    def check(self):
        super().check()
        positive(self, "envs", "horizon", "max_episode_steps", "eval_episodes", "hidden")

    def check_batches(self):
        if (self.envs * self.horizon) % self.minibatches:
            raise ConfigError(f"envs × horizon ({self.envs * self.horizon}) must be divisible by minibatches "
                              f"({self.minibatches})")


COMMAND = Command("train cartpole", CartPoleConfig, train, "classic-RL PPO on CartPole (a check of the PPO ops)",
                  print_result=True)
