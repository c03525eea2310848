"""Producing responses: sampling and evaluation (rollout.py), `rlhf-kernels generate` (greedy, sampled
or PPO-MCTS, generate.py and mcts.py) and best-of-n (`rlhf-kernels bon`, bon.py)."""
