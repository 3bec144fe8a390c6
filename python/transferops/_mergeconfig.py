"""``transferops merge --config``: our YAML (method, base, models: [{path, weight}], parameters)
or mergekit's (merge_method, base_model, models: [{model, parameters: {weight, density}}],
parameters), read as untrusted input: safe YAML only, every value checked for its type, each
error a :class:`ConfigError` naming the file and the key.

A parameter's setting is, as in mergekit, a value; a gradient (a list of numbers interpolated
over the layers: layer i of n takes t = i / (n - 1), tensors outside the layers t = 0); or
filters (``[{filter: mlp, value: 0.5}, {value: 0.3}]``: the first whose filter is a substring
of the tensor's name, or has none, applies). A model's own setting comes before the shared one,
which comes before the method's default; where nothing applies the next one is asked."""
from __future__ import annotations

import numbers
import os
import re
from dataclasses import dataclass

from ._checks import finite

# A config is a few kilobytes; this bounds what a hostile one can make the parser do.
MAX_BYTES = 1 << 20
REQUIRED = object()


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


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(value).__name__}")
    return value


# ---- settings: values, gradients and filters -------------------------------------------------


@dataclass(frozen=True)
class Key:
    """A parameter a method takes: per model or shared, its kind and default."""
    scope: str  # "model" or "shared"
    kind: str  # "float", "int", "bool" or "str"
    default: object = REQUIRED


def _scalar(value, kind: str, where: str):
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__}")
    try:
        return finite(value, where)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _setting(value, kind: str, where: str, conditional: bool = True) -> tuple:
    """A checked setting: ("value", v), ("gradient", [v, ...]) or ("filters", [(filter, setting)])."""
    if isinstance(value, dict) and conditional:
        value = [value]
    if not isinstance(value, list):
        if isinstance(value, dict):
            raise ConfigError(f"{where}: a filter's value is a value or a gradient, not another filter")
        return ("value", _scalar(value, kind, where))
    if not value:
        raise ConfigError(f"{where}: expected a value, a gradient or filters, got an empty list")
    if all(isinstance(v, dict) for v in value) and conditional:
        out = []
        for i, cond in enumerate(value):
            at = f"{where}[{i}]"
            extra = set(cond) - {"filter", "value"}
            if extra or "value" not in cond:
                raise ConfigError(f"{at}: a filter is {{filter: NAME, value: VALUE}}, got keys {sorted(cond)}")
            name = cond.get("filter")
            if name is not None and not isinstance(name, str):
                raise ConfigError(f"{at}.filter: expected a substring of tensor names, got {type(name).__name__}")
            out.append((name, _setting(cond["value"], kind, f"{at}.value", conditional=False)))
        return ("filters", tuple(out))
    if any(isinstance(v, (dict, list)) for v in value):
        raise ConfigError(f"{where}: expected a gradient (a list of values) or a list of filters, not a mix")
    if kind == "int":  # a gradient interpolates: between two integers lie fractions
        raise ConfigError(f"{where}: takes an integer, one value for every tensor (or filters), not a gradient")
    return ("gradient", tuple(_scalar(v, kind, f"{where}[{i}]") for i, v in enumerate(value)))


