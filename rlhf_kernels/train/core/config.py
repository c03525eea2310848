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
    # LoRA through peft (lora.py, ALGORITHMS.md §11): sft/ppo/dpo/rto then train adapters only
    lora_r: int = 0                   # adapter rank; 0 = off (full fine-tuning)
    lora_alpha: float = 16.0          # adapter output scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0         # N+ detail 7: off; > 0 drops adapter inputs in the update forwards only
    lora_target_modules: str = "all-linear"  # peft: every Linear/Conv1D but the LM head; or "q_proj,v_proj,..."


@dataclass
class SFTConfig(RunConfig):
    model: str = "tiny-llama"         # "tiny-llama", "tiny-gpt2" (built from a config) or a saved model dir
    examples: int = 4000
    steps: int = 200
    lr: float = 3e-3
    eval_every: int = 50
    task: str = "sentiment"           # confidence task (PPO-C/PPO-M): "sentiment" (default) or "confidence"


@dataclass
class RMConfig(RunConfig):
    model: str = "tiny-llama"         # backbone init: a saved model dir (the SFT policy) or a tiny arch name
    pairs: int = 3000
    label_noise: float = 0.0          # probability of flipping a preference label
    steps: int = 100
    lr: float = 1e-3
    normalize: bool = True            # N+ detail 15: subtract the mean score on SFT demonstrations
    # PPO-M, calibrated reward modelling (ALGORITHMS.md §8; crm.py)
    task: str = "sentiment"           # "sentiment" (default) or "confidence" (confidence.py)
    calibrated: bool = False          # train with the CRM loss on content ⊕ high/low confidence
    crm_loss: str = "sigmoid"         # "sigmoid" (source default), "combined" (+ plain pair), "variant_1" (+ (cwh, rwl))
    crm_low_max: int = 3              # low confidences are uniform on 0..crm_low_max
    crm_high_min: int = 7             # high confidences are uniform on crm_high_min..10
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
    # PPO-max (ALGORITHMS.md §2), A2C as PPO (§5), reference EMA (§1.12), presets; all off by default
    preset: str = ""                  # a name in PRESETS, applied under the config file and the overrides
    reward_norm: str = "none"         # running score moments: "scale" r/σ, "normalize" (r−μ)/σ, then score_clip
    advantage_whiten_level: str = "batch"  # "batch" (N+) or "minibatch" (PPO-max: whiten each minibatch)
    advantage_clip: Optional[float] = None  # clamp(A, ±c) after whitening (PPO-max code default 0.5)
    critic_pretrain_steps: int = 0    # the first N of `steps` iterations update the critic only
    ptx_coef: float = 0.0             # PPO-ptx: + coef·token-mean CE on SFT demonstrations (the pretraining corpus)
    ptx_batch_size: int = 32          # demonstrations per optimizer step for the ptx loss
    ptx_examples: int = 4000          # size of that corpus
    optimizer: str = "adamw"          # "adamw" or "rmsprop" (A2C)
    optimizer_eps: float = 1e-5       # eps of either optimizer (N+ AdamW 1e-5, SB3 A2C RMSprop 1e-5)
    rmsprop_alpha: float = 0.99       # RMSprop smoothing constant (SB3 A2C)
    ref_ema: Optional[float] = None   # η: θ_ref ← (1−η)θ_ref + η·θ_actor after each PPO iteration
    # PPO-C, calibrated reward calculation (ALGORITHMS.md §8; calibration.py)
    task: str = "sentiment"           # "sentiment" (default) or "confidence" (confidence.py)
    ppo_c: bool = False               # score the content without its confidence, then adjust by the confidence
    ppo_c_alpha: float = 0.1          # EMA rate of the running reward mean r̄
    ppo_c_w: float = 2.0              # adjustment weight w (the paper's script; code default 0.5)
    ppo_c_adjustment: str = "difference"  # "difference" (script) or "threshold" (code default)
    ppo_c_rbar_init: float = 0.0      # r̄_0: the stored mean of a normalised RM, 0 once its offset is subtracted
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


# --- classic-RL PPO on CartPole (issue 6 item 9; train/classic.py). Of RunConfig it uses out, seed,
# steps, lr, max_grad_norm, anneal_lr, save_every, eval_every, device, progress; the LM keys are unused.
@dataclass
class CartPoleConfig(RunConfig):
    steps: int = 60                   # PPO iterations, each envs × horizon environment steps
    lr: float = 2.5e-3
    max_grad_norm: Optional[float] = 0.5
    envs: int = 16                    # CartPoles stepped side by side (rows of the batch)
    horizon: int = 128                # steps per row and iteration; a row holds several episodes
    max_episode_steps: int = 500      # CartPole-v1's cap; reaching it truncates the episode
    truncation: str = "bootstrap"     # "bootstrap": fold γ·V(final state) into the capped step; "done": treat as terminal
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.99
    lam: float = 0.95
    clip_low: float = 0.2
    vf_clip: Optional[float] = None   # returns reach ~100 here, so ε_v = 0.2 would only slow the critic
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    whiten_advantages: bool = True
    hidden: int = 64                  # width of the two tanh layers of the actor and of the critic
    eval_every: int = 10
    eval_episodes: int = 32
    greedy_eval: bool = False         # evaluate the argmax action instead of sampling the policy


