"""Reference-model EMA (Xu et al. 2024, docs/algorithms.md §1.12): θ_ref ← (1−η)θ_ref + η·θ_actor."""
import pytest
import torch

from rlhf_kernels.train import ppo, ref_ema
from rlhf_kernels.train.core import config, models
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.core.runlog import Run

from train_helpers import PPO_FAST


class Tiny(torch.nn.Module):
    def __init__(self, w, b, buf):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([w]))
            self.lin.bias.copy_(torch.tensor([b]))
        self.register_buffer("running", torch.tensor(buf))
        self.register_buffer("steps", torch.tensor(7))  # an integer buffer is not averaged


def test_update_formula_by_hand():
    ref, actor = Tiny([1.0, 2.0], 0.0, 8.0), Tiny([3.0, -2.0], 4.0, 0.0)
    actor.steps.fill_(9)
    ref_ema.ema_update(ref, actor, 0.25)
    # 0.75·ref + 0.25·actor
    torch.testing.assert_close(ref.lin.weight, torch.tensor([[1.5, 1.0]]))
    torch.testing.assert_close(ref.lin.bias, torch.tensor([1.0]))
    torch.testing.assert_close(ref.running, torch.tensor(6.0))
    assert int(ref.steps) == 7
    torch.testing.assert_close(actor.lin.weight, torch.tensor([[3.0, -2.0]]))  # the actor is not touched


def test_eta_zero_keeps_and_eta_one_copies():
    torch.manual_seed(0)
    actor = models.load_lm("tiny-llama")
    torch.manual_seed(1)
    ref = models.load_lm("tiny-llama")
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_ema.ema_update(ref, actor, 0.0)
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    ref_ema.ema_update(ref, actor, 1.0)
    assert all(torch.equal(actor.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_trainer_moves_the_reference_after_each_iteration(tmp_path):
    eta = 0.3
    trainer = ppo.PPO(build("ppo", None, {**PPO_FAST, "out": str(tmp_path / "r"), "ref_ema": eta}))
    trainer.run = Run(trainer.cfg, "ppo")
    ref0 = {n: p.detach().clone() for n, p in trainer.ref.named_parameters()}
    trainer.step(1)
    actor = dict(trainer.policy.named_parameters())
    for n, p in trainer.ref.named_parameters():
        torch.testing.assert_close(p, (1 - eta) * ref0[n] + eta * actor[n].detach())
    assert not all(torch.equal(ref0[n], p) for n, p in trainer.ref.named_parameters())
    assert not any(p.requires_grad for p in trainer.ref.parameters())


def test_bad_eta_and_mismatched_reference():
    with pytest.raises(config.ConfigError, match=r"ref_ema must be in \[0, 1\]"):
        build("ppo", None, {"ref_ema": "1.5"})
    with pytest.raises(ValueError, match="ref_ema needs a reference of the policy's architecture"):
        ref_ema.check_compatible(models.load_lm("tiny-gpt2"), models.load_lm("tiny-llama"))