def evaluate(setting: tuple, name: str, t: float):
    """A setting's value for tensor ``name`` at layer fraction ``t`` (None: no filter applies),
    by mergekit's rules: numbers interpolate linearly between a gradient's neighbouring points,
    other values take the point at or below."""
    form, body = setting
    if form == "value":
        return body
    if form == "gradient":
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in body):
            return body[int(t * (len(body) - 1))]
        scaled = t * (len(body) - 1)
        i0 = int(scaled)
        i1 = min(len(body) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * body[i0] + frac * body[i1]
    for pattern, sub in body:
        if pattern is None or pattern == "*" or (name and pattern in name):
            return evaluate(sub, name, t)
    return None


def _varies(setting: tuple) -> bool:
    return setting[0] != "value"


# ---- the methods' keys -------------------------------------------------------------------------

# mergekit 0.1.5's generalized task arithmetic: the defaults of normalize and rescale, and the
# sparsification's extra per-model key.
_GTA = {"task_arithmetic": (False, False, None), "ties": (True, False, None), "dare_ties": (False, True, None),
        "dare_linear": (False, True, None), "breadcrumbs": (False, False, "gamma"),
        "breadcrumbs_ties": (False, False, "gamma"), "della": (True, True, "epsilon"),
        "della_linear": (False, True, "epsilon")}
_EXTRA_DEFAULT = {"gamma": 0.01, "epsilon": 0.15}


def _gta_keys(method: str) -> dict:
    normalize, rescale, extra = _GTA[method]
    keys = {"weight": Key("model", "float"), "density": Key("model", "float", 1.0),
            "int8_mask": Key("shared", "bool", False), "normalize": Key("shared", "bool", normalize),
            "rescale": Key("shared", "bool", rescale), "lambda": Key("shared", "float", 1.0),
            "seed": Key("shared", "int", 0)}  # ours: DARE and DELLA's masks come from our Philox
    if extra:
        keys[extra] = Key("model", "float", _EXTRA_DEFAULT[extra])
    return keys


def _our_keys(method: str) -> dict:
    return {"weight": Key("model", "float", 1.0), "density": Key("model", "float", None),
            "gamma": Key("model", "float", None), "epsilon": Key("model", "float", None),
            "lambda": Key("shared", "float", 1.0), "sign": Key("shared", "str", "sum"),
            "semantics": Key("shared", "str", "peft"), "seed": Key("shared", "int", None),
            "scope": Key("shared", "str", None)}


def _tensorwise_keys(method: str) -> dict | None:
    from .merging_interp import TENSORWISE

    spec = TENSORWISE.get(method)
    if spec is None:
        return None
    keys = {}
    for scope, names in (("model", spec.per_model), ("shared", spec.shared)):
        for key in names:
            keys[key] = Key(scope, spec.kinds.get(key, "float"), spec.defaults.get(key, REQUIRED))
    return keys


def _keys_of(method: str, mergekit: bool, path: str) -> dict:
    from .merging import METHODS

    tensorwise = _tensorwise_keys(method)
    if tensorwise is not None:
        return tensorwise
    if mergekit and method in _GTA:
        return _gta_keys(method)
    if not mergekit and method in METHODS:
        return _our_keys(method)
    known = sorted(set(_GTA if mergekit else METHODS) | set(_tensorwise_names()))
    key = "merge_method" if mergekit else "method"
    raise ConfigError(f"{path}: {key}: {method!r} is not a method transferops runs (expected one of {known})")


def _tensorwise_names() -> list:
    from .merging_interp import TENSORWISE

    return list(TENSORWISE)


# ---- the config ----------------------------------------------------------------------------------

_TOP = {"merge_method", "method", "base_model", "base", "models", "parameters", "dtype", "out_dtype",
        "tokenizer_source"}
_REFUSED_TOP = {"slices": "layer slices", "modules": "per-module configs", "tokenizer": "tokenizer surgery",
                "chat_template": "chat templates"}
_ENTRY = {"model", "path", "parameters", "weight"}
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def _keys(mapping: dict, allowed, where: str, refused: dict | None = None) -> None:
    for key in mapping:
        if refused and key in refused:
            raise ConfigError(f"{where}: {key}: {refused[key]} are not supported yet")
        if key not in allowed:
            raise ConfigError(f"{where}: {key}: not a key transferops honours here (expected some of "
                              f"{sorted(allowed)})")


def _dtype(value, where: str):
    import torch

    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in _DTYPE_NAMES:
        raise ConfigError(f"{where}: expected one of {sorted(set(_DTYPE_NAMES.values()))}, got {value!r}")
    return getattr(torch, _DTYPE_NAMES[value.lower()])


class Parameters:
    """The parameters of a merge, resolved tensor by tensor: ``self(name, t)`` gives the
    keyword arguments of the method for tensor ``name`` at layer fraction ``t``."""

    def __init__(self, method: str, mergekit: bool, keys: dict, shared: dict, per_model: list, path: str):
        self.method, self.mergekit, self.keys, self.path = method, mergekit, keys, path
        self.tensorwise = method in _tensorwise_names()
        self.shared, self.per_model = shared, per_model
        self.varies = any(_varies(s) for s in shared.values()) or any(_varies(s) for m in per_model
                                                                      for s in m.values())

    def _value(self, key: str, settings: list, name: str, t: float):
        for where, setting in settings:
            value = evaluate(setting, name, t)
            if value is not None:
                return _scalar(value, self.keys[key].kind, where)
        default = self.keys[key].default
        if default is REQUIRED:
            where = "in parameters" if self.keys[key].scope == "shared" else "per model or in parameters"
            if not settings:
                raise ConfigError(f"{self.path}: {key}: {self.method} needs it; give it {where}")
            which = f"tensor {name!r}" if name else "the tensors no filter names"
            raise ConfigError(f"{self.path}: {key}: no value for {which} (a required parameter of {self.method}; "
                              f"give it {where})")
        return default

    def raw(self, name: str, t: float) -> dict:
        """{key: value} for shared keys, {key: [value per model]} for per-model keys."""
        out = {}
        for key, spec in self.keys.items():
            shared = [(f"{self.path}: parameters.{key}", self.shared[key])] if key in self.shared else []
            if spec.scope == "shared":
                out[key] = self._value(key, shared, name, t)
            else:
                own = lambda i, m: [(f"{self.path}: models[{i}].parameters.{key}", m[key])] if key in m else []
                out[key] = [self._value(key, own(i, m) + shared, name, t) for i, m in enumerate(self.per_model)]
        return out

    def __call__(self, name: str = "", t: float = 0.0) -> dict:
        raw = self.raw(name, t)
        if self.tensorwise:
            return {"params": raw}
        return (_mergekit_args if self.mergekit else _our_args)(self.method, raw, self.path)


def _one(values: list):
    """A per-model value: one number when every model has the same, else the list."""
    return values[0] if len(set(values)) == 1 else list(values)


def _mergekit_args(method: str, raw: dict, path: str) -> dict:
    """merge()'s keyword arguments for a mergekit GTA method's resolved parameters."""
    # normalize: an election divides by the agreeing weights, a sum by all weights' sum.
    out = {"weights": raw["weight"], "lam": raw["lambda"], "semantics": "mergekit", "normalize": raw["normalize"]}
    if method != "task_arithmetic":  # mergekit takes density and rescale there and, as nothing is
        out["density"] = _one(raw["density"])  # sparsified, does nothing with them
        out["rescale"] = raw["rescale"]
    for key in ("gamma", "epsilon"):
        if key in raw:
            out[key] = _one(raw[key])
    if method.startswith(("dare", "della")):
        out["seed"] = raw["seed"]
    # int8_mask sets the dtype of mergekit's sign masks, whose entries (-1, 0, 1) are exact in
    # any dtype: the result is the same either way.
    return out


def _our_args(method: str, raw: dict, path: str) -> dict:
    out = {"weights": raw["weight"], "lam": raw["lambda"]}
    for key in ("density", "gamma", "epsilon"):
        values = [v for v in raw[key] if v is not None]
        if values:
            if len(values) != len(raw[key]):
                raise ConfigError(f"{path}: parameters.{key}: given for {len(values)} of {len(raw[key])} models")
            out[key] = _one(values)
    for key in ("sign", "semantics", "seed"):
        if raw[key] is not None:
            out[key] = raw[key]
    return out


def load(path: str) -> dict:
    """The merge_files arguments a config gives: method, base, models, dtype, out_dtype,
    tokenizer_source, ``config_text`` (the file itself), and the method's arguments: plain
    when they are the same for every tensor, else ``tensor_args`` (a :class:`Parameters`)."""
    cfg, text = _yaml(path)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping with method, base and models at the top, "
                          f"got {type(cfg).__name__}")
    _keys(cfg, _TOP, path, _REFUSED_TOP)
    mergekit = "merge_method" in cfg
    method = _text(cfg.get("merge_method", cfg.get("method")), f"{path}: method (or merge_method)")
    keys = _keys_of(method, mergekit, path)
    if not mergekit:  # ours: lam is lambda's other name
        keys = {**keys, "lam": keys["lambda"]} if "lambda" in keys else keys
    params = _mapping(cfg.get("parameters"), f"{path}: parameters")
    _keys(params, keys, f"{path}: parameters")
    shared = {k: _setting(v, keys[k].kind, f"{path}: parameters.{k}") for k, v in params.items()}
    if "lam" in shared:
        shared["lambda"] = shared.pop("lam")
    base = cfg.get("base", cfg.get("base_model"))
    base = None if base is None else _text(base, f"{path}: base (or base_model)")
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: models: expected a list of models, got {type(entries).__name__}")
    models, per_model = [], []
    model_keys = {k for k, spec in keys.items() if spec.scope == "model"}
    from .merging_interp import needs_base

    takes_base = needs_base(method)  # True, False or "optional"
    base_role = base is not None and takes_base is not False
    for i, e in enumerate(entries):
        where = f"{path}: models[{i}]"
        if isinstance(e, str):
            e = {"path": e}
        e = _mapping(e, where)
        _keys(e, _ENTRY, where)
        model = _text(e.get("path", e.get("model")), f"{where}.path (or model)")
        if "+" in model and not os.path.lexists(model):
            raise ConfigError(f"{where}.model: {model!r}: a model with a LoRA applied (model+lora) is not supported "
                              "yet; merge the adapter into the model first")
        p = _mapping(e.get("parameters"), f"{where}.parameters")
        _keys(p, model_keys, f"{where}.parameters")
        settings = {k: _setting(v, keys[k].kind, f"{where}.parameters.{k}") for k, v in p.items()}
        if "weight" in e:  # ours: models[i].weight beside path
            if "weight" not in model_keys or "weight" in settings:
                raise ConfigError(f"{where}.weight: " + ("given in its parameters too" if "weight" in settings
                                                         else f"{method} takes no weight per model"))
            settings["weight"] = _setting(e["weight"], "float", f"{where}.weight")
        if model == base and base_role:
            continue  # the base's own entry: a zero task vector, or the base itself, as in mergekit
        models.append(model)
        per_model.append(settings)
    if not models:
        raise ConfigError(f"{path}: models: every model listed is the base model")
    if base is not None and takes_base is False:
        if base not in models:  # mergekit adds it as one more model, then asks for its weight
            raise ConfigError(f"{path}: base_model: {method} has no base; mergekit merges a base_model as one more "
                              "model: list it in models with its parameters")
        base = None
    elif base is None and takes_base is True:
        raise ConfigError(f"{path}: base_model: {method} needs a base model")
    scope = shared.pop("scope", None)  # where top-k thresholds are taken: one for the whole merge
    if scope is not None and scope[0] != "value":
        raise ConfigError(f"{path}: parameters.scope: expected one value, not a gradient or filters")
    parameters = Parameters(method, mergekit, {k: v for k, v in keys.items() if k != "scope"}, shared, per_model,
                            path)
    out = {"method": method, "base": base, "models": models, "config_text": text,
           "dtype": _dtype(cfg.get("dtype"), f"{path}: dtype"),
           "out_dtype": _dtype(cfg.get("out_dtype"), f"{path}: out_dtype")}
    if scope is not None:
        out["scope"] = scope[1]
    if parameters.varies:
        parameters("", 0.0)  # a required value missing everywhere is an error now, not mid-merge
        out["tensor_args"] = parameters
    else:
        out.update(parameters())
    source = cfg.get("tokenizer_source")
    if source not in (None, "base"):
        if source == "union" or not isinstance(source, str):
            raise ConfigError(f"{path}: tokenizer_source: {source!r} is not supported yet (use base or a model path)")
        out["tokenizer_source"] = source
    return out


_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_fractions(names) -> dict:
    """mergekit's t of each tensor for gradients: i / (n - 1) for a tensor of layer i of n
    (1 when n = 1), 0 for the tensors outside the layers (embeddings, final norm, head). A
    layer is the number after ``layers.``, ``layer.``, ``h.`` or ``blocks.`` in the name
    (LLaMA, BERT, GPT-2 and the like)."""
    index = {name: int(m.group(1)) for name in names if (m := _LAYER.search(name))}
    n = max(index.values(), default=0) + 1
    return {name: (index[name] / (n - 1) if n > 1 else 1.0) if name in index else 0.0 for name in names}
