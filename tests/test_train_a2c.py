"""A2C is a special case of PPO (Huang et al. 2022, docs/algorithms.md §5): under `--preset a2c` the
gradient the trainer's update takes equals the A2C gradient, computed here with plain torch
(logits + log_softmax), on a tiny Llama and a real rollout batch; with the default PPO settings
and a policy moved away from the one that sampled, the same comparison fails."""
import pytest
import torch

from rlhf_kernels.train import ppo
from rlhf_kernels.train.core import config
from rlhf_kernels.train.core.commands import build
from rlhf_kernels.train.core.runlog import Run

from train_helpers import FAST

SMALL = {**FAST, "batch_size": 8, "micro_batch_size": 4, "steps": 2, "eval_every": 100}


def trainer_gradient(tmp_path, monkeypatch, keys, perturb=False):
    """(trainer, experience, {param: grad}) of the first optimizer step of iteration 1, taken before
    clipping; the parameters are left where the gradient was taken."""
    cfg = build("ppo", None, {**SMALL, "out": str(tmp_path / "run"), **keys})
    trainer = ppo.PPO(cfg)
    trainer.run = Run(cfg, "ppo")
    named = {**{f"policy.{n}": p for n, p in trainer.policy.named_parameters()},
             **{f"critic.{n}": p for n, p in trainer.critic.named_parameters()}}
    seen, grads = [], []
    make_experience = trainer.make_experience

    def rollout_then_perturb(step, g):
        ex = make_experience(step, g)
        if perturb:  # a policy other than the sampling one, as after a first minibatch step
            with torch.no_grad():
                for p in trainer.policy.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        seen.append(ex)
        return ex

    def capture(run, step, optimizer, params, max_norm):
        if not grads:
            grads.append({n: p.grad.clone() for n, p in named.items() if p.grad is not None})
        optimizer.zero_grad(set_to_none=True)
        return 0.0

    trainer.make_experience = rollout_then_perturb
    monkeypatch.setattr(ppo, "clip_and_step", capture)
    trainer.step(1)
    return trainer, seen[0], grads[0]


def a2c_gradient(trainer, ex):
    """∇[−mean_token(A·log π) + vf_coef·½·mean_token((V − R)²)] with plain torch."""
    cfg, s = trainer.cfg, ex["samples"]
    for m in (trainer.policy, trainer.critic):
        m.zero_grad(set_to_none=True)
    logits = trainer.policy(input_ids=s.ids, attention_mask=s.attn).logits[:, s.start - 1:-1].float()
    logp_all = torch.log_softmax(logits / cfg.temperature, -1)
    logp = logp_all.gather(-1, s.responses.unsqueeze(-1)).squeeze(-1)
    m = s.mask.float()
    pg = -(ex["advantages"] * logp * m).sum() / m.sum()
    hidden = trainer.critic.lm(input_ids=s.ids, attention_mask=s.attn, output_hidden_states=True).hidden_states[-1]
    v = trainer.critic.head(hidden).squeeze(-1)[:, s.start - 1:-1] - trainer.critic.offset
    vm = ex["vmask"].float()
    vf = 0.5 * ((v - ex["returns"]) ** 2 * vm).sum() / vm.sum()
    (pg + cfg.vf_coef * vf).backward()
    return {**{f"policy.{n}": p.grad for n, p in trainer.policy.named_parameters() if p.grad is not None},
            **{f"critic.{n}": p.grad for n, p in trainer.critic.named_parameters() if p.grad is not None}}


def max_rel_diff(a, b):
    assert a.keys() == b.keys()
    scale = max(float(g.abs().max()) for g in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def test_ppo_gradient_under_a2c_preset_is_the_a2c_gradient(tmp_path, monkeypatch):
    trainer, ex, g_ppo = trainer_gradient(tmp_path, monkeypatch, {"preset": "a2c"})
    assert isinstance(trainer.optimizer, torch.optim.RMSprop)
    assert trainer.optimizer.defaults["alpha"] == 0.99 and trainer.optimizer.defaults["eps"] == 1e-5
    g_a2c = a2c_gradient(trainer, ex)
    assert any(k.startswith("policy.") for k in g_a2c) and any(k.startswith("critic.") for k in g_a2c)
    assert max_rel_diff(g_ppo, g_a2c) < 1e-4


def test_the_comparison_fails_for_default_ppo_with_a_moved_policy(tmp_path, monkeypatch):
    # default PPO (batch whitening, two minibatches, value clip; one epoch is enough to show it)
    trainer, ex, g_ppo = trainer_gradient(tmp_path, monkeypatch, {"minibatches": 2, "micro_batch_size": 2, "epochs": 1},
                                          perturb=True)
    assert max_rel_diff(g_ppo, a2c_gradient(trainer, ex)) > 1e-2


@pytest.mark.parametrize("key,value,match", [("optimizer", "sgd", "adamw, rmsprop"),
                                             ("rmsprop_alpha", "1.5", "rmsprop_alpha must be in")])
def test_optimizer_keys_are_checked(key, value, match):
    with pytest.raises(config.ConfigError, match=match):
        build("ppo", None, {key: value})
