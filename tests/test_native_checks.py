"""The raw native ops check their arguments (csrc/checks.h, one check per op shared by its CPU and CUDA
entry points): a call through torch.ops with mismatched shapes, dtypes, devices or layouts raises
instead of reading out of bounds or dereferencing another device's memory."""
import pytest
import torch

import rlhf_kernels as rk

from conftest import needs_gpu

pytestmark = pytest.mark.skipif(rk.available_backends()["cpu"] != "available", reason="native extension not built")
OPS = torch.ops.rlhf_kernels


def _bad_calls(device, other):
    """(name, call, message) for each op: inputs on `device`, one of them on `other` (or misshapen)."""
    d = dict(device=device)
    x, y = torch.randn(3, 5, **d), torch.randn(3, 5, **d)
    m = torch.ones(3, 5, dtype=torch.bool, **d)
    h, w, tok = torch.randn(4, 8, **d), torch.randn(11, 8, **d), torch.zeros(4, dtype=torch.long, **d)
    lse = torch.zeros(4, **d)
    moved = other is not None
    o = (lambda t: t.to(other)) if moved else (lambda t: t)
    return [
        ("token_kl", lambda: OPS.token_kl_fwd(x, o(y) if moved else y[:, :4], 0, 0.0),
         "is on" if moved else "must have the shape of logp"),
        ("token_kl_bwd", lambda: OPS.token_kl_bwd(o(x) if moved else x.t(), x, y, 2, 0.0),
         "is on" if moved else "must have the shape"),
        ("dpo_loss", lambda: OPS.dpo_loss_fwd(x[0], o(y[0]) if moved else y[0].double(), x[1], y[1], 0.1, 0, 0.0),
         "is on" if moved else "must have the dtype of chosen_logp"),
        ("ppo_policy_loss", lambda: OPS.ppo_policy_loss_fwd(x, y, o(x) if moved else x[:, ::2], m, None, None, 0.2,
                                                                    0.2, 0.0, 0, 0, 0, 0.0, 2, 0.0),
         "is on" if moved else "must have the shape of logp"),
        ("ppo_value_loss", lambda: OPS.ppo_value_loss_fwd(x, y, x, o(m) if moved else m.float(), 0.2, 0),
         "is on" if moved else "mask must be bool"),
        ("linear_logprobs", lambda: OPS.linear_logprobs_fwd(h, o(w) if moved else w[:, :7], None, tok, 1.0, -100, 0),
         "is on" if moved else "expected hidden \\[N, H\\] and weight \\[V, H\\]"),
        ("linear_logprobs_bwd", lambda: OPS.linear_logprobs_bwd(
            lse, None, h, w, None, tok, o(lse) if moved else lse[:3], lse, 1.0, -100, True, True, False, 0),
         "is on" if moved else "lse must be a contiguous"),
        ("logprobs_from_logits", lambda: OPS.logprobs_from_logits_fwd(h, o(tok) if moved else tok[:3], 1.0, -100,
                                                                      False),
         "is on" if moved else "tokens must have the shape of logits"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_cpu_entry_points_reject_bad_arguments(case):
    name, call, message = _bad_calls("cpu", None)[case]
    with pytest.raises(RuntimeError, match=message):
        call()


@needs_gpu
@pytest.mark.parametrize("case", range(8))
def test_cuda_entry_points_reject_inputs_on_two_devices(case):
    name, call, message = _bad_calls("cuda", "cpu")[case]
    with pytest.raises(RuntimeError, match=message):
        call()
