"""CartPole (Barto, Sutton & Anderson 1983) in torch, vectorised over N environments with auto-reset.

The constants and the termination rule are CartPole-v1's: gravity 9.8, cart mass 1.0, pole mass 0.1,
pole half-length 0.5, force ±10, Euler steps of tau = 0.02 s; an episode terminates when |x| > 2.4 or
|θ| > 12°, and is truncated after `max_steps` steps (500). Every step gives reward 1, including the
one that terminates. States start uniform in [−0.05, 0.05]⁴. Observations are (x, ẋ, θ, θ̇).
"""
import math
from dataclasses import dataclass

import torch

GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
LENGTH = 0.5  # half the pole's length
FORCE = 10.0
TAU = 0.02
X_LIMIT = 2.4
THETA_LIMIT = 12 * 2 * math.pi / 360
N_ACTIONS = 2  # 0: push left, 1: push right
OBS_DIM = 4


def dynamics(state, action):
    """One Euler step of the cart-pole equations: state [..., 4], action [...] in {0, 1} -> next state."""
    x, x_dot, theta, theta_dot = state.unbind(-1)
    force = torch.where(action == 1, FORCE, -FORCE).to(state.dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    total = MASS_CART + MASS_POLE
    pole_ml = MASS_POLE * LENGTH
    tmp = (force + pole_ml * theta_dot ** 2 * sin) / total
    theta_acc = (GRAVITY * sin - cos * tmp) / (LENGTH * (4.0 / 3.0 - MASS_POLE * cos ** 2 / total))
    x_acc = tmp - pole_ml * theta_acc * cos / total
    # explicit Euler: positions move with the old velocities
    return torch.stack([x + TAU * x_dot, x_dot + TAU * x_acc, theta + TAU * theta_dot, theta_dot + TAU * theta_acc], -1)


def failed(state):
    return (state[..., 0].abs() > X_LIMIT) | (state[..., 2].abs() > THETA_LIMIT)


@dataclass
class Step:
    obs: torch.Tensor          # [N, 4] the observation to act on next (a fresh episode's where one ended)
    reward: torch.Tensor       # [N]
    terminated: torch.Tensor   # [N] bool: the pole fell or the cart left the track
    truncated: torch.Tensor    # [N] bool: the step cap was reached without failing
    final_obs: torch.Tensor    # [N, 4] the state the step reached, before any reset (for bootstrapping)
    episode_return: torch.Tensor  # [N] the return of the episode that ended here (0 where none did)


class CartPole:
    """N independent CartPoles. `step(actions, generator)` advances all of them and resets the ones whose
    episode ended; the generator draws the reset states, so a seeded run is reproducible."""

    def __init__(self, n, max_steps=500, generator=None):
        self.n, self.max_steps = n, max_steps
        self.state = self._initial(n, generator)
        self.length = torch.zeros(n, dtype=torch.long)
        self.ret = torch.zeros(n)

    @staticmethod
    def _initial(n, generator):
        return torch.rand(n, OBS_DIM, generator=generator) * 0.1 - 0.05

    def obs(self):
        return self.state.clone()

    def step(self, actions, generator=None):
        nxt = dynamics(self.state, actions)
        self.length += 1
        reward = torch.ones(self.n)
        self.ret += reward
        terminated = failed(nxt)
        truncated = (self.length >= self.max_steps) & ~terminated
        ended = terminated | truncated
        episode_return = torch.where(ended, self.ret, torch.zeros_like(self.ret))
        self.state = torch.where(ended[:, None], self._initial(self.n, generator), nxt)
        self.length = torch.where(ended, torch.zeros_like(self.length), self.length)
        self.ret = torch.where(ended, torch.zeros_like(self.ret), self.ret)
        return Step(self.obs(), reward, terminated, truncated, nxt, episode_return)

    # checkpointing: the environments are part of a run's state, so a resumed run continues the same episodes
    def state_dict(self):
        return {"state": self.state.clone(), "length": self.length.clone(), "ret": self.ret.clone()}

    def load_state_dict(self, d):
        self.state, self.length, self.ret = d["state"].clone(), d["length"].clone(), d["ret"].clone()
