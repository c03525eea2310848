"""Every Triton launcher runs its plan under the inputs' device guard; the plans the GPU compile report builds on
meta tensors are the launchers' own, with configurations their modules list."""
import importlib
from unittest import mock

import pytest
import torch

import rlhf_kernels as rk
from bench import gpu_report
from rlhf_kernels._backend import interpreting
from rlhf_kernels.triton import _launch

# where the triton backend runs: CPU tensors under the interpreter (make test), the GPU otherwise (make gpu-check)
DEVICE = torch.device("cpu") if interpreting() else torch.empty(0, device="cuda").device if torch.cuda.is_available() \
    else None
pytestmark = pytest.mark.skipif(DEVICE is None or not rk.available_backends()["triton"].startswith("available"),
                                reason="triton cannot run here")


def _fwd_bwd(out):
    loss = sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad)
    if torch.is_tensor(loss):
        loss.backward()


def _calls():
    """{op: a call of the public op on small tensors on DEVICE, on the triton backend, forward and backward}."""
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 3, 5, 11, 8

    def rand(*shape, grad=False, fn=torch.randn):
        return fn(*shape, generator=g).to(DEVICE).requires_grad_(grad)

    def lp(*shape):
        return (-rand(*shape) * 3).detach().requires_grad_(True)

    def tokens(*shape):
        return torch.randint(0, V, shape, generator=g).to(DEVICE)

    mask = rand(B, T, fn=torch.rand) > 0.3
    tri = dict(backend="triton")
    return {
        "token_kl": lambda: _fwd_bwd(rk.token_kl(lp(B, T), lp(B, T), estimator="k3", **tri)),
        "dpo_loss": lambda: _fwd_bwd(rk.dpo_loss(lp(B), lp(B), lp(B), lp(B), **tri)),
        "gae": lambda: rk.gae(rand(B, T), rand(B, T), mask, **tri),
        "masked_whiten": lambda: rk.masked_whiten(rand(B, T), mask, **tri),
        "ppo_policy_loss": lambda: _fwd_bwd(rk.ppo_policy_loss(lp(B, T), lp(B, T), rand(B, T), mask, **tri)[0]),
        "ppo_value_loss": lambda: _fwd_bwd(rk.ppo_value_loss(rand(B, T, grad=True), rand(B, T), rand(B, T), mask,
                                                             **tri)[0]),
        "token_rewards": lambda: rk.token_rewards(rand(B), mask, logp=rand(B, T), ref_logp=rand(B, T), kl_coef=0.1,
                                                  **tri),
        "logprobs_from_logits": lambda: _fwd_bwd(rk.logprobs_from_logits(rand(B, T, V, grad=True), tokens(B, T),
                                                                         return_entropy=True, **tri)),
        "linear_logprobs": lambda: _fwd_bwd(rk.linear_logprobs(rand(B * T, H, grad=True), rand(V, H, grad=True),
                                                               tokens(B * T), **tri)),
        "group_advantages": lambda: rk.group_advantages(rand(6), group_ids=torch.tensor([2, 0, 2, 1, 0, 2]).to(DEVICE),
                                                        **tri),
        "rollout_correction": lambda: rk.rollout_correction(lp(B, T).detach(), lp(B, T).detach(), mask,
                                                            level="sequence", **tri),
        # fixed_gemm is internal: the batch-invariant sampler replay runs its products through it
        "fixed_gemm": lambda: _fwd_bwd(rk.linear_logprobs(rand(B * T, H, grad=True), rand(V, H, grad=True),
                                                          tokens(B * T), top_k=3, batch_invariant=True, **tri)),
    }


def _has_plans(op):
    return hasattr(importlib.import_module(f"rlhf_kernels.triton.{op}"), "plan_fwd")


OPS = list(gpu_report.OPS)


@pytest.mark.parametrize("op", OPS)
def test_launches_enter_the_inputs_device_guard(op, monkeypatch):
    if not _has_plans(op):
        pytest.skip(f"triton/{op}.py has no launch plans yet")
    devices = []
    real = _launch.device_guard

    def spy(device):
        devices.append(torch.device(device))
        return real(device)

    monkeypatch.setattr(_launch, "device_guard", spy)
    _calls()[op]()
    assert devices and all(d == DEVICE for d in devices), devices


class _Stop(Exception):
    pass


