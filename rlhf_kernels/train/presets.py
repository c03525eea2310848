"""Presets of `train ppo` and `train rto` (`--preset NAME`): settings applied before the config file
and the overrides, which can still change any of them. Each setting names its source in docs/algorithms.md."""

PRESETS = {
    # PPO-max, Secrets of RLHF Part I §5.4 (docs/algorithms.md §2)
    "ppo-max": {
        "reward_norm": "normalize",        # "normalize and clip the current group of rewards based on
                                           # historical mean and variance"
        "score_clip": 0.8,                 # δ of that clip: the "relaxed" one of the paper's sweep (0.3, 0.8)
        "kl_coef": 0.05,                   # token-level KL penalty, η = 0.05 as recommended in the paper
        "critic_init": "reward",           # "initialize the critic model with our reward model"
        "critic_pretrain_steps": 5,        # "and pre-train it before applying PPO"; 5 of 30 iterations here
        "max_grad_norm": 1.0,              # "global gradient clipping" (DeepSpeed gradient_clipping 1.0)
        "batch_size": 128,                 # "a small size of the experience buffer": 128 rollouts per buffer,
        "minibatches": 4,                  # train batch 32 (128 / 4),
        "epochs": 1,                       # one pass, then the buffer is cleared (MOSS num_rollouts / batch_size)
        "ptx_coef": 0.1,                   # "add pre-train language model loss" (PPO-ptx); the paper gives no weight
        "vf_clip": 0.2,                    # "simultaneously clip the value function loss" (value_clip 0.2)
        "vf_coef": 1.0,                    # MOSS vf_loss_weight
        "whiten_advantages": True,         # advantage normalization, at the minibatch level as in the MOSS code
        "advantage_whiten_level": "minibatch",
        "advantage_clip": None,            # off: App. B.1 warns against advantage clip together with value clip
        "gamma": 1.0, "lam": 0.95,         # GAE as in the MOSS code
        "clip_low": 0.2,                   # pg_clip
    },
    # A2C as a special case of PPO, Huang et al. 2022 (docs/algorithms.md §5): one full-batch step per
    # rollout, so the ratio is 1 where the gradient is taken and the clipped loss is A2C's
    "a2c": {
        "epochs": 1,                       # K = 1 update epoch
        "minibatches": 1,                  # update on the whole batch
        "whiten_advantages": False,        # normalize_advantage=False
        "advantage_clip": None,
        "whiten_rewards": False,
        "lam": 1.0,                        # gae_lambda = 1 (n-step returns)
        "vf_clip": None,                   # clip_range_vf=None
        "anneal_lr": False,                # no LR annealing
        "dual_clip": None,                 # (the trainer has no entropy bonus: entropy coefficient 0)
        "optimizer": "rmsprop",            # RMSprop, alpha 0.99, eps 1e-5, weight_decay 0 (SB3 A2C)
        "rmsprop_alpha": 0.99,
        "optimizer_eps": 1e-5,
    },
}
