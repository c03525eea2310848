"""Smoke test of an installed rlhf_kernels (run by .ci/sdist_check.sh from a folder outside the checkout):
every public op, on its CPU kernels, agrees with the float64 reference in value and gradient."""
import os
import sys

import torch

import rlhf_kernels as rk
from rlhf_kernels import reference

CHECKOUT = sys.argv[1] if len(sys.argv) > 1 else None
# constants of the rollout: their backward raises (or they take no gradient)
NO_GRAD = {"gae", "masked_whiten", "token_rewards", "group_advantages", "rollout_correction"}


def rand(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def cases(g):
    """{op: (args, kwargs)}: small ragged shapes (V not a power of two, an all-masked row, an ignored token)."""
    B, T, V, H = 3, 5, 37, 16
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0] = False
    mask[1, 3:] = False
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[2, 1] = -100
    lp, ref = -rand(B, T, g=g).abs(), -rand(B, T, g=g).abs()
    return {
        "logprobs_from_logits": ((rand(B, T, V, g=g), tokens), dict(temperature=0.7, return_entropy=True)),
        "linear_logprobs": ((rand(B, T, H, g=g), rand(V, H, g=g) * 0.3, tokens),
                            dict(bias=rand(V, g=g), return_entropy=True)),
        "token_kl": ((lp, ref), dict(estimator="k3")),
        "token_rewards": ((rand(B, g=g), mask), dict(logp=lp, ref_logp=ref, kl_coef=0.1)),
        "gae": ((rand(B, T, g=g), rand(B, T, g=g), mask), dict(gamma=0.99, lam=0.9)),
        "masked_whiten": ((rand(B, T, g=g), mask), {}),
        "ppo_policy_loss": ((lp, lp + 0.3 * rand(B, T, g=g), rand(B, T, g=g), mask),
                            dict(dual_clip=3.0, aggregation="seq-mean-token-mean")),
        "ppo_value_loss": ((rand(B, T, g=g), rand(B, T, g=g), rand(B, T, g=g), mask), dict(clip=0.2)),
        "dpo_loss": ((lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1]), dict(beta=0.5, label_smoothing=0.1)),
        "group_advantages": ((rand(6, g=g),), dict(group_ids=torch.tensor([3, 1, 3, 7, 1, 3]),
                                                   baseline="leave_one_out")),
        "rollout_correction": ((lp, ref, mask), dict(level="geometric", mode="mask", low=0.5, high=1.5)),
    }


def tensors(out):
    """The tensors of an op's output, in a fixed order (tuples, and the stats dicts of the losses)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in tensors(out[k])]
    return [t for o in out for t in tensors(o)]


def check(op, args, kwargs):
    grad = op not in NO_GRAD
    fast_in = [a.clone().requires_grad_(grad and a.is_floating_point()) for a in args]
    ref_in = [a.detach().double().requires_grad_(grad) if a.is_floating_point() else a for a in args]
    ref_kw = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    fast = tensors(getattr(rk, op)(*fast_in, **kwargs, backend="cpu"))
    slow = tensors(getattr(reference, op)(*ref_in, **ref_kw))
    assert len(fast) == len(slow), (op, len(fast), len(slow))
    for i, (f, s) in enumerate(zip(fast, slow)):
        assert f.shape == s.shape, (op, i, f.shape, s.shape)
        torch.testing.assert_close(f.double(), s.detach().double(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, i=i: f"{op} output {i}: {m}")
    diff = [(f, s) for f, s in zip(fast, slow) if f.requires_grad]
    if diff:  # the same random cotangent on every differentiable output
        g = torch.Generator().manual_seed(1)
        w = [torch.randn(f.shape, generator=g, dtype=torch.float64) for f, _ in diff]
        sum((f.double() * c).sum() for (f, _), c in zip(diff, w)).backward()
        sum((s * c).sum() for (_, s), c in zip(diff, w)).backward()
        for i, (a, b) in enumerate(zip(fast_in, ref_in)):
            if a.requires_grad and b.grad is not None:
                torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, i=i: f"{op} grad {i}: {m}")
    return "grad" if diff else "value"


def main():
    here = os.path.dirname(os.path.abspath(rk.__file__))
    if CHECKOUT:
        # the work folder (and its venv) may sit inside the checkout; the package must not be the checkout's own
        src = os.path.join(os.path.abspath(CHECKOUT), "rlhf_kernels")
        assert os.path.realpath(here) != os.path.realpath(src), f"imported from the checkout: {here}"
    assert rk.available_backends()["cpu"] == "available", rk.available_backends()
    print(f"backends: {rk.available_backends()}; CPU ISA: {rk.cpu_isa()}")
    public = {n for n in rk.__all__ if n not in ("available_backends", "cpu_isa")}  # the ops
    table = cases(torch.Generator().manual_seed(0))
    missing = public - set(table)
    assert not missing, f"public ops without a smoke case here: {sorted(missing)}"
    for op in sorted(public):
        print(f"{op}: cpu == reference ({check(op, *table[op])})", flush=True)
    print(f"smoke test passed: {len(public)} ops from {here}")


if __name__ == "__main__":
    main()
