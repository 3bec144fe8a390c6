"""Adapters on a plain torch or transformers model, without PEFT:

    names = transferops.add_adapters(model, "lora", target_modules=["q_proj", "v_proj"], r=8)
    ...train...
    transferops.save_adapters(model, "out/")     # PEFT's folder format for LoRA and (IA)^3
    transferops.load_adapters(fresh_model, "out/")

``add_adapters`` wraps each target module in a module of :mod:`transferops.nn` (``LoRALinear``,
``IA3Linear``; a bottleneck adapter on the module's output for "bottleneck"), freezes every
other parameter, and returns the wrapped modules' names. Target matching is PEFT's: a list
matches a module whose name equals an entry or ends with "." + entry; a string is a regular
expression the whole name must match.

LoRA and (IA)^3 folders are PEFT's (``adapter_config.json`` and ``adapter_model.safetensors``,
keys ``base_model.model.<module>.lora_A.weight`` ...): ``PeftModel.from_pretrained`` loads what
``save_adapters`` writes, and ``load_adapters`` loads what PEFT's ``save_pretrained`` writes
(LoRA without DoRA, biases, rank or alpha patterns; (IA)^3). PEFT has no bottleneck adapter:
those folders have ``peft_type: "TRANSFEROPS_BOTTLENECK"`` and load with ``load_adapters`` only.
Folders are untrusted input, read and written as :mod:`transferops.merging_adapters` does.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .. import _checks
from .._adapterfiles import CONFIG_FILE, LORA_OFF, read_adapter_folder, write_adapter_folder
from .._outdir import OutputFolder
from .._safetensors import Checkpoint, CheckpointError
from ..nn import BottleneckAdapter, IA3Linear, LoRALinear, base_weight, is_conv1d

METHODS = ("lora", "ia3", "bottleneck")
PREFIX = "base_model.model."
_ATTR = "transferops_adapters"  # the model's adapter settings, for save_adapters
_PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "bottleneck": "TRANSFEROPS_BOTTLENECK"}
# PEFT config fields that change what a LoRA or (IA)^3 module computes, with their "off" value:
# the fields no LoRA merge takes, and rsLoRA's scaling and layer selection, which LoRALinear
# does not have.
_OFF = {**LORA_OFF, "use_rslora": False, "layers_to_transform": None}


class OutputAdapter(nn.Module):
    """A bottleneck adapter on a module's output: ``adapter(base_layer(...))`` (Houlsby's and
    Pfeiffer's placement when the module is a sublayer's output projection)."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer, self.adapter = base, adapter

    def forward(self, *args, **kwargs):
        h = self.base_layer(*args, **kwargs)
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"a bottleneck adapter needs a module whose output is a tensor, got {type(h).__name__} "
                            f"from {type(self.base_layer).__name__}")
        return self.adapter(h)


_WRAPPERS = (LoRALinear, IA3Linear, OutputAdapter)


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _targets(value, name: str):
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{name}: not a regular expression: {e}") from None
        return value
    if not isinstance(value, Sequence) or not all(isinstance(t, str) and t for t in value):
        raise TypeError(f"{name}: expected a list of module names or a regular expression")
    return list(value)


