"""Trainer configurations: one dataclass per algorithm, read from JSON/YAML files (as data, never
evaluated) and `--key=value` overrides. Every knob traces to ALGORITHMS.md; defaults are tuned
for the embedded task (tasks.py) so that `make demo` finishes in minutes on two CPU cores."""
import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


@dataclass
class RunConfig:
    out: str = ""                     # run directory (metrics.jsonl, checkpoint.pt, curves.png, model/)
    seed: int = 0
    steps: int = 100                  # optimizer steps (SFT, RM, DPO) or PPO iterations (PPO, RTO)
    lr: float = 1e-3
    batch_size: int = 32
    micro_batch_size: int = 32        # gradient accumulation splits a batch into micro-batches of this size
    max_grad_norm: Optional[float] = 1.0
    anneal_lr: bool = True            # linear decay to 0 over `steps` (N+ `lrnow = frac·lr`)
    save_every: int = 25              # checkpoint period in steps; the last step is always saved
    eval_every: int = 25              # gold-reward evaluation period in steps (sampling is the costly part)
    eval_prompts: int = 128
    temperature: float = 1.0          # sampling temperature; every policy log-prob divides logits by it
    max_new_tokens: int = 10
    logprob_impl: str = "fused"       # "fused": rk.linear_logprobs on hidden states; "naive": logits + log_softmax
    device: str = "cpu"
    progress: bool = True


@dataclass
class SFTConfig(RunConfig):
    model: str = "tiny-llama"         # "tiny-llama", "tiny-gpt2" (built from a config) or a saved model dir
    examples: int = 4000
    steps: int = 200
    lr: float = 3e-3
    eval_every: int = 50


@dataclass
class RMConfig(RunConfig):
    model: str = "tiny-llama"         # backbone init: a saved model dir (the SFT policy) or a tiny arch name
    pairs: int = 3000
    label_noise: float = 0.0          # probability of flipping a preference label
    steps: int = 100
    lr: float = 1e-3
    normalize: bool = True            # N+ detail 15: subtract the mean score on SFT demonstrations
    # reward-model ensembles (ALGORITHMS.md §7): k > 1 trains out/member_0..k-1, seeds seed..seed+k-1,
    # all on the same preference data (data_seed; None: seed)
    ensemble: int = 1
    data_seed: Optional[int] = None


@dataclass
class PPOConfig(RunConfig):
    policy: str = "tiny-llama"        # initial policy (saved SFT model dir); also the reference unless `ref`
    ref: str = ""
    reward_model: str = "gold"        # a saved RM dir, or "gold" for the programmatic reward
    critic_init: str = "reward"       # "reward" (N+: backbone from the RM) or "policy"
    steps: int = 30
    batch_size: int = 64              # rollouts (episodes) per iteration
    minibatches: int = 2
    micro_batch_size: int = 16
    epochs: int = 4
    lr: float = 5e-4
    critic_lr: float = 1e-3
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: Optional[float] = None  # set: adaptive controller (Ziegler et al.), else fixed kl_coef
    kl_horizon: int = 10000
    score_position: str = "last"      # "last" (OpenRLHF) or "eos+1" (N+/TRL)
    score_clip: Optional[float] = 10.0
    no_eos_penalty: str = "replace"   # "replace" (N+), "subtract" (TRL) or "none"
    penalty_value: float = -1.0
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    advantage_unbiased: bool = False  # Bessel-corrected variance (TRL, EasyLM) or biased (N+)
    gamma: float = 1.0
    lam: float = 0.95
    clip_low: float = 0.2
    clip_high: Optional[float] = None
    dual_clip: Optional[float] = None
    vf_clip: Optional[float] = 0.2
    vf_coef: float = 0.1
    aggregation: str = "token-mean"
    eval_every: int = 10
    # reward-model ensembles (ALGORITHMS.md §7): used when reward_model names several RMs
    # (comma-separated dirs, or a dir written by `train rm --ensemble=k`)
    ensemble_reduce: str = "mean"     # "mean", "wco" (min over members) or "uwo" (mean − λ·variance)
    uwo_lambda: float = 0.1           # λ of UWO (Coste et al.'s PPO config)
    uwo_unbiased: bool = False        # variance /(k−1) (their PPO code) instead of /k (paper, BoN code)


@dataclass
class RTOConfig(PPOConfig):
    dpo_model: str = ""               # the DPO policy whose log-ratio gives the dense token reward
    dpo_ref: str = ""                 # reference of that ratio; defaults to the PPO reference
    dpo_reward_scale: float = 0.05    # β1
    dpo_reward_clip: Optional[float] = 0.05
    kl_coef: float = 0.01             # β2


@dataclass
class DPOConfig(RunConfig):
    policy: str = "tiny-llama"
    ref: str = ""                     # defaults to the initial policy
    pairs: int = 3000
    label_noise: float = 0.0
    loss_type: str = "sigmoid"        # any rk.dpo_loss type
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False      # ref log-ratio := 0 ("uniform reference")
    steps: int = 60                   # longer runs drift off the data (more responses without <eos>)
    lr: float = 1e-3
    eval_every: int = 10


CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig, "rto": RTOConfig}


# reward-model ensembles (ALGORITHMS.md §7): `rlhf-kernels bon` and `rlhf-kernels experiment overoptimization`
@dataclass
class BoNConfig(RunConfig):
    policy: str = "tiny-llama"        # the policy to sample from (a saved SFT model dir)
    reward_model: str = ""            # proxy: a saved RM dir, comma-separated dirs or an ensemble dir
    n: int = 16                       # largest n; gold and proxy are reported at n = 1, 2, 4, ..., n
    ensemble_reduce: str = "mean"
    uwo_lambda: float = 0.5           # Coste et al.'s BoN default
    uwo_unbiased: bool = False
    eval_prompts: int = 128


