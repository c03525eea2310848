"""Optimizers over param groups [(params, lr)], each group keeping `base_lr` for LR annealing: AdamW
(every trainer) and, for PPO, the choice of AdamW or RMSprop as in A2C (Stable-Baselines3: alpha
0.99, eps 1e-5, weight decay 0; docs/algorithms.md §5)."""
import torch


def make_optimizer(groups, eps=1e-5):
    """AdamW (eps 1e-5, N+) over param groups [(params, lr)]; `base_lr` is kept for annealing."""
    opt = torch.optim.AdamW([{"params": [p for p in ps if p.requires_grad], "lr": lr, "base_lr": lr}
                             for ps, lr in groups], eps=eps)
    return opt


def make_ppo_optimizer(cfg, groups):
    """An optimizer over param groups [(params, lr)], each group keeping `base_lr` for annealing."""
    if cfg.optimizer == "adamw":
        return make_optimizer(groups, eps=cfg.optimizer_eps)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop([{"params": [p for p in ps if p.requires_grad], "lr": lr, "base_lr": lr}
                                    for ps, lr in groups], alpha=cfg.rmsprop_alpha, eps=cfg.optimizer_eps,
                                   weight_decay=0.0)
    raise ValueError(f"optimizer must be adamw or rmsprop, got {cfg.optimizer!r}")
