"""Experiments that chain several commands and print a table: `rlhf-kernels demo`, `experiment
overoptimization`, `experiment calibration`, `experiment mcts`."""