@dataclass
class OveroptConfig(PPOConfig):
    """The PPO keys apply to every PPO run of the experiment; the rest set up its SFT and proxy RMs."""
    policy: str = ""                  # "": train an SFT policy in out/sft (reused when present)
    reward_model: str = ""            # "": train the proxy ensemble in out/rms (reused when present)
    runs: str = "single,wco,uwo"      # PPO runs, any of single (member 0 alone), mean, wco, uwo
    sft_steps: int = 150
    members: int = 3
    rm_pairs: int = 300
    rm_label_noise: float = 0.3
    rm_steps: int = 40
    rm_lr: float = 1e-3
    steps: int = 40
    batch_size: int = 32
    minibatches: int = 2
    micro_batch_size: int = 16
    kl_coef: float = 0.01             # Coste et al.: a small KL penalty
    uwo_lambda: float = 0.5
    eval_every: int = 5
    eval_prompts: int = 128


COMMANDS = {"bon": BoNConfig, "overoptimization": OveroptConfig}

CHOICES = {
    "logprob_impl": ("fused", "naive"), "critic_init": ("reward", "policy"), "kl_estimator": ("k1", "k2", "k3"),
    "score_position": ("last", "eos+1"), "no_eos_penalty": ("replace", "subtract", "none"),
    "aggregation": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"),
    "loss_type": ("sigmoid", "ipo", "hinge", "robust"),
}
CHOICES["ensemble_reduce"] = ("mean", "wco", "uwo")  # reward-model ensembles


def read_file(path):
    """A dict of settings from a JSON or YAML file (yaml.safe_load: data only)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"config file {path} does not parse: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _coerce(cls, key, value, source):
    hint = typing.get_type_hints(cls)[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{source}: {key} cannot be null")
    if isinstance(value, str) and base is not str:
        import yaml
        try:
            value = yaml.safe_load(value)
        except Exception as e:
            raise ConfigError(f"{source}: {key}={value!r} does not parse: {e}") from e
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, int) and not isinstance(value, bool) if base is int else isinstance(value, base))
    if not ok:
        raise ConfigError(f"{source}: {key} must be {base.__name__}, got {value!r}")
    value = float(value) if base is float else value
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def build(kind, file=None, overrides=None):
    """The config of algorithm `kind` from defaults, then `file`, then `overrides` (key -> value/str)."""
    if kind not in CONFIGS and kind not in COMMANDS:
        raise ConfigError(f"unknown trainer {kind!r}; expected one of {', '.join(CONFIGS)}")
    cls = CONFIGS.get(kind) or COMMANDS[kind]
    valid = [f.name for f in dataclasses.fields(cls)]
    values = {}
    layers = ([(read_file(file), f"config file {file}")] if file else []) + [(overrides or {}, "override")]
    for settings, source in layers:
        for key, value in settings.items():
            key = str(key).replace("-", "_")
            if key not in valid:
                raise ConfigError(f"{source}: unknown key {key!r} for '{kind}'; valid keys: {', '.join(valid)}")
            values[key] = _coerce(cls, key, value, source)
    cfg = cls(**values)
    check(cfg)
    return cfg


def check(cfg):
    positive = ["steps", "batch_size", "micro_batch_size", "save_every", "eval_every", "eval_prompts",
                "max_new_tokens", "minibatches", "epochs"]
    for key in positive:
        if hasattr(cfg, key) and getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {cfg.temperature}")
    if isinstance(cfg, PPOConfig):
        if cfg.batch_size % cfg.minibatches:
            raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by minibatches ({cfg.minibatches})")
        mb = cfg.batch_size // cfg.minibatches
        if mb % cfg.micro_batch_size:
            raise ConfigError(f"the minibatch size batch_size/minibatches ({mb}) must be divisible by "
                              f"micro_batch_size ({cfg.micro_batch_size})")
        if cfg.dual_clip is not None and cfg.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1, got {cfg.dual_clip}")
    elif cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by micro_batch_size "
                          f"({cfg.micro_batch_size})")
    if isinstance(cfg, RTOConfig) and not cfg.dpo_model:
        raise ConfigError("rto needs dpo_model (a saved DPO policy directory)")
    for key in ("label_noise",):
        if hasattr(cfg, key) and not 0 <= getattr(cfg, key) < 0.5:
            raise ConfigError(f"{key} must be in [0, 0.5), got {getattr(cfg, key)}")
    check_ensemble(cfg)


def check_ensemble(cfg):
    """Reward-model ensemble keys (ALGORITHMS.md §7)."""
    for key in ("ensemble", "n", "members", "sft_steps", "rm_pairs", "rm_steps"):
        if hasattr(cfg, key) and getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if getattr(cfg, "uwo_lambda", 0.0) < 0:
        raise ConfigError(f"uwo_lambda must be >= 0, got {cfg.uwo_lambda}")
    if isinstance(cfg, OveroptConfig):
        if not 0 <= cfg.rm_label_noise < 0.5:
            raise ConfigError(f"rm_label_noise must be in [0, 0.5), got {cfg.rm_label_noise}")
        runs = [r.strip() for r in cfg.runs.split(",") if r.strip()]
        bad = [r for r in runs if r not in ("single", "mean", "wco", "uwo")]
        if bad or not runs or len(set(runs)) < len(runs):
            raise ConfigError(f"runs must be distinct names among single, mean, wco, uwo (comma-separated), "
                              f"got {cfg.runs!r}")


def to_dict(cfg):
    return dataclasses.asdict(cfg)


__all__ = ["ConfigError", "CONFIGS", "build", "read_file", "to_dict"]
