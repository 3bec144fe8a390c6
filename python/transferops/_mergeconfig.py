"""``transferops merge --config``: our YAML (method, base, models: [{path, weight}], parameters)
or mergekit's (merge_method, base_model, models: [{model, parameters: {weight, density}}],
parameters), read as untrusted input: safe YAML only, every value checked for its type, each
error a :class:`ConfigError` naming the file and the key."""
from __future__ import annotations

import math
import numbers

from ._checks import finite

_MERGEKIT_METHODS = ("ties", "task_arithmetic", "breadcrumbs", "breadcrumbs_ties")
# A config is a few kilobytes; this bounds what a hostile one can make the parser do.
MAX_BYTES = 1 << 20


class ConfigError(ValueError):
    """The merge config cannot be used; the message names the file and the key."""


def _yaml(path: str):
    try:
        import yaml
    except ImportError:
        raise ConfigError("--config needs PyYAML (pip install pyyaml)") from None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: the config is over {MAX_BYTES} bytes")
    try:
        return yaml.safe_load(raw), raw.decode("utf-8", "replace")
    except yaml.YAMLError as e:  # syntax errors, and tags safe_load refuses (python objects)
        raise ConfigError(f"{path}: not a valid YAML config: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the config nests too deeply") from None


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path or name (a string), got {type(value).__name__}")
    return value


def _number(value, where: str) -> float:
    try:
        return finite(value, where)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(value).__name__}")
    return value


