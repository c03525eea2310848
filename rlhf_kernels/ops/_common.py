"""Argument validation and the small helpers every public op shares."""
import math

import torch

from .. import _backend
from .._choices import (
    Aggregation,
    DPOLossType,
    GroupBaseline,
    GroupScale,
    KLEstimator,
    PolicyLossType,
    RatioLevel,
    RCLevel,
    RCMode,
    codes,
)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# {value: code} of csrc/common.h's enums; the values live in _choices.py
KL_CODES = codes(KLEstimator)
AGG_CODES = codes(Aggregation)
DPO_CODES = codes(DPOLossType)
BASELINE_CODES = codes(GroupBaseline)
SCALE_CODES = codes(GroupScale)
RC_LEVEL_CODES = codes(RCLevel)
RC_MODE_CODES = codes(RCMode)
RATIO_LEVEL_CODES = codes(RatioLevel)
POLICY_LOSS_CODES = codes(PolicyLossType)

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except Exception:  # not installed, or unusable on this platform
    HAVE_TRITON = False

HAVE_C = _backend._C is not None


def float_tensor(name, x, ndim_min=0):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float64, bfloat16 or float16), got {x.dtype}")
    if x.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(x.shape)}")
    return x


def int_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got {x.dtype}")
    return x


def mask_tensor(name, mask, shape):
    """A bool or 0/1 mask of exactly `shape`, returned as bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool or 0/1), got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or 0/1 tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def same_shape(ref_name, ref, **others):
    for name, x in others.items():
        if x is not None and tuple(x.shape) != tuple(ref.shape):
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def same_device(**tensors):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; put all inputs on one device")
    return t0.device


def choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def number(name, value, *, positive=False, nonneg=False, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonneg and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def rows(x, dtype=None):
    """[..., T] -> contiguous [R, T] (a view when possible), cast to `dtype`; R counted explicitly, since
    reshape(-1, 0) is ambiguous for T = 0."""
    x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    return (x if dtype is None else x.to(dtype)).contiguous()


def backend_for(backend, device, op, implemented):
    """The backend to run: as `_backend.choose`, restricted to the backends `op` implements."""
    name = _backend.choose(backend, device, op)
    if name in implemented:
        return name
    if backend is not None:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op (it has {implemented})")
    # an automatic choice falls back along the op's order of preference
    return next(b for b in _backend.preference(op, device.type) if b in implemented and _backend._usable(b, device.type))


def temperature_arg(temperature, tokens, dtype, validate):
    """(t, per_token): a positive number t and None, or 1.0 and the per-token temperatures (a tensor broadcastable
    to tokens.shape) expanded to a contiguous tensor of tokens.shape in `dtype`, detached (no gradient flows into a
    temperature). Checking a tensor's values (> 0, not NaN) syncs with the device, so only validate=True does it."""
    if not isinstance(temperature, torch.Tensor):
        return number("temperature", temperature, positive=True), None
    if not (temperature.dtype.is_floating_point or temperature.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"temperature must be a number or a float tensor, got a tensor of {temperature.dtype}")
    if temperature.device != tokens.device:
        raise ValueError(f"temperature is on {temperature.device} but tokens is on {tokens.device}; "
                         "put all inputs on one device")
    try:
        t = temperature.detach().to(dtype).expand(tokens.shape)
    except RuntimeError:
        raise ValueError(f"temperature must be a number or a tensor broadcastable to tokens.shape "
                         f"{tuple(tokens.shape)}, got shape {tuple(temperature.shape)}") from None
    if validate and t.numel() and not torch.compiler.is_compiling() and not bool((t > 0).all()):
        raise ValueError("temperature must be > 0 (and not NaN) at every token")
    return 1.0, t.contiguous()


def bool_arg(name, value):
    """A flag that must be a real bool (not 0/1, not None): the kernels take it as a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def softcap_arg(softcap):
    """softcap as the kernels take it: c > 0, or 0.0 for none."""
    c = number("softcap", softcap, positive=True, optional=True)
    return 0.0 if c is None else c


def top_k_arg(top_k, tokens, validate):
    """top_k as the kernels take it: None (off), or an int64 tensor of tokens.shape (k <= 0: off for that token).
    A number or an integer tensor broadcastable to tokens.shape."""
    if top_k is None:
        return None
    if isinstance(top_k, torch.Tensor):
        if top_k.dtype.is_floating_point or top_k.dtype.is_complex or top_k.dtype == torch.bool:
            raise TypeError(f"top_k must be an int or an integer tensor, got a tensor of {top_k.dtype}")
        if top_k.device != tokens.device:
            raise ValueError(f"top_k is on {top_k.device} but tokens is on {tokens.device}; put all inputs on one device")
        try:
            return top_k.detach().to(torch.int64).expand(tokens.shape).contiguous()
        except RuntimeError:
            raise ValueError(f"top_k must be an int or a tensor broadcastable to tokens.shape {tuple(tokens.shape)}, "
                             f"got shape {tuple(top_k.shape)}") from None
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int (<= 0: off) or an integer tensor, got {type(top_k).__name__}")
    return None if top_k <= 0 else torch.full(tokens.shape, top_k, dtype=torch.int64, device=tokens.device)


def top_p_arg(top_p, tokens, dtype, validate):
    """top_p as the kernels take it: None (off), or a tensor of tokens.shape in `dtype` with values in (0, 1]
    (1: off for that token). Checking a tensor's values syncs with the device, so only validate=True does it."""
    if top_p is None:
        return None
    if isinstance(top_p, torch.Tensor):
        if not top_p.dtype.is_floating_point:
            raise TypeError(f"top_p must be a number or a float tensor, got a tensor of {top_p.dtype}")
        if top_p.device != tokens.device:
            raise ValueError(f"top_p is on {top_p.device} but tokens is on {tokens.device}; put all inputs on one device")
        try:
            p = top_p.detach().to(dtype).expand(tokens.shape).contiguous()
        except RuntimeError:
            raise ValueError(f"top_p must be a number or a tensor broadcastable to tokens.shape "
                             f"{tuple(tokens.shape)}, got shape {tuple(top_p.shape)}") from None
        if validate and p.numel() and not torch.compiler.is_compiling() and not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError("top_p must lie in (0, 1] at every token (1: off)")
        return p
    p = number("top_p", top_p)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1: off), got {p}")
    return None if p == 1 else torch.full(tokens.shape, p, dtype=dtype, device=tokens.device)
