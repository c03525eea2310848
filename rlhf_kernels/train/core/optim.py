"""The PPO optimizer choice: AdamW (runlog.make_optimizer, the default) or RMSprop as in A2C
(Stable-Baselines3: alpha 0.99, eps 1e-5, weight decay 0; ALGORITHMS.md §5)."""
import torch

from .runlog import make_optimizer


def make_ppo_optimizer(cfg, groups):
    """An optimizer over param groups [(params, lr)], each group keeping `base_lr` for annealing."""
    if cfg.optimizer == "adamw":
        return make_optimizer(groups, eps=cfg.optimizer_eps)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop([{"params": [p for p in ps if p.requires_grad], "lr": lr, "base_lr": lr}
                                    for ps, lr in groups], alpha=cfg.rmsprop_alpha, eps=cfg.optimizer_eps,
                                   weight_decay=0.0)
    raise ValueError(f"optimizer must be adamw or rmsprop, got {cfg.optimizer!r}")
