"""logprobs_from_logits forward+backward on CPU: the fused kernel vs what a user would write.

Contenders, all computing logp[b, t] = log_softmax(logits[b, t])[token[b, t]] and d(Σ g·logp)/d logits:
  - log_softmax + gather (eager): the baseline; materialises the [N, V] log-softmax in forward, and in
    backward a zero [N, V] tensor scattered with g, then log_softmax_backward.
  - the same under torch.compile (inductor).
  - per-row-chunked logsumexp + gather: the approach of TRL's `selective_log_softmax` for fp32 logits,
    written here from its description: gather the token logits, compute logsumexp one batch row at a time
    (so the forward never holds an [N, V] log-softmax), subtract. Autograd still builds [N, V]
    temporaries in backward (logsumexp's softmax and gather's scatter).
  - rk cpu: one read of the logits forward (online log-sum-exp), one read + one write backward.

Floor: forward reads N·V logits; backward reads them again and writes the N·V gradient: 3·N·V·4 bytes for
fp32 (the per-row tensors are negligible), and about 2·N·V exponentials. The gradient itself (N·V·4 bytes)
is the only [N, V] allocation the fused op needs; "peak" below is the peak of tensor memory allocated during
one forward+backward, beyond the inputs.
"""

import torch

import rlhf_kernels as rk

from bench.common import copy_bandwidth, interleaved, peak_bytes, script_main, table, timing_rows, write_csv


def log_softmax_gather(logits, tokens):
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def chunked_logsumexp_gather(logits, tokens):
    """TRL-style: token logits by gather, log-normaliser one batch row at a time."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return picked - lse


def run(quick=False, csv_dir=None, bandwidth=None):
    B, T, V = (2, 128, 32000) if quick else (8, 512, 32000)
    N = B * T
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    grad_out = torch.randn(B, T, generator=g)
    compiled = torch.compile(log_softmax_gather)

    def step(fn):
        return lambda: torch.autograd.grad(fn(logits, tokens), logits, grad_out)

    fns = {"log_softmax + gather (eager)": step(log_softmax_gather),
           "log_softmax + gather (torch.compile)": step(compiled),
           "per-row logsumexp + gather (TRL-style)": step(chunked_logsumexp_gather),
           "rk cpu": step(lambda x, t: rk.logprobs_from_logits(x, t, validate=False, backend="cpu")),
           # not a contender: one read (forward) plus one read and a write into a fresh [N, V] tensor
           # (backward), page faults of the new allocation included; no kernel can beat it
           "floor: logits.sum() + logits.clone()": lambda: (logits.detach().sum(), logits.detach().clone())}
    # the kernel's answer must be the baseline's before it is timed
    with torch.no_grad():
        want = log_softmax_gather(logits, tokens)
        got = rk.logprobs_from_logits(logits, tokens, validate=False, backend="cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    res = interleaved(fns, repeats=3 if quick else 7)
    bandwidth = bandwidth or copy_bandwidth()
    nbytes = 3 * N * V * 4
    rows = timing_rows(res, "log_softmax + gather (eager)", nbytes, bandwidth)
    grad_bytes = N * V * 4
    for row, fn in zip(rows, fns.values()):
        peak = peak_bytes(fn)
        row["peak memory"] = f"{peak / 2 ** 20:.0f} MiB ({peak / grad_bytes:.2f}x the gradient)"
    cols = ["impl", "median", "spread", "speedup vs log_softmax + gather (eager)", "GB/s", "peak memory"]
    text = table(f"logprobs_from_logits forward+backward, {N}x{V} fp32 ({B}x{T} rows; "
                 f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; floor {nbytes / 1e9:.2f} GB moved)", rows, cols)

    # forward alone (no grad): the part a rollout / reference-model pass runs
    def fwd(fn):
        def f():
            with torch.no_grad():
                fn(logits, tokens)
        return f

    fres = interleaved({"log_softmax + gather (eager)": fwd(log_softmax_gather),
                        "per-row logsumexp + gather (TRL-style)": fwd(chunked_logsumexp_gather),
                        "rk cpu": fwd(lambda x, t: rk.logprobs_from_logits(x, t, validate=False, backend="cpu"))},
                       repeats=3 if quick else 7)
    frows = timing_rows(fres, "log_softmax + gather (eager)", N * V * 4, bandwidth)
    fcols = ["impl", "median", "spread", "speedup vs log_softmax + gather (eager)", "GB/s"]
    text += table(f"logprobs_from_logits forward only, {N}x{V} fp32 (floor {N * V * 4 / 1e9:.2f} GB read)",
                  frows, fcols)
    if csv_dir:
        write_csv(f"{csv_dir}/logprobs_from_logits.csv", rows, cols)
        write_csv(f"{csv_dir}/logprobs_from_logits_forward.csv", frows, fcols)
    return text


if __name__ == "__main__":
    script_main(run)
