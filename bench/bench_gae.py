"""gae on CPU: the rk cpu kernel vs the per-timestep Python loop TRL/OpenRLHF run, and the eager reference.

Floor: read rewards and values (4 B each, fp32), read the mask (1 B), write advantages and returns
(4 B each): 17 bytes per position, a handful of FLOPs. The kernel makes one reverse pass per row.

The baseline is the loop those trainers run: zero padded rewards/values, then for t from the end:
next value, δ, and the running λ-return, one batch-wide torch op at a time (correct for right-padded
masks, which the benchmark uses, so all contenders agree on every valid position).

torch.compile of the reference is timed in its own small table (T = 64, T = 16 with --quick): dynamo
unrolls the T-step loop, so compilation grows faster than T (about 20 s at T = 64 and 150 s at T = 256
on this 2-core machine), which rules it out at T = 1024.
"""
import time

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from .common import DEVICE, measure, report, rk_backends, script_main


def python_loop_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """The per-timestep loop of TRL/OpenRLHF-style trainers (written for this benchmark)."""
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    T = rewards.shape[-1]
    running = torch.zeros_like(rewards[:, 0])
    out = [None] * T
    for t in range(T - 1, -1, -1):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = delta + gamma * lam * running
        out[t] = running
    adv = torch.stack(out, dim=1)
    return adv, adv + values


def python_loop_gae_dones(rewards, values, dones, gamma=0.99, lam=0.95):
    """The per-timestep loop classic-RL trainers run over rows holding several episodes, every step
    valid: (1 − done) cuts the bootstrap and the running λ-return (written for this benchmark)."""
    keep = 1.0 - dones.to(values.dtype)
    T = rewards.shape[-1]
    running = torch.zeros_like(rewards[:, 0])
    out = [None] * T
    for t in range(T - 1, -1, -1):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * keep[:, t] * next_v - values[:, t]
        running = delta + gamma * lam * keep[:, t] * running
        out[t] = running
    adv = torch.stack(out, dim=1)
    return adv, adv + values


def _inputs(B, T):
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]  # right-padded, as rollouts are
    return r, v, mask


def _agree(r, v, mask):
    exp = reference.gae(r.double(), v.double(), mask)[0]
    got_all = [python_loop_gae(r, v, mask)[0]] + [rk.gae(r, v, mask, backend=b)[0] for b in rk_backends("gae").values()]
    for got in got_all:
        torch.testing.assert_close(torch.where(mask, got.double(), 0.0), exp, rtol=1e-4, atol=1e-4)


def _table(B, T, quick, csv_dir, ceilings, compiled=None):
    r, v, mask = (t.to(DEVICE) for t in _inputs(B, T))
    _agree(r, v, mask)
    fns = {"python loop (TRL/OpenRLHF)": lambda: python_loop_gae(r, v, mask),
           "reference (eager)": lambda: reference.gae(r, v, mask)}
    title = f"gae, {B}x{T} fp32, right-padded"
    if compiled is not None:
        t0 = time.perf_counter()
        compiled(r, v, mask)
        title += f", with torch.compile (its first call, compiling: {time.perf_counter() - t0:.1f} s)"
        fns["reference (torch.compile)"] = lambda: compiled(r, v, mask)
    for label, b in rk_backends("gae").items():
        fns[label] = lambda b=b: rk.gae(r, v, mask, backend=b)
    res, peaks = measure(fns, repeats=5 if quick else 9)
    return report(title, res, "python loop (TRL/OpenRLHF)", ceilings, csv_name=f"gae_{B}x{T}", csv_dir=csv_dir,
                  nbytes=17 * B * T, peaks=peaks)


def _dones_table(quick, csv_dir, ceilings, B=64, T=1024):
    """Classic RL: every step valid, an episode ending at about 1% of the steps (18 B/position: + dones)."""
    r, v, _ = (t.to(DEVICE) for t in _inputs(B, T))
    full = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    dones = (torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.01).to(DEVICE)
    exp = reference.gae(r.double(), v.double(), full, 0.99, 0.95, dones)[0]
    fns = {"python loop with dones": lambda: python_loop_gae_dones(r, v, dones)}
    for label, b in rk_backends("gae").items():
        fns[label] = lambda b=b: rk.gae(r, v, full, gamma=0.99, dones=dones, backend=b)
    for fn in fns.values():
        torch.testing.assert_close(fn()[0].double(), exp, rtol=1e-4, atol=1e-4)
    res, peaks = measure(fns, repeats=5 if quick else 9)
    return report(f"gae with dones, {B}x{T} fp32, all valid, γ = 0.99", res, "python loop with dones", ceilings,
                  csv_name=f"gae_dones_{B}x{T}", csv_dir=csv_dir, nbytes=18 * B * T, peaks=peaks)


def run(quick=False, csv_dir=None, ceilings=None):
    texts = [_table(B, T, quick, csv_dir, ceilings) for B, T in [(64, 1024)] + ([] if quick else [(256, 4096)])]
    texts.append(_dones_table(quick, csv_dir, ceilings))
    # dynamo unrolls the T-step loop, so torch.compile gets its own, shorter table
    texts.append(_table(64, 16 if quick else 64, quick, csv_dir, ceilings, torch.compile(reference.gae)))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