# the head's and fixed_gemm's plans read the target arch from the tensors' device, which meta tensors do not have
@pytest.mark.parametrize("op", [op for op in OPS if op not in ("linear_logprobs", "fixed_gemm")])
def test_launchers_pass_their_tensors_device_not_the_current_one(op, monkeypatch):
    """On meta tensors (not the current device) the guard is asked for `meta`; it stops the launch there."""
    seen = []

    def guard(device):
        seen.append(torch.device(device))
        raise _Stop

    monkeypatch.setattr(_launch, "device_guard", guard)
    mod = importlib.import_module(f"rlhf_kernels.triton.{op}")
    launchers = [getattr(mod, n) for n in dir(mod) if not n.startswith(("_", "plan", "config", "combine"))
                 and callable(getattr(mod, n)) and getattr(getattr(mod, n), "__module__", None) == mod.__name__]
    assert launchers
    for launcher in launchers:
        seen.clear()
        with pytest.raises(_Stop):
            launcher(*_meta_args(launcher.__name__))
        assert seen == [torch.device("meta")], (launcher.__name__, seen)


def _meta_args(launcher):
    """Launcher arguments on meta tensors: the same as its plan's, without `arch`."""
    m = gpu_report._meta
    x, msk, s = m(2, 16), m(2, 16, dtype=torch.bool), m()
    z, tok, r = m(4, 10), m(4, dtype=torch.int64), m(4)
    table = {
        "token_kl_fwd": (x, x, 2, 0.0), "token_kl_bwd": (x, x, x, 2, 0.0),
        "dpo_loss_fwd": (r, r, r, r, 0.1, 0, 0.0), "dpo_loss_bwd": (r, r, r, r, r, 0.1, 0, 0.0),
        "gae": (x, x, msk, None, 1.0, 0.95), "masked_whiten": (x, msk, True, False, 1e-8),
        "ppo_policy_loss_fwd": (x, x, x, msk, None, x, 0.2, 0.2, 0.0, 0, 1, 0, 0.1, 2, 0.0),
        "ppo_policy_loss_bwd": (s, x, x, x, msk, x, None, m(2), 0.2, 0.2, 0.0, 1, 0, 0.0, 2, True, True),
        "ppo_value_loss_fwd": (x, x, x, msk, 0.2, 0), "ppo_value_loss_bwd": (s, x, x, x, msk, m(2), 0.2, True),
        "token_rewards": (m(2), msk, x, x, 0.1, 0, None, 1.0, 0.0, False),
        "logprobs_fwd": (z, tok, 1.0, -100, True), "logprobs_bwd": (r, r, z, tok, r, r, 1.0, -100),
        "replay_threshold": (z, tok, 1.0, -100, None, 0.0, tok, r),
        "group_advantages": (m(8), m(8, dtype=torch.int64), m(9, dtype=torch.int64), 0, 0, 0, 1e-6),
        "rollout_correction": (x, x, msk, 1, 0, 0.0, 2.0),
    }
    return table[launcher]


def test_device_guard_selects_the_tensors_cuda_device():
    with mock.patch.object(torch.cuda, "device") as cuda_device:
        guard = _launch.device_guard(torch.device("cuda", 1))
    cuda_device.assert_called_once_with(torch.device("cuda", 1))
    assert guard is cuda_device.return_value
    with mock.patch.object(torch.cuda, "device") as cuda_device:
        with _launch.device_guard(torch.device("cpu")):
            pass
    cuda_device.assert_not_called()


@pytest.mark.parametrize("op", OPS)
def test_meta_plans_are_nonempty_and_use_listed_configs(op):
    if not _has_plans(op):
        pytest.skip(f"triton/{op}.py has no launch plans yet")
    mod = importlib.import_module(f"rlhf_kernels.triton.{op}")
    cases = gpu_report.cases(op, 90)  # meta tensors carry no device to read the target from
    assert cases
    for dt, label, plan in cases:
        assert plan, (op, dt, label)
        for launch in plan:
            assert launch.kernel is getattr(importlib.import_module(launch.kernel.fn.__module__),
                                            gpu_report.kernel_name(launch.kernel))
            assert gpu_report.selectable(mod, launch, dt, 90), (op, label, launch.constexprs)


def test_config_matching():
    from rlhf_kernels.triton import token_kl
    plan, _ = token_kl.plan_fwd(gpu_report._meta(4), gpu_report._meta(4), 0, 0.0)
    (launch,) = plan
    assert _launch.uses(launch, {"kernel": "_token_kl_fwd_kernel", "BLOCK": token_kl.BLOCK, "num_warps": 4})
    assert not _launch.uses(launch, {"kernel": "_token_kl_fwd_kernel", "BLOCK": 2 * token_kl.BLOCK})
    assert not _launch.uses(launch, {"kernel": "_token_kl_bwd_kernel", "BLOCK": token_kl.BLOCK})
    assert not _launch.uses(launch, {"kernel": "_token_kl_fwd_kernel", "num_warps": 8})


def test_empty_inputs_plan_nothing():
    from rlhf_kernels.triton import gae, token_kl
    e = gpu_report._meta(0, 5)
    assert token_kl.plan_fwd(e, e, 0, 0.0)[0] == []
    assert gae.plan_fwd(e, e, e.bool(), None, 1.0, 0.9)[0] == []
