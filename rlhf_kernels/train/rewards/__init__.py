"""Reward models beyond the plain Bradley-Terry one of `train rm`: scoring helpers, ensembles
(docs/algorithms.md §7), the calibrated reward model of PPO-M and the PPO-C reward adjustment (§8)."""
