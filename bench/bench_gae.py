"""gae on CPU: the rk cpu kernel vs the per-timestep Python loop TRL/OpenRLHF run, and the eager reference;
and with dones (rows of several episodes) vs the loop classic-RL trainers run.

Floor: read rewards and values (4 B each, fp32), read the mask (1 B), write advantages and returns
(4 B each): 17 bytes per position, a handful of FLOPs. The kernel makes one reverse pass per row.

The baseline is the loop those trainers run: zero padded rewards/values, then for t from the end:
next value, δ, and the running λ-return, one batch-wide torch op at a time (correct for right-padded
masks, which the benchmark uses, so all contenders agree on every valid position).

torch.compile of the reference is timed in its own small table (full run only): dynamo unrolls the
T-step loop, so compilation grows faster than T (about 20 s at T = 64 and 150 s at T = 256 on this
2-core machine), which rules it out at T = 1024.
"""
import time

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

from bench.common import copy_bandwidth, interleaved, script_main, table, timing_rows, write_csv


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
    for got in (python_loop_gae(r, v, mask)[0], rk.gae(r, v, mask, backend="cpu")[0]):
        torch.testing.assert_close(torch.where(mask, got.double(), 0.0), exp, rtol=1e-4, atol=1e-4)


def run(quick=False, csv_dir=None, bandwidth=None):
    bandwidth = bandwidth or copy_bandwidth()
    cols = ["impl", "median", "spread", "speedup vs python loop (TRL/OpenRLHF)", "GB/s"]
    texts = []
    for B, T in [(64, 1024)] + ([] if quick else [(256, 4096)]):
        r, v, mask = _inputs(B, T)
        _agree(r, v, mask)
        fns = {"python loop (TRL/OpenRLHF)": lambda: python_loop_gae(r, v, mask),
               "reference (eager)": lambda: reference.gae(r, v, mask),
               "rk cpu": lambda: rk.gae(r, v, mask, backend="cpu")}
        res = interleaved(fns, repeats=5 if quick else 9)
        rows = timing_rows(res, "python loop (TRL/OpenRLHF)", 17 * B * T, bandwidth)
        texts.append(table(f"gae, {B}x{T} fp32, right-padded (copy bandwidth {bandwidth / 1e9:.1f} GB/s)", rows, cols))
        if csv_dir:
            write_csv(f"{csv_dir}/gae_{B}x{T}.csv", rows, cols)
    B, T = 64, 1024  # classic RL: every step valid, an episode ending at ~1% of the steps
    r, v, _ = _inputs(B, T)
    full = torch.ones(B, T, dtype=torch.bool)
    dones = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.01
    exp = reference.gae(r.double(), v.double(), full, 0.99, 0.95, dones)[0]
    for got in (python_loop_gae_dones(r, v, dones)[0], rk.gae(r, v, full, gamma=0.99, dones=dones, backend="cpu")[0]):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-4)
    fns = {"python loop with dones": lambda: python_loop_gae_dones(r, v, dones),
           "rk cpu": lambda: rk.gae(r, v, full, gamma=0.99, dones=dones, backend="cpu")}
    res = interleaved(fns, repeats=5 if quick else 9)
    rows = timing_rows(res, "python loop with dones", 18 * B * T, bandwidth)  # + 1 byte of dones per position
    dcols = ["impl", "median", "spread", "speedup vs python loop with dones", "GB/s"]
    texts.append(table(f"gae with dones, {B}x{T} fp32, all valid, γ = 0.99 (copy bandwidth {bandwidth / 1e9:.1f} GB/s)",
                       rows, dcols))
    if csv_dir:
        write_csv(f"{csv_dir}/gae_dones_{B}x{T}.csv", rows, dcols)
    if not quick:
        B, T = 64, 64
        r, v, mask = _inputs(B, T)
        compiled = torch.compile(reference.gae)
        t0 = time.perf_counter()
        compiled(r, v, mask)
        compile_s = time.perf_counter() - t0
        fns = {"python loop (TRL/OpenRLHF)": lambda: python_loop_gae(r, v, mask),
               "reference (eager)": lambda: reference.gae(r, v, mask),
               "reference (torch.compile)": lambda: compiled(r, v, mask),
               "rk cpu": lambda: rk.gae(r, v, mask, backend="cpu")}
        res = interleaved(fns, repeats=9)
        rows = timing_rows(res, "python loop (TRL/OpenRLHF)", 17 * B * T, bandwidth)
        texts.append(table(f"gae, {B}x{T} fp32 with torch.compile (its first call, compiling: {compile_s:.1f} s)",
                           rows, cols))
        if csv_dir:
            write_csv(f"{csv_dir}/gae_compile_{B}x{T}.csv", rows, cols)
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
