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

CHOICES = {
    "logprob_impl": ("fused", "naive"), "critic_init": ("reward", "policy"), "kl_estimator": ("k1", "k2", "k3"),
    "score_position": ("last", "eos+1"), "no_eos_penalty": ("replace", "subtract", "none"),
    "aggregation": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"),
    "loss_type": ("sigmoid", "ipo", "hinge", "robust"),
}


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
    if kind not in CONFIGS:
        raise ConfigError(f"unknown trainer {kind!r}; expected one of {', '.join(CONFIGS)}")
    cls = CONFIGS[kind]
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


def to_dict(cfg):
    return dataclasses.asdict(cfg)


__all__ = ["ConfigError", "CONFIGS", "build", "read_file", "to_dict"]


# --- PPO-MCTS value-guided decoding: `rlhf-kernels generate` (generate.py, mcts.py; ALGORITHMS.md §9) ------
# Not a trainer (no run directory, no checkpoint), so it is not in CONFIGS; build_generate reads it.
@dataclass
class GenerateConfig:
    policy: str = ""                  # saved policy dir (a PPO run's model/) or a tiny arch name
    critic: str = ""                  # saved value model (a PPO run's critic/): V(prefix) at its last position
    mcts: bool = False                # value-guided search; else plain greedy / sampled decoding
    reward_model: str = ""            # saved RM: value of terminal <eos> nodes = reward_gain·RM + reward_bias
    ref: str = ""                     # reference policy of the KL step penalty (needed when kl_coef > 0)
    simulations: int = 10             # S per generated token (released code's default)
    c_puct: float = 8.0
    top_k: int = 10                   # children kept per node (the k highest priors)
    te: float = 1.0                   # prior temperature: P = softmax(z / te)
    td: float = 1.0                   # decision temperature: π(a) ∝ N(root, a)^(1/td)
    anneal_td: bool = True            # td·(1 − t/max_new_tokens) at token t
    do_sample: bool = False           # sample the decision (MCTS: from N^(1/td); else: at `temperature`)
    top_p: float = 1.0                # nucleus filter of the sampled MCTS decision
    kl_coef: float = 0.0              # > 0: backup Q = γ·V(s') + klpen(s, a)
    klpen: str = "logratio"           # "logratio": −β·log(π/π_ref)(a|s) (paper); "probdiff": −β·(π − π_ref)(a|s) (code)
    clamp_kl: bool = False            # clamp the log-ratio / probability difference at >= 0 (code's clamp_kl)
    gamma: float = 1.0
    reward_gain: float = 1.0
    reward_bias: float = 0.0
    no_eos_value: Optional[float] = -1.0  # value of a node at max_new_tokens without <eos> (PPO's default
    #                                   penalty_value under no_eos_penalty=replace); none: the critic's V
    temperature: float = 1.0          # sampling temperature of plain (non-MCTS) sampled decoding
    max_new_tokens: int = 10
    prompts: int = 128                # held-out prompts, drawn with prompt_seed
    prompt_seed: int = 424_242        # rollout.EVAL_SEED: the prompts every trainer evaluates on
    seed: int = 0                     # sampling seed
    batch_size: int = 128             # prompts decoded (and searched) together
    out: str = ""                     # JSON file for the summary and every response
    device: str = "cpu"
    progress: bool = True


CHOICES["klpen"] = ("logratio", "probdiff")


def build_generate(file=None, overrides=None):
    """GenerateConfig from defaults, then `file`, then `overrides`, checked like a trainer config."""
    valid = [f.name for f in dataclasses.fields(GenerateConfig)]
    values = {}
    layers = ([(read_file(file), f"config file {file}")] if file else []) + [(overrides or {}, "override")]
    for settings, source in layers:
        for key, value in settings.items():
            key = str(key).replace("-", "_")
            if key not in valid:
                raise ConfigError(f"{source}: unknown key {key!r} for 'generate'; valid keys: {', '.join(valid)}")
            values[key] = _coerce(GenerateConfig, key, value, source)
    cfg = GenerateConfig(**values)
    check_generate(cfg)
    return cfg


def check_generate(cfg):
    for key in ("simulations", "top_k", "max_new_tokens", "prompts", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("c_puct", "te", "td", "temperature", "reward_gain"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(cfg, key)}")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {cfg.top_p}")
    if not 0 < cfg.gamma <= 1:
        raise ConfigError(f"gamma must be in (0, 1], got {cfg.gamma}")
    if cfg.kl_coef < 0:
        raise ConfigError(f"kl_coef must be >= 0, got {cfg.kl_coef}")
    if not cfg.policy:
        raise ConfigError("generate needs policy (a saved model directory, e.g. runs/ppo/model)")
    if cfg.mcts and not cfg.critic:
        raise ConfigError("generate --mcts needs critic (the PPO run's value model, e.g. runs/ppo/critic)")
    if cfg.mcts and cfg.kl_coef > 0 and not cfg.ref:
        raise ConfigError("generate --mcts with kl_coef > 0 needs ref (the PPO run's reference policy, "
                          "e.g. runs/sft/model)")
