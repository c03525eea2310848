"""Presets of `train ppo` and `train rto` (PRESETS) and of `train grpo` (GRPO_PRESETS), `--preset NAME`:
settings applied before the config file and the overrides, which can still change any of them. Each
setting names its source (docs/algorithms.md; for GRPO_PRESETS, the paper)."""

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

# `train grpo` (docs/grpo.md): the published loss variants, each on top of the trainer's defaults. What a
# preset leaves unset (group size, learning rate, epochs) keeps the trainer's default, so the runs differ
# only in the loss.
GRPO_PRESETS = {
    # DeepSeekMath (Shao et al. 2024): group mean/std advantages, per-sequence token mean then mean over
    # sequences, k3 KL to the reference in the loss with β = 0.04, ε = 0.2
    "grpo": {"baseline": "mean", "scale": "std", "aggregation": "seq-mean-token-mean", "denominator": "global",
             "kl_coef": 0.04, "kl_estimator": "k3", "clip_low": 0.2, "clip_high": None, "loss_type": "ppo",
             "ratio_level": "token"},
    # Dr. GRPO (Liu et al. 2025): no std scaling, no length normalisation (the constant B·L_max divisor), no KL
    "dr_grpo": {"baseline": "mean", "scale": "none", "aggregation": "token-mean", "denominator": "max_len",
                "kl_coef": 0.0, "clip_low": 0.2, "clip_high": None, "loss_type": "ppo", "ratio_level": "token"},
    # DAPO (Yu et al. 2025), its loss only: clip-higher (0.2 / 0.28), token-level mean over the batch, no KL;
    # dynamic sampling and the overlong reward shaping are not part of this trainer
    "dapo": {"baseline": "mean", "scale": "std", "aggregation": "token-mean", "denominator": "global",
             "kl_coef": 0.0, "clip_low": 0.2, "clip_high": 0.28, "loss_type": "ppo", "ratio_level": "token"},
    # GSPO (Zheng et al. 2025): the length-normalised sequence ratio, clipped at 3e-4 / 4e-4, sequence mean, no KL
    "gspo": {"baseline": "mean", "scale": "std", "aggregation": "seq-mean-token-mean", "denominator": "global",
             "kl_coef": 0.0, "clip_low": 3e-4, "clip_high": 4e-4, "loss_type": "ppo", "ratio_level": "sequence"},
    # CISPO (MiniMax-M1, 2025): the detached clipped ratio weighs the log-prob's gradient; only ε_high is set
    # (the paper tunes it without giving a value: 4 here is our choice), token-level mean, no KL
    "cispo": {"baseline": "mean", "scale": "std", "aggregation": "token-mean", "denominator": "global",
              "kl_coef": 0.0, "clip_high": 4.0, "loss_type": "cispo", "ratio_level": "token"},
}
