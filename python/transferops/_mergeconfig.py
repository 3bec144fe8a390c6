"""``transferops merge --config``: our YAML (method, base, models: [{path, weight}], parameters)
or mergekit's (merge_method, base_model, models: [{model, parameters: {weight, density}}],
parameters), read as untrusted input: safe YAML only, every value checked for its type, each
error a :class:`ConfigError` naming the file and the key."""
from __future__ import annotations

import math
import numbers

from ._checks import finite

_PARAMS = ("density", "lam", "sign", "semantics", "seed", "gamma", "epsilon", "scope")
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
        return yaml.safe_load(raw)
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


def load(path: str) -> dict:
    """The merge_files arguments (method, base, models, weights, density, ...) a config gives."""
    cfg = _yaml(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping with method, base and models at the top, "
                          f"got {type(cfg).__name__}")
    params = {k: _scalar(v, f"{path}: parameters.{k}") for k, v in _mapping(cfg.get("parameters"), f"{path}: parameters").items()}
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: models: expected a list of models, got {type(entries).__name__}")
    models, weights, densities = [], [], set()
    for i, e in enumerate(entries):
        where = f"{path}: models[{i}]"
        if isinstance(e, str):
            e = {"path": e}
        e = _mapping(e, where)
        p = _mapping(e.get("parameters"), f"{where}.parameters")
        models.append(_text(e.get("path", e.get("model")), f"{where}.path (or model)"))
        weights.append(_number(e.get("weight", p.get("weight", 1.0)), f"{where}.weight"))
        if "density" in p:
            densities.add(_number(p["density"], f"{where}.parameters.density"))
    if len(densities) > 1:
        raise ConfigError(f"{path}: per-model densities differ ({sorted(densities)}); transferops takes one")
    method = _text(cfg.get("method", cfg.get("merge_method")), f"{path}: method (or merge_method)")
    out = {"method": method, "base": _text(cfg.get("base", cfg.get("base_model")), f"{path}: base (or base_model)"),
           "models": models, "weights": weights}
    if densities:
        out["density"] = densities.pop()
    for key in _PARAMS:
        if key in params:
            out[key] = params[key]
    if "lambda" in params:
        out["lam"] = params["lambda"]
    for key in ("lam", "density", "gamma", "epsilon"):
        if key in out:
            out[key] = _number(out[key], f"{path}: parameters.{key}")
    if "merge_method" in cfg:  # mergekit's config: its semantics unless the file says otherwise
        if method not in _MERGEKIT_METHODS:
            raise ConfigError(f"{path}: mergekit's {method!r} is not reproduced yet (its DARE rescales by "
                              "L1 norm, ours by 1/density): use our config format to run ours")
        # mergekit's defaults: ties normalizes, breadcrumbs_ties does not (it sums).
        if method in ("ties", "breadcrumbs_ties") and params.get("normalize", method == "ties") is False:
            raise ConfigError(f"{path}: mergekit {method} with normalize: false (a sum of the agreeing "
                              "entries) is not reproduced yet")
        if params.get("rescale"):
            raise ConfigError(f"{path}: mergekit's rescale (to the L1 norm) is not reproduced yet")
        out.setdefault("semantics", "mergekit")
        if params.get("consensus_method") == "count":
            out["sign"] = "count"
    return out
