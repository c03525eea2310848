"""Compact trainers built only on the public rlhf_kernels ops, on embedded tasks (tasks/) so that
nothing needs downloading: one module per `rlhf-kernels train` command (sft, rm, ppo, dpo, rto, rrhf,
cartpole), reward models (rewards/), decoding (decode/), experiments (experiments/) and the shared
run machinery (core/). The command line is cli.py over the registry of core/commands.py."""