def add_adapters(model: nn.Module, method: str, *, target_modules, r: int = 8, alpha: float = 8,
                 dropout: float = 0.0, feedforward_modules=(), activation: str = "relu",
                 layer_norm: Optional[str] = None, scale: float = 1.0, backend: str = "auto") -> list[str]:
    """Add adapters of ``method`` ("lora", "ia3" or "bottleneck") to ``model``'s modules named by
    ``target_modules`` and freeze the rest; returns the adapted modules' names.

    lora: ``r``, ``alpha`` (scaling alpha / r), ``dropout``, on nn.Linear or Conv1D modules, with
    PEFT's init. ia3: ``feedforward_modules`` (a subset of the targets) rescale their inputs, the
    others their outputs. bottleneck: ``r`` units after each target's output, ``activation``,
    ``layer_norm`` (None or "before"), ``scale``, ``dropout``. ``backend`` goes to every op.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    method = _checks.choice(method, "method", METHODS)
    if getattr(model, _ATTR, None) is not None or any(isinstance(m, _WRAPPERS) for m in model.modules()):
        raise ValueError("model: already has adapters (one set per model; build the model afresh to change them)")
    targets = _targets(target_modules, "target_modules")
    ff = _targets(feedforward_modules, "feedforward_modules")
    names = [n for n, _ in model.named_modules() if n and _matches(n, targets)]
    if not names:
        shown = ", ".join(n for n, _ in list(model.named_modules())[1:6])
        raise ValueError(f"target_modules: {target_modules!r} matches no module of the model (its modules: {shown}, ...)")
    if method != "ia3" and (ff if isinstance(ff, str) else list(ff)):
        raise ValueError(f"feedforward_modules: only (IA)^3 takes them, not {method}")
    # Every target checked before the model changes: a mistake leaves it as it was.
    bases = {name: (model.get_submodule(name), base_weight(model.get_submodule(name), f"target_modules: {name}")[0])
             for name in names}
    model.requires_grad_(False)
    for name, (base, w) in bases.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if method == "bottleneck":
            wrapped = OutputAdapter(base, BottleneckAdapter(w.shape[0], r, activation=activation, layer_norm=layer_norm,
                                                            scale=scale, dropout=dropout, backend=backend,
                                                            device=w.device))
        else:
            wrapped = LoRALinear(base, r, alpha, dropout, backend=backend) if method == "lora" else \
                IA3Linear(base, feedforward=_matches(name, ff), backend=backend)
        setattr(parent, child, wrapped)
    settings = dict(method=method, target_modules=names, r=r, alpha=alpha, dropout=dropout, activation=activation,
                    layer_norm=layer_norm, scale=scale,
                    feedforward_modules=[n for n in names if method == "ia3" and _matches(n, ff)])
    object.__setattr__(model, _ATTR, settings)  # a plain attribute: not a parameter, buffer or module
    return names


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' parameters under PEFT's keys (adapter name removed)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{PREFIX}{name}.lora_A.weight"] = module.lora_A["default"].weight
            out[f"{PREFIX}{name}.lora_B.weight"] = module.lora_B["default"].weight
        elif isinstance(module, IA3Linear):
            out[f"{PREFIX}{name}.ia3_l"] = module.ia3_l["default"]
        elif isinstance(module, OutputAdapter):
            for key, p in module.adapter.named_parameters():
                out[f"{PREFIX}{name}.adapter.{key}"] = p
    return out


def _config(model: nn.Module, settings: dict) -> dict:
    method, names = settings["method"], settings["target_modules"]
    config = dict(peft_type=_PEFT_TYPES[method], target_modules=names, inference_mode=True, task_type=None,
                  base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                  fan_in_fan_out=any(is_conv1d(model.get_submodule(n).base_layer) for n in names))
    if method == "lora":
        config.update(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      init_lora_weights=True, **_OFF)
    elif method == "ia3":
        config.update(feedforward_modules=settings["feedforward_modules"], init_ia3_weights=True,
                      modules_to_save=None)
    else:
        config.update(r=settings["r"], activation=settings["activation"], layer_norm=settings["layer_norm"],
                      scale=settings["scale"], dropout=settings["dropout"])
    return config


def save_adapters(model: nn.Module, folder, *, overwrite: bool = False) -> list[Path]:
    """Write ``model``'s adapters (from :func:`add_adapters` or :func:`load_adapters`) to
    ``folder``: new or empty, or ``overwrite=True``; nothing half-written is left. Returns the
    paths written."""
    settings = getattr(model, _ATTR, None)
    if settings is None:
        raise ValueError("model: has no adapters from transferops.add_adapters or load_adapters")
    tensors = {k: t.detach().cpu().contiguous() for k, t in _adapter_tensors(model).items()}
    output = OutputFolder(folder, overwrite=overwrite)
    try:
        return write_adapter_folder(output, tensors, _config(model, settings))
    except BaseException:
        output.abort()
        raise


def _read_config(config, path: Path) -> dict:
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    kinds = {v: k for k, v in _PEFT_TYPES.items()}
    if config.get("peft_type") not in kinds:
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not one of {sorted(kinds)}")
    for key, off in _OFF.items():  # the rule of transferops.merging_adapters
        value = config.get(key, off)
        if value != off and not (off is None and value in ([], {})):
            raise CheckpointError(f"{path}: {key} = {value!r} is not supported (expected {off!r})")
    return {**config, "method": kinds[config["peft_type"]]}


def _get(config: dict, key: str, path: Path, kind, default=None):
    value = config.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{path}: {key} = {value!r}: expected {getattr(kind, '__name__', kind)}")
    return value


def load_adapters(model: nn.Module, folder, *, backend: str = "auto") -> list[str]:
    """Add the adapters saved in ``folder`` (by :func:`save_adapters` or PEFT's
    ``save_pretrained``) to ``model`` and load their weights; returns the adapted modules'
    names. Every tensor must match an adapter parameter in shape, and every adapter parameter
    must be in the file; on any error the model is left as it was."""
    raw, path, weights = read_adapter_folder(folder)
    config = _read_config(raw, path)
    method = config["method"]
    targets = _get(config, "target_modules", path, (list, str))
    kw = dict(target_modules=targets, backend=backend)
    if method == "lora":
        kw.update(r=_get(config, "r", path, int), alpha=_get(config, "lora_alpha", path, (int, float)),
                  dropout=_get(config, "lora_dropout", path, (int, float), 0.0))
    elif method == "ia3":
        kw.update(feedforward_modules=_get(config, "feedforward_modules", path, (list, str), []) or [])
    else:
        kw.update(r=_get(config, "r", path, int), activation=_get(config, "activation", path, str),
                  layer_norm=config.get("layer_norm"), scale=_get(config, "scale", path, (int, float)),
                  dropout=_get(config, "dropout", path, (int, float), 0.0))
    trainable = {p: p.requires_grad for p in model.parameters()}
    names = add_adapters(model, method, **kw)
    try:
        _load_weights(model, weights)
    except BaseException:  # the model as it was: no adapters, its own requires_grad flags
        for name in names:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, model.get_submodule(name).base_layer)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        object.__delattr__(model, _ATTR)
        raise
    return names


def _load_weights(model: nn.Module, weights: Path) -> None:
    """The adapters' parameters from the safetensors file ``weights``: every tensor must match
    one in shape, and every one must be in the file."""
    params = _adapter_tensors(model)
    with Checkpoint(weights) as ckpt:
        # PEFT keeps the adapter's name in no key; an old PEFT wrote ".default" before ".weight".
        keys = {re.sub(r"\.default(?=\.weight$|$)", "", k): k for k in ckpt.tensors}
        missing, extra = sorted(set(params) - set(keys)), sorted(set(keys) - set(params))
        if missing or extra:
            raise CheckpointError(f"{weights}: tensors do not match the adapters of {CONFIG_FILE} (missing: "
                                  f"{missing[:3]}, unexpected: {extra[:3]})")
        with torch.no_grad():
            for key, p in params.items():
                info = ckpt.tensors[keys[key]]
                if tuple(info.shape) != tuple(p.shape):
                    raise CheckpointError(f"{weights}: {keys[key]} has shape {tuple(info.shape)}, the model's "
                                          f"adapter {tuple(p.shape)}")
                p.copy_(ckpt.read(keys[key]).view(p.shape))
