"""The run machinery every command shares: config parsing (config.py) and the keys of every trainer
(run_config.py), the command registry (commands.py), the run directory with its metrics and atomic
checkpoints (runlog.py), the step loop (loop.py), optimisers, plots, models and LoRA."""
