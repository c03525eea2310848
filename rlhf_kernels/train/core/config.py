"""Reading a command's config: a dataclass whose fields carry their own help and topic (`topic`),
filled from its defaults, then a preset, then a JSON/YAML file (parsed as data, never evaluated),
then `--key=value` overrides, every value checked against the field's type (a `Literal` lists the
allowed values, rlhf_kernels/_choices.py); `describe` prints the same fields as the command's help."""
import dataclasses
import difflib
import json
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


def topic(name):
    """A field maker for one topic of a config: `kl = topic("KL penalty")`, then
    `kl_coef: float = kl(0.05, "weight of the per-token KL penalty")`. The help and the topic are
    what `--help` prints for the key."""
    def option(default, help):
        return dataclasses.field(default=default, metadata={"help": help, "topic": name})
    return option


def keys(cls):
    return [f.name for f in dataclasses.fields(cls)]


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


def field_type(cls, key):
    """(base type, optional, allowed values or None) of field `key`."""
    hint = typing.get_type_hints(cls)[key]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        return str, optional, typing.get_args(hint)
    return hint, optional, None


def coerce(cls, key, value, source):
    base, optional, choices = field_type(cls, key)
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
    if choices is not None and value not in choices:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def unknown_key(key, valid, kind, source):
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r} for '{kind}'{hint}; valid keys: {', '.join(valid)}")


def fill(cls, kind, file=None, overrides=None):
    """An instance of `cls` from its defaults, a preset, `file`, then `overrides`, every key checked."""
    valid = keys(cls)
    values = {}
    layers = ([(read_file(file), f"config file {file}")] if file else []) + [(overrides or {}, "override")]
    layers = _preset_layer(cls, layers) + layers
    for settings, source in layers:
        for key, value in settings.items():
            key = str(key).replace("-", "_")
            if key not in valid:
                raise unknown_key(key, valid, kind, source)
            values[key] = coerce(cls, key, value, source)
    return cls(**values)


def _preset_layer(cls, layers):
    """[(settings, source)] of the preset named by the last layer that sets `preset`, or []. A config
    with presets has a `preset` field and a class attribute PRESETS: {name: {key: value}}."""
    name = ""
    for settings, _source in layers:
        for key, value in settings.items():
            if str(key).replace("-", "_") == "preset":
                if "preset" not in keys(cls):
                    return []  # fill() reports it as an unknown key for this command
                name = "" if value is None else str(value)
    if not name:
        return []
    if name not in cls.PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(cls.PRESETS)}")
    return [(cls.PRESETS[name], f"preset {name}")]


def build(cls, file=None, overrides=None, kind=None):
    """`cls` from defaults, then `file`, then `overrides` (key -> value or string), then `check()`ed."""
    cfg = fill(cls, kind or cls.__name__, file, overrides)
    cfg.check()
    return cfg


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def describe(cls):
    """The keys of `cls` grouped by topic, each with its type, default, allowed values and help."""
    groups = {}
    for f in dataclasses.fields(cls):
        groups.setdefault(_metadata(cls, f.name).get("topic", "other"), []).append(f)
    lines = []
    for name, fields in groups.items():
        lines.append(f"{name}:")
        for f in fields:
            base, optional, choices = field_type(cls, f.name)
            kind = "|".join(choices) if choices else base.__name__ + (" or null" if optional else "")
            default = "null" if f.default is None else json.dumps(f.default)
            lines.append(f"  --{f.name}={kind}  (default {default})")
            lines.append(f"      {_metadata(cls, f.name).get('help', '')}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _metadata(cls, key):
    """The help and topic of field `key`: a subclass that only changes a default inherits them."""
    for c in cls.__mro__:
        f = getattr(c, "__dataclass_fields__", {}).get(key)
        if f is not None and "help" in f.metadata:
            return f.metadata
    return {}


def positive(cfg, *names):
    """Raise ConfigError unless every named key of `cfg` is >= 1."""
    for key in names:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
