"""logprobs_from_logits forward+backward: the fused kernel vs what a user would write or call.

Contenders, all computing logp[b, t] = log_softmax(logits[b, t])[token[b, t]] and d(Σ g·logp)/d logits:
  - log_softmax + gather (eager): the baseline; materialises the [N, V] log-softmax in forward, and in
    backward a zero [N, V] tensor scattered with g, then log_softmax_backward.
  - the same under torch.compile (inductor).
  - TRL's `selective_log_softmax` (trl.trainer.utils): on CPU, gather the token logits and a logsumexp
    one batch row at a time (on CUDA, TRL's own Triton kernel). Autograd still builds [N, V]
    temporaries in backward.
  - rk's kernels: one read of the logits forward (online log-sum-exp), one read + one write backward.
The second table adds the entropy of the same distribution (an entropy bonus differentiates it too):
eager log_softmax + gather + −Σ p·log p, torch.compile of it, TRL's `selective_log_softmax_and_entropy`
(its `entropy_from_logits` runs 128-row chunks), and rk with return_entropy=True.

Floor: forward reads N·V logits; backward reads them again and writes the N·V gradient: 3·N·V·4 bytes for
fp32 (the per-row tensors are negligible), and about 2·N·V exponentials. The gradient itself (N·V·4 bytes)
is the only [N, V] allocation the fused op needs; "peak" below is the peak of tensor memory allocated during
one forward+backward, beyond the inputs.
"""

import torch

import rlhf_kernels as rk

from .common import DEVICE, measure, peers, report, rk_backends, script_main


def log_softmax_gather(logits, tokens):
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def with_entropy(logits, tokens):
    logp_all = torch.log_softmax(logits, dim=-1)
    return logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def _trl(name):
    import trl.trainer.utils as u
    return getattr(u, name)


def _contenders(wrap, eager, compiled, trl_name, rk_fn, names):
    """{name: wrap(fn)} for the eager and compiled baseline, TRL's helper `trl_name` (a skipped row
    when TRL is missing) and rk's kernels `rk_fn(logits, tokens, backend)`; and the skipped rows."""
    fns = {f"{names} (eager)": wrap(eager), f"{names} (torch.compile)": wrap(compiled)}
    trl, skipped = peers({f"TRL {trl_name}": lambda: wrap(_trl(trl_name))})
    fns.update(trl)
    for label, b in rk_backends("logprobs_from_logits").items():
        fns[label] = wrap(lambda x, t, b=b: rk_fn(x, t, b))
    return fns, skipped


def run(quick=False, csv_dir=None, ceilings=None):
    B, T, V = (2, 128, 32000) if quick else (8, 512, 32000)
    N = B * T
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(DEVICE).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    g1, g2 = (torch.randn(B, T, generator=g).to(DEVICE) for _ in range(2))
    repeats = 3 if quick else 7
    nbytes = 3 * N * V * 4
    compiled = torch.compile(log_softmax_gather)
    texts = []

    def logp(x, t, b):
        return rk.logprobs_from_logits(x, t, validate=False, backend=b)

    # the kernels' answer must be the baseline's before they are timed
    with torch.no_grad():
        for b in rk_backends("logprobs_from_logits").values():
            torch.testing.assert_close(logp(logits, tokens, b), log_softmax_gather(logits, tokens),
                                       rtol=1e-5, atol=1e-4)

    # log-probs alone
    def step(fn):
        return lambda: torch.autograd.grad(fn(logits, tokens), logits, g1)

    base = "log_softmax + gather"
    fns, skipped = _contenders(step, log_softmax_gather, compiled, "selective_log_softmax", logp, base)
    # not a contender: one read (forward) plus one read and a write into a fresh [N, V] tensor
    # (backward), page faults of the new allocation included; no kernel can beat it
    fns["floor: logits.sum() + logits.clone()"] = lambda: (logits.detach().sum(), logits.detach().clone())
    res, peaks = measure(fns, repeats=repeats)
    texts.append(report(f"logprobs_from_logits forward+backward, {N}x{V} fp32 ({B}x{T} rows; floor "
                        f"{nbytes / 1e9:.2f} GB moved; the gradient alone is {N * V * 4 / 2 ** 20:.0f} MiB)",
                        res, f"{base} (eager)", ceilings, csv_name="logprobs_from_logits",
                        csv_dir=csv_dir, nbytes=nbytes, peaks=peaks, skipped=skipped))

    # log-probs and entropy, both differentiated
    def step2(fn):
        return lambda: torch.autograd.grad(fn(logits, tokens), logits, (g1, g2))

    fns, skipped = _contenders(step2, with_entropy, torch.compile(with_entropy), "selective_log_softmax_and_entropy",
                               lambda x, t, b: rk.logprobs_from_logits(x, t, return_entropy=True, validate=False,
                                                                       backend=b),
                               "log_softmax, gather, entropy")
    res, peaks = measure(fns, repeats=repeats)
    texts.append(report(f"logprobs_from_logits with entropy, forward+backward, {N}x{V} fp32", res,
                        "log_softmax, gather, entropy (eager)", ceilings, csv_name="logprobs_from_logits_entropy",
                        csv_dir=csv_dir, nbytes=nbytes, peaks=peaks, skipped=skipped))

    # forward alone (no grad): the part a rollout / reference-model pass runs
    def fwd(fn):
        def f():
            with torch.no_grad():
                fn(logits, tokens)
        return f

    fns, skipped = _contenders(fwd, log_softmax_gather, compiled, "selective_log_softmax", logp, base)
    res, peaks = measure(fns, repeats=repeats)
    texts.append(report(f"logprobs_from_logits forward only, {N}x{V} fp32 (floor {N * V * 4 / 1e9:.2f} GB read)",
                        res, f"{base} (eager)", ceilings, csv_name="logprobs_from_logits_forward",
                        csv_dir=csv_dir, nbytes=N * V * 4, peaks=peaks, skipped=skipped))
    return "\n".join(texts)


if __name__ == "__main__":
    script_main(run)