def _scalar(value, where: str):
    """A parameter value: a number, a string or a bool (not a list or a mapping)."""
    if value is None or isinstance(value, (str, bool, numbers.Number)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return value
    raise ConfigError(f"{where}: expected a single value, got {type(value).__name__}")


# mergekit's keys, and ours: each honoured (see docs/merging.md's table) or an error naming it.
_TOP = {"merge_method", "method", "base_model", "base", "models", "parameters", "dtype", "out_dtype",
        "tokenizer_source"}
_REFUSED_TOP = {"slices": "layer slices", "modules": "per-module configs", "tokenizer": "tokenizer surgery",
                "chat_template": "chat templates"}
_ENTRY = {"model", "path", "parameters", "weight"}
_PER_MODEL = {"weight", "density", "gamma", "epsilon"}
_SHARED = {"density", "weight", "gamma", "epsilon", "lambda", "lam", "normalize", "rescale", "int8_mask", "sign",
           "semantics", "seed", "scope", "consensus_method"}
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def _keys(mapping: dict, allowed: set, where: str, refused: dict | None = None) -> None:
    for key in mapping:
        if refused and key in refused:
            raise ConfigError(f"{where}: {key}: {refused[key]} are not supported yet")
        if key not in allowed:
            raise ConfigError(f"{where}: {key}: not a key transferops honours (expected some of {sorted(allowed)})")


def _dtype(value, where: str):
    import torch

    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in _DTYPE_NAMES:
        raise ConfigError(f"{where}: expected one of {sorted(set(_DTYPE_NAMES.values()))}, got {value!r}")
    return getattr(torch, _DTYPE_NAMES[value.lower()])


def _same(values: list, key: str, path: str):
    """One value of a per-model parameter that the fused pass takes once for all models."""
    if len(set(values)) > 1:
        raise ConfigError(f"{path}: models[*].parameters.{key}: per-model values differ ({sorted(set(values))}); "
                          f"transferops takes one {key} for all models")
    return values[0] if values else None


def load(path: str) -> dict:
    """The merge_files arguments (method, base, models, weights, density, ...) a config gives,
    and ``config_text``, the file itself."""
    cfg, text = _yaml(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping with method, base and models at the top, "
                          f"got {type(cfg).__name__}")
    _keys(cfg, _TOP, path, _REFUSED_TOP)
    params = {k: _scalar(v, f"{path}: parameters.{k}") for k, v in _mapping(cfg.get("parameters"), f"{path}: parameters").items()}
    _keys(params, _SHARED, f"{path}: parameters")
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: models: expected a list of models, got {type(entries).__name__}")
    models, weights, per_model = [], [], {k: [] for k in ("density", "gamma", "epsilon")}
    for i, e in enumerate(entries):
        where = f"{path}: models[{i}]"
        if isinstance(e, str):
            e = {"path": e}
        e = _mapping(e, where)
        _keys(e, _ENTRY, where)
        p = _mapping(e.get("parameters"), f"{where}.parameters")
        _keys(p, _PER_MODEL, f"{where}.parameters")
        models.append(_text(e.get("path", e.get("model")), f"{where}.path (or model)"))
        weights.append(_number(e.get("weight", p.get("weight", params.get("weight", 1.0))), f"{where}.weight"))
        for key, values in per_model.items():
            if key in p:
                values.append(_number(p[key], f"{where}.parameters.{key}"))
            elif key in params:
                values.append(_number(params[key], f"{path}: parameters.{key}"))
    method = _text(cfg.get("method", cfg.get("merge_method")), f"{path}: method (or merge_method)")
    out = {"method": method, "base": _text(cfg.get("base", cfg.get("base_model")), f"{path}: base (or base_model)"),
           "models": models, "weights": weights, "config_text": text}
    for key, values in per_model.items():
        if len(values) not in (0, len(models)):
            raise ConfigError(f"{path}: parameters.{key}: given for {len(values)} of {len(models)} models")
        value = _same(values, key, path)
        if value is not None:
            out[key] = value
    for key in ("sign", "semantics", "seed", "scope"):
        if key in params:
            out[key] = params[key]
    if "lam" in params or "lambda" in params:
        out["lam"] = _number(params.get("lam", params.get("lambda")), f"{path}: parameters.lambda")
    out["dtype"] = _dtype(cfg.get("dtype"), f"{path}: dtype")
    out["out_dtype"] = _dtype(cfg.get("out_dtype"), f"{path}: out_dtype")
    source = cfg.get("tokenizer_source")
    if source not in (None, "base"):
        if source == "union" or not isinstance(source, str):
            raise ConfigError(f"{path}: tokenizer_source: {source!r} is not supported yet (use base or a model path)")
        out["tokenizer_source"] = source
    for key in ("rescale", "int8_mask", "normalize"):
        if key in params and not isinstance(params[key], bool):
            raise ConfigError(f"{path}: parameters.{key}: expected true or false, got {params[key]!r}")
    if params.get("rescale"):
        raise ConfigError(f"{path}: parameters.rescale: mergekit's rescale (to the L1 norm) is not reproduced yet")
    # int8_mask only sets the dtype of mergekit's sign masks, whose entries (-1, 0, 1) are exact
    # in any dtype: the result is the same either way.
    if "merge_method" in cfg:  # mergekit's config: its semantics unless the file says otherwise
        if method not in _MERGEKIT_METHODS:
            raise ConfigError(f"{path}: merge_method: mergekit's {method!r} is not reproduced yet (supported: "
                              f"{', '.join(_MERGEKIT_METHODS)}); use our config format (method:) for our DARE/DELLA")
        # mergekit's defaults: ties normalizes by the agreeing weights, the others do not.
        normalize = params.get("normalize", method == "ties")
        if method in ("ties", "breadcrumbs_ties") and not normalize:
            raise ConfigError(f"{path}: parameters.normalize: mergekit {method} with normalize: false (a sum of the "
                              "agreeing entries) is not reproduced yet")
        if method in ("task_arithmetic", "breadcrumbs") and normalize:
            total = sum(weights)
            if abs(total) >= 1e-8:  # mergekit divides by the weights' sum unless it is about zero
                out["weights"] = [w / total for w in weights]
        out.setdefault("semantics", "mergekit")
        if params.get("consensus_method") == "count":
            out["sign"] = "count"
    elif "normalize" in params or "consensus_method" in params:
        key = "normalize" if "normalize" in params else "consensus_method"
        raise ConfigError(f"{path}: parameters.{key}: a mergekit key; with our format use weights and sign")
    return out