CONFIGS = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig, "rto": RTOConfig,
           "cartpole": CartPoleConfig}
# RRHF (ALGORITHMS.md §6, issue 6 item 4) --------------------------------------------------------
@dataclass
class RRHFConfig(RunConfig):
    policy: str = "tiny-llama"        # initial policy (a saved SFT model dir)
    reward_model: str = "gold"        # a saved RM dir, or "gold" for the programmatic reward
    batch_size: int = 16              # prompts per step (each with samples + demonstrations candidates)
    micro_batch_size: int = 4         # prompts per micro-batch; a prompt's candidates stay together
    samples: int = 4                  # k responses per prompt sampled from the current policy (paper: 4)
    demonstrations: int = 2           # SFT demonstrations per prompt as extra candidates (paper: the 2 HH responses)
    length_penalty: float = 1.0       # α in p_i = Σ_t log π / ‖y_i‖^α (1: length-normalised)
    rrhf_weight: float = 1.0          # L = rrhf_weight·L_rank + L_ft (paper and train.sh: 1)
    sft_aggregation: str = "padded-mean"  # L_ft: "padded-mean" (source code), "token-sum" (paper), "token-mean"
    steps: int = 30
    lr: float = 1e-3
    eval_every: int = 10


CONFIGS["rrhf"] = RRHFConfig  # RRHF (issue 6 item 4)


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
    rm_pairs: int = 150               # few, noisy pairs: proxies good enough to learn from, flawed
    rm_label_noise: float = 0.35      # enough to be exploited (README: the measured run)
    rm_steps: int = 40
    rm_lr: float = 1e-3
    steps: int = 150                  # long enough for the single proxy's gold reward to peak and fall
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
    "task": ("sentiment", "confidence"), "crm_loss": ("sigmoid", "combined", "variant_1"),
    "ppo_c_adjustment": ("difference", "threshold"),
    "sft_aggregation": ("padded-mean", "token-sum", "token-mean"),  # RRHF
    "truncation": ("bootstrap", "done"),
    "reward_norm": ("none", "scale", "normalize"), "advantage_whiten_level": ("batch", "minibatch"),
    "optimizer": ("adamw", "rmsprop"),
}

