"""The allowed values of every string option, each listed once: the ops validate against these, the
trainer's config types are these `Literal`s (so `--help` and the config checks read them from here),
and the native kernels' enums follow the op-level orders (ops/_common.py turns them into codes that
tests check against the C++ enums). Import nothing heavy here: ops and trainer both load this module."""
from typing import Literal, get_args

# --- op options; the position of a value is its code in csrc/common.h ----------------------------
KLEstimator = Literal["k1", "k2", "k3"]                                                  # KlEstimator
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]  # Aggregation
DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]                                # DpoLoss
ScorePosition = Literal["last", "eos+1"]
GroupBaseline = Literal["mean", "leave_one_out", "none"]                                  # GroupBaseline
GroupScale = Literal["std", "none"]                                                       # GroupScale
RCLevel = Literal["token", "sequence", "geometric"]                                       # RcLevel
RCMode = Literal["truncate", "mask"]                                                      # RcMode
RatioLevel = Literal["token", "sequence"]                                                 # RatioLevel
PolicyLossType = Literal["ppo", "cispo"]                                                  # PolicyLoss

# --- trainer options -----------------------------------------------------------------------------
LogprobImpl = Literal["fused", "naive"]
Task = Literal["sentiment", "confidence"]
CriticInit = Literal["reward", "policy"]
NoEOSPenalty = Literal["replace", "subtract", "none"]
RewardNorm = Literal["none", "scale", "normalize"]
WhitenLevel = Literal["batch", "minibatch"]
Optimizer = Literal["adamw", "rmsprop"]
PPOCAdjustment = Literal["difference", "threshold"]
EnsembleReduce = Literal["mean", "wco", "uwo"]
CRMLoss = Literal["sigmoid", "combined", "variant_1"]
SFTAggregation = Literal["padded-mean", "token-sum", "token-mean"]
Truncation = Literal["bootstrap", "done"]
KLPenalty = Literal["logratio", "probdiff"]
RolloutDtype = Literal["fp32", "bf16"]
RolloutCorrection = Literal["none", "tis", "mis", "icepop"]
GRPODenominator = Literal["global", "local", "max_len"]


def values(literal):
    """The allowed values of a `Literal` type, in order."""
    return get_args(literal)


def codes(literal):
    """{value: position}: the integer a native kernel receives for each value."""
    return {v: i for i, v in enumerate(get_args(literal))}
