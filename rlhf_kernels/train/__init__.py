"""Compact SFT, reward-model, PPO, DPO and RTO trainers built only on the public rlhf_kernels ops,
with an embedded synthetic task (tasks.py) so that nothing needs downloading. Entry point: cli.py."""