# Presets (PPO and RTO): settings applied before the config file and the overrides, which can
# still change any of them. Each setting names its source in ALGORITHMS.md.
PRESETS = {
    # PPO-max, Secrets of RLHF Part I §5.4 (ALGORITHMS.md §2)
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
    # A2C as a special case of PPO, Huang et al. 2022 (ALGORITHMS.md §5): one full-batch step per
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
    if base is float and isinstance(value, str):  # YAML 1.1 reads "5e-3" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
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
    cfg = _fill(CONFIGS.get(kind) or COMMANDS[kind], kind, file, overrides)
    check(cfg)
    return cfg


def _fill(cls, kind, file, overrides):
    """An instance of `cls` from its defaults, a preset, `file`, then `overrides`, every key checked."""
    valid = [f.name for f in dataclasses.fields(cls)]
    values = {}
    layers = ([(read_file(file), f"config file {file}")] if file else []) + [(overrides or {}, "override")]
    layers = _preset_layer(cls, layers) + layers
    for settings, source in layers:
        for key, value in settings.items():
            key = str(key).replace("-", "_")
            if key not in valid:
                raise ConfigError(f"{source}: unknown key {key!r} for '{kind}'; valid keys: {', '.join(valid)}")
            values[key] = _coerce(cls, key, value, source)
    return cls(**values)


def _preset_layer(cls, layers):
    """[(settings, source)] of the preset named by the last layer that sets `preset`, or []."""
    name = ""
    for settings, source in layers:
        for key, value in settings.items():
            if str(key).replace("-", "_") == "preset":
                if "preset" not in {f.name for f in dataclasses.fields(cls)}:
                    return []  # the key check in build() reports it as unknown for this trainer
                name = "" if value is None else str(value)
    if not name:
        return []
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return [(PRESETS[name], f"preset {name}")]


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
        check_ppo_extras(cfg)
    elif isinstance(cfg, CartPoleConfig):
        for key in ("envs", "horizon", "max_episode_steps", "eval_episodes", "hidden"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
        if (cfg.envs * cfg.horizon) % cfg.minibatches:
            raise ConfigError(f"envs × horizon ({cfg.envs * cfg.horizon}) must be divisible by minibatches "
                              f"({cfg.minibatches})")
    elif cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by micro_batch_size "
                          f"({cfg.micro_batch_size})")
    if isinstance(cfg, RTOConfig) and not cfg.dpo_model:
        raise ConfigError("rto needs dpo_model (a saved DPO policy directory)")
    if isinstance(cfg, RRHFConfig):
        if cfg.samples < 1 or cfg.demonstrations < 0 or cfg.samples + cfg.demonstrations < 2:
            raise ConfigError(f"rrhf ranks at least 2 candidates per prompt: samples must be >= 1 and "
                              f"demonstrations >= 0 with samples + demonstrations >= 2, got samples={cfg.samples}, "
                              f"demonstrations={cfg.demonstrations}")
        for key in ("length_penalty", "rrhf_weight"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    check_lora(cfg)
    check_calibration(cfg)
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


def check_ppo_extras(cfg):
    """The PPO-max, A2C and reference-EMA keys (ALGORITHMS.md §2, §5, §1.12)."""
    if cfg.advantage_clip is not None and cfg.advantage_clip <= 0:
        raise ConfigError(f"advantage_clip must be > 0 or null, got {cfg.advantage_clip}")
    if not 0 <= cfg.critic_pretrain_steps < cfg.steps:
        raise ConfigError(f"critic_pretrain_steps must be in [0, steps={cfg.steps}), got {cfg.critic_pretrain_steps}")
    if cfg.ptx_coef < 0:
        raise ConfigError(f"ptx_coef must be >= 0, got {cfg.ptx_coef}")
    for key in ("ptx_batch_size", "ptx_examples"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.optimizer_eps <= 0:
        raise ConfigError(f"optimizer_eps must be > 0, got {cfg.optimizer_eps}")
    if not 0 <= cfg.rmsprop_alpha < 1:
        raise ConfigError(f"rmsprop_alpha must be in [0, 1), got {cfg.rmsprop_alpha}")
    if cfg.ref_ema is not None and not 0 <= cfg.ref_ema <= 1:
        raise ConfigError(f"ref_ema must be in [0, 1] or null, got {cfg.ref_ema}")
    if cfg.reward_norm != "none" and cfg.batch_size < 2:
        raise ConfigError(f"reward_norm={cfg.reward_norm!r} needs batch_size >= 2 (an unbiased std), "
                          f"got {cfg.batch_size}")


def check_lora(cfg):
    if cfg.lora_r < 0:
        raise ConfigError(f"lora_r must be >= 0 (0 = LoRA off), got {cfg.lora_r}")
    if cfg.lora_r == 0:
        return
    if isinstance(cfg, RMConfig):
        raise ConfigError("lora_r: LoRA applies to the policy trainers (sft, ppo, dpo, rto), not rm")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not cfg.lora_target_modules.strip(" ,"):
        raise ConfigError("lora_target_modules must be 'all-linear' or a comma-separated list of module names")
    if getattr(cfg, "ref_ema", None) is not None and not getattr(cfg, "ref", ""):
        raise ConfigError("ref_ema with lora_r > 0: the reference is the policy with its adapters disabled, "
                          "which has no weights of its own to average; pass --ref=DIR or turn ref_ema off")


def check_calibration(cfg):
    """PPO-C / PPO-M settings: both need the confidence task."""
    if getattr(cfg, "ppo_c", False) or getattr(cfg, "calibrated", False):
        key = "ppo_c" if getattr(cfg, "ppo_c", False) else "calibrated"
        if cfg.task != "confidence":
            raise ConfigError(f"{key} needs task=confidence (responses that state a confidence), got task={cfg.task!r}")
    if isinstance(cfg, PPOConfig) and not 0 < cfg.ppo_c_alpha <= 1:
        raise ConfigError(f"ppo_c_alpha must be in (0, 1], got {cfg.ppo_c_alpha}")
    if isinstance(cfg, RMConfig) and not 0 <= cfg.crm_low_max < cfg.crm_high_min <= 10:
        raise ConfigError(f"need 0 <= crm_low_max < crm_high_min <= 10, got crm_low_max={cfg.crm_low_max}, "
                          f"crm_high_min={cfg.crm_high_min}")


def to_dict(cfg):
    return dataclasses.asdict(cfg)


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


def build_generate(file=None, overrides=None, cls=None, kind="generate"):
    """GenerateConfig (or its subclass `cls`) from defaults, then `file`, then `overrides`, checked."""
    cfg = _fill(cls or GenerateConfig, kind, file, overrides)
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


__all__ = ["ConfigError", "CONFIGS", "PRESETS", "build", "build_generate", "read_file", "to_dict"]
