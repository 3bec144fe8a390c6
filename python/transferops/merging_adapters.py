"""Merging PEFT LoRA adapters into one adapter, with the semantics of PEFT's
``LoraModel.add_weighted_adapter`` (PEFT 0.21), on adapter folders or in-memory state dicts.

A LoRA module holds A [r, in] and B [out, r] and adds ``scaling * B @ A`` to its base weight,
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). The merged adapter has
``lora_alpha = r``, so its scaling is 1 and every input's scaling is folded into its tensors:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (same rank
  required): the method is applied to the A's and, separately, to the B's, adapter t's A
  weighted by ``sign(w_t s_t) sqrt(|w_t s_t|)`` and its B by ``sqrt(|w_t s_t|)``, so that a
  lone adapter gives back ``w_t s_t B A``. For more than one adapter this is not the
  weighted sum of the products B A (PEFT calls it a rough approximation).
- ``cat``: A's stacked along the rank with ``w_t s_t`` folded in, B's side by side; the
  rank is the sum of the ranks and ``B A`` is exactly the weighted sum of the products.
- ``svd`` and ``*_svd``: the method is applied to the products ``s_t B_t A_t`` with weights
  ``w_t``, and the result truncated to ``svd_rank`` by an SVD: ``B = U_k diag(S_k)``,
  ``A = V_k^T``, both optionally clamped to the ``svd_clamp`` quantile of their entries.

A module that only some adapters target is merged from those (PEFT does the same); with one
adapter every combination_type is ``linear``, as in PEFT. Weights are rounded to float32 as
PEFT rounds them, and the arithmetic runs in float32 (float64 for float64 adapters). The
reductions are those of :mod:`transferops.merging` with PEFT's semantics; DARE draws its masks
from our Philox stream (``seed``), not from ``torch.bernoulli``.

Adapter folders are untrusted: their files are found and opened as the shards of
:class:`transferops._safetensors.Checkpoint` are (inside the folder, no FIFOs, headers
validated), pickled ``adapter_model.bin`` files are not read, and the output is written
through :class:`transferops._outdir.OutputFolder` (nothing half-written is ever left).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _checks
from . import merging
from ._adapterfiles import LORA_OFF, WEIGHTS_FILE, read_adapter_folder, write_adapter_folder
from ._outdir import OutputFolder
from ._safetensors import Checkpoint


# The reduction of each combination type, a function of transferops.merging run with PEFT's
# semantics: on the A's and the B's, or on the products B A (svd types); cat has none.
_REDUCTIONS = {"linear": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
               "magnitude_prune": "magnitude_prune"}
_SVD = {"svd": "task_arithmetic", **{f"{k}_svd": v for k, v in _REDUCTIONS.items() if k != "linear"}}
COMBINATION_TYPES = (*_REDUCTIONS, "cat", *_SVD)
MAJORITY_SIGN_METHODS = {"total": "sum", "frequency": "count"}

# Fields that decide which modules are adapted, or how: merged adapters must agree on them,
# since the output keeps the first adapter's values.
_SAME = ("task_type", "fan_in_fan_out", "layers_to_transform", "layers_pattern", "exclude_modules",
         "alora_invocation_tokens")
# A LoRA tensor's key: <module>.lora_A.weight / lora_B.weight (Linear, Conv1D) or
# <module>.lora_embedding_A / _B (Embedding), as PEFT saves them (adapter name removed); and
# <module>.base_layer.weight, an adapted Embedding's own weight, which PEFT saves too
# (save_embedding_layers) in case the vocabulary was resized.
_KEY = re.compile(r"(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB])|base_layer\.weight)")


@dataclass
class _Adapter:
    """One input adapter: its config (validated), its LoRA modules {module: (A key, B key)},
    and a reader of its tensors."""
    config: dict
    config_label: str  # the config file, or "configs[i]"
    tensors_label: str  # the weights file, or "state_dicts[i]"
    modules: dict[str, tuple[str, str]]
    embeddings: list[str]  # the keys of Embedding weights saved with the adapter
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
    read: Callable[[str], torch.Tensor]

    @property
    def rank(self) -> int:
        return self.config["r"]

    @property
    def scaling(self) -> float:
        """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (same float ops)."""
        c = self.config
        return c["lora_alpha"] / math.sqrt(c["r"]) if c.get("use_rslora") else c["lora_alpha"] / c["r"]


def _config(raw, label: str) -> dict:
    """A LoRA adapter config (a dict, or an object with ``to_dict``, such as peft's LoraConfig),
    checked: LoRA, r and lora_alpha numbers, nothing it sets that the merge would drop."""
    if hasattr(raw, "to_dict") and not isinstance(raw, Mapping):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise ValueError(f"{label}: expected a JSON object (a PEFT adapter config), got {type(raw).__name__}")
    config = dict(raw)
    peft_type = getattr(config.get("peft_type"), "value", config.get("peft_type"))
    if peft_type != "LORA":
        raise ValueError(f"{label}: peft_type is {peft_type!r}; only LoRA adapters (\"LORA\") are merged")
    config["peft_type"] = "LORA"
    task_type = config.get("task_type")
    config["task_type"] = getattr(task_type, "value", task_type)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{label}: r: expected a positive integer rank, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{label}: lora_alpha: expected a finite number, got {alpha!r}")
    for field, off in LORA_OFF.items():
        value = config.get(field, off)
        if value != off and not (off is None and value in ([], {})):
            raise ValueError(f"{label}: {field} is {value!r}; adapters with {field} are not merged "
                             f"(expected {off!r})")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in targets):
        config["target_modules"] = sorted(targets)
    elif not isinstance(targets, str):
        raise ValueError(f"{label}: target_modules: expected a list of module names or a regex string, "
                         f"got {targets!r}")
    return config


def _modules(shapes: Mapping, rank: int, label: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """({module: (A key, B key)}, Embedding weight keys) of a LoRA state dict's tensor
    ``shapes``, checked against rank r."""
    parts: dict[str, dict[str, str]] = {}
    embeddings = {}
    for key, (shape, dtype) in shapes.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{label}: tensor {key!r} is not a LoRA weight (<module>.lora_A.weight, "
                             "lora_B.weight, lora_embedding_A or lora_embedding_B)")
        if dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"{label}: tensor {key!r} is {dtype}; expected a floating-point dtype")
        side = m["ab"] or m["eab"]
        if side is None:
            embeddings[m["module"] + " (embedding)"] = key
            continue
        # An Embedding's A and B pair with each other only.
        module = m["module"] + (" (embedding)" if m["eab"] else "")
        parts.setdefault(module, {})[side] = key
        if len(shape) != 2:
            raise ValueError(f"{label}: tensor {key!r} has shape {list(shape)}; only 2-D LoRA weights (Linear, "
                             "Conv1D, Embedding) are merged, not convolutions")
        if shape[0 if side == "A" else 1] != rank:
            raise ValueError(f"{label}: tensor {key!r} has shape {list(shape)}, which does not hold rank r={rank} "
                             f"of its adapter config (A is [r, in], B is [out, r])")
    modules = {}
    for module, sides in sorted(parts.items()):
        if sides.keys() != {"A", "B"}:
            missing = "B" if "A" in sides else "A"
            raise ValueError(f"{label}: {next(iter(sides.values()))!r} has no lora_{missing} partner")
        modules[module] = (sides["A"], sides["B"])
    if not modules:
        raise ValueError(f"{label}: holds no LoRA weights")
    stray = sorted(key for module, key in embeddings.items() if module not in modules)
    if stray:
        raise ValueError(f"{label}: tensor {stray[0]!r} is a base layer's weight, which an adapter holds only for an "
                         "Embedding it adapts")
    return modules, sorted(embeddings.values())


def _check_together(adapters: list[_Adapter]) -> None:
    """The adapters adapt one model the same way: the _SAME config fields, one kind of
    target_modules, and each module's in/out sizes agree."""
    first = adapters[0]
    for a in adapters[1:]:
        for field in _SAME:
            if a.config.get(field) != first.config.get(field):
                raise ValueError(f"{a.config_label}: {field} is {a.config.get(field)!r}, but {first.config_label} "
                                 f"has {first.config.get(field)!r}; merged adapters must agree on it")
        if isinstance(a.config["target_modules"], str) != isinstance(first.config["target_modules"], str):
            raise ValueError(f"{a.config_label}: target_modules {a.config['target_modules']!r} and "
                             f"{first.config_label}'s {first.config['target_modules']!r} must both be lists or "
                             "both be regex strings (as PEFT requires)")
    seen: dict[str, tuple[int, int, _Adapter]] = {}
    for a in adapters:
        for module, (ka, kb) in a.modules.items():
            size = (a.shapes[ka][0][1], a.shapes[kb][0][0])
            other = seen.setdefault(module, (*size, a))
            if other[:2] != size:
                raise ValueError(f"{a.tensors_label}: module {module!r} maps {size[0]} -> {size[1]} features, but in "
                                 f"{other[2].tensors_label} {other[0]} -> {other[1]}; adapters of different models?")


def _options(combination_type, count: int, weights, density, majority_sign_method, svd_rank, svd_clamp,
             svd_full_matrices, seed, dtype, backend) -> dict:
    """The merge's arguments checked: each one is used by the combination type or is an error
    naming it. With one adapter every type is linear (PEFT's rule)."""
    _checks.choice(combination_type, "combination_type", COMBINATION_TYPES)
    weights = _checks.weight_list(weights, count, "weights")
    if weights is None:
        raise ValueError(f"weights: expected {count} numbers, one per adapter")
    kind = "linear" if count == 1 else combination_type
    why = "with one adapter every combination_type is linear, as in PEFT" if count == 1 else \
        f"combination_type {combination_type!r} does not use it"
    reduction = _REDUCTIONS.get(kind) or _SVD.get(kind)
    given = {"density": density is not None, "majority_sign_method": majority_sign_method != "total",
             "svd_rank": svd_rank is not None, "svd_clamp": svd_clamp is not None,
             "svd_full_matrices": svd_full_matrices is not True, "seed": seed is not None}
    used = {"density": reduction not in (None, "task_arithmetic"),
            "majority_sign_method": reduction in ("ties", "dare_ties"),
            "svd_rank": kind in _SVD, "svd_clamp": kind in _SVD, "svd_full_matrices": kind in _SVD,
            "seed": reduction is not None and reduction.startswith("dare")}
    for name in given:
        if given[name] and not used[name]:
            raise ValueError(f"{name}: {why}")
    opts = {"kind": kind, "reduction": reduction, "weights": weights, "svd": kind in _SVD,
            "full_matrices": bool(svd_full_matrices), "backend": backend, "dtype": dtype}
    if dtype is not None and dtype not in _checks.FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {list(_checks.FLOAT_DTYPES)}, got {dtype!r}")
    if used["density"]:
        if density is None:
            raise ValueError(f"density: combination_type {combination_type!r} needs a density in [0, 1]")
        opts["density"] = _checks.fraction(density, "density")
    if used["majority_sign_method"]:
        opts["sign"] = MAJORITY_SIGN_METHODS[_checks.choice(majority_sign_method, "majority_sign_method",
                                                            list(MAJORITY_SIGN_METHODS))]
    if used["seed"]:
        if seed is None:
            raise ValueError(f"seed: combination_type {combination_type!r} draws random DARE masks; give an "
                             "integer seed")
        opts["seed"] = _checks.seed(seed)
    opts["svd_rank"] = None if svd_rank is None else _checks.count(svd_rank, "svd_rank", low=1)
    opts["svd_clamp"] = None if svd_clamp is None else _checks.fraction(svd_clamp, "svd_clamp")
    return opts


def _reduce(tensors: list[torch.Tensor], weights: list[float], name: str, opts: dict) -> torch.Tensor:
    """The combination's reduction (PEFT's semantics) of one tensor per adapter."""
    fn = getattr(merging, opts["reduction"])
    kw = {k: opts[k] for k in ("density", "sign", "seed") if k in opts}
    if opts["reduction"].startswith("dare"):
        kw["name"] = name  # each tensor draws its own masks
    return fn(tensors, weights=weights, backend=opts["backend"], **kw)


def _f32(x: float) -> float:
    """``x`` rounded to float32, as PEFT's torch.tensor(weights) rounds a weight."""
    return torch.tensor(x, dtype=torch.float32).item()  # beyond float32's range: inf, refused later


def _merge_module(parts: list[tuple[torch.Tensor, torch.Tensor, float, float]], keys: tuple[str, str],
                  rank: int, opts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the merged adapter at one module from (A_t, B_t, scaling_t, weight_t) of the
    adapters that adapt it; A and B are padded with zeros up to ``rank`` where the product
    holds fewer."""
    kind = opts["kind"]
    if kind == "cat":
        a = torch.cat([a * w * s for a, _, s, w in parts])
        b = torch.cat([b for _, b, _, _ in parts], dim=1)
    elif opts["svd"]:
        delta = _reduce([(b @ a) * s for a, b, s, _ in parts], [_f32(w) for *_, w in parts], keys[0], opts)
        u, sv, vh = torch.linalg.svd(delta, full_matrices=opts["full_matrices"])
        k = min(rank, sv.numel())
        b, a = u[:, :k] @ torch.diag(sv[:k]), vh[:k]
        if opts["svd_clamp"] is not None:
            hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), opts["svd_clamp"])
            a, b = a.clamp(-hi, hi), b.clamp(-hi, hi)
    else:
        # sqrt(|w s|) on each side, the sign on A's, so that B A carries w s once.
        ws = [w * s for *_, s, w in parts]
        wa = [_f32(math.sqrt(abs(x)) * (1 if x >= 0 else -1)) for x in ws]
        wb = [_f32(math.sqrt(abs(x))) for x in ws]
        a = _reduce([a for a, *_ in parts], wa, keys[0], opts)
        b = _reduce([b for _, b, *_ in parts], wb, keys[1], opts)
    if a.shape[0] < rank:
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a, b


def _merge(adapters: list[_Adapter], opts: dict, base_model_name_or_path) -> tuple[dict, dict]:
    """The merged adapter's (state dict, config)."""
    _check_together(adapters)
    first, kind = adapters[0], opts["kind"]
    ranks = [a.rank for a in adapters]
    if kind == "cat":
        rank = sum(ranks)
    elif opts["svd"]:
        rank = opts["svd_rank"] or max(ranks)
    elif len(set(ranks)) > 1:
        shown = ", ".join(f"{a.config_label}: r={a.rank}" for a in adapters)
        raise ValueError(f"combination_type {kind!r} needs adapters of one rank, got {shown}; use 'cat' or an svd "
                         "type for different ranks")
    else:
        rank = ranks[0]
    dtypes = {a.shapes[key][1] for a in adapters for pair in a.modules.values() for key in pair}
    work = torch.float64 if torch.float64 in dtypes else torch.float32
    dtype = opts["dtype"] or (dtypes.pop() if len(dtypes) == 1 else work)
    if base_model_name_or_path is None:
        names = {a.config.get("base_model_name_or_path") for a in adapters}
        if len(names) > 1:
            raise ValueError(f"the adapters name different base models ({sorted(map(str, names))}); give "
                             "base_model_name_or_path for the merged adapter if they share one")
        base_model_name_or_path = first.config.get("base_model_name_or_path")

    state = {}
    for module in sorted({m for a in adapters for m in a.modules}):
        parts, keys = [], None
        for a, w in zip(adapters, opts["weights"]):
            if module in a.modules:
                keys = a.modules[module]
                ta, tb = (_finite(a, k).to(work) for k in keys)
                parts.append((ta, tb, a.scaling, w))
        ta, tb = _merge_module(parts, keys, rank, opts)
        state[keys[0]], state[keys[1]] = ta.to(dtype).contiguous(), tb.to(dtype).contiguous()
    # Embedding weights are the base model's (resized, maybe): kept if the adapters agree on them.
    holder: dict[str, _Adapter] = {}
    for a in adapters:
        for key in a.embeddings:
            t = _finite(a, key)
            if key not in state:
                state[key], holder[key] = t, a
            elif not torch.equal(state[key], t):
                raise ValueError(f"{a.tensors_label}: tensor {key!r} differs from {holder[key].tensors_label}'s; "
                                 "adapters saved with different base embeddings are not merged")

    targets = [a.config["target_modules"] for a in adapters]
    config = dict(first.config, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={},
                  base_model_name_or_path=base_model_name_or_path,
                  # Every scaling is folded into the tensors: the output's must be 1. PEFT keeps
                  # use_rslora, whose scaling r / sqrt(r) is then sqrt(r) too strong.
                  use_rslora=False,
                  target_modules="|".join(f"({t})" for t in targets) if isinstance(targets[0], str)
                  else sorted(set().union(*targets)))
    return state, config


def _finite(adapter: _Adapter, key: str) -> torch.Tensor:
    t = adapter.read(key)
    bad = _checks.count_nonfinite(t)
    if bad:
        raise ValueError(f"{adapter.tensors_label}: tensor {key!r} holds NaN or Inf at {bad} positions")
    return t


def merge_adapter_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], configs: Sequence, *,
                              combination_type: str, weights, density: float | None = None,
                              majority_sign_method: str = "total", svd_rank: int | None = None,
                              svd_clamp: float | None = None, svd_full_matrices: bool = True,
                              seed: int | None = None, dtype: torch.dtype | None = None,
                              base_model_name_or_path: str | None = None,
                              backend: str = "auto") -> tuple[dict[str, torch.Tensor], dict]:
    """Merge LoRA adapters given as state dicts (as ``peft.get_peft_model_state_dict`` returns
    them, or as saved) with their configs (dicts or ``LoraConfig``); returns the merged
    adapter's (state dict, config dict). Arguments as :func:`merge_adapters`."""
    if not isinstance(state_dicts, Sequence) or not state_dicts:
        raise ValueError("state_dicts: expected a non-empty sequence of adapter state dicts")
    if not isinstance(configs, Sequence) or len(configs) != len(state_dicts):
        raise ValueError(f"configs: expected {len(state_dicts)} adapter configs, one per state dict")
    opts = _options(combination_type, len(state_dicts), weights, density, majority_sign_method, svd_rank,
                    svd_clamp, svd_full_matrices, seed, dtype, backend)
    adapters = []
    for i, (sd, raw) in enumerate(zip(state_dicts, configs)):
        config = _config(raw, f"configs[{i}]")
        if not isinstance(sd, Mapping) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise ValueError(f"state_dicts[{i}]: expected a mapping of tensor names to tensors")
        shapes = {k: (tuple(t.shape), t.dtype) for k, t in sd.items()}
        adapters.append(_Adapter(config, f"configs[{i}]", f"state_dicts[{i}]",
                                 *_modules(shapes, config["r"], f"state_dicts[{i}]"), shapes,
                                 lambda key, sd=sd: sd[key].detach().cpu()))
    return _merge(adapters, opts, base_model_name_or_path)


def _open_folder(folder, stack: contextlib.ExitStack, sources: set[Path]) -> _Adapter:
    """An adapter folder's config and weights, read as untrusted files (see the module's doc);
    the checkpoint is closed by ``stack``, and the real paths read are added to ``sources``."""
    raw, config_path, real = read_adapter_folder(folder)
    config = _config(raw, str(config_path))
    weights_path = Path(folder) / WEIGHTS_FILE
    ckpt = stack.enter_context(Checkpoint(real))
    sources |= {Path(os.path.realpath(folder)), *ckpt.sources}
    shapes = {k: (info.shape, info.dtype) for k, info in ckpt.tensors.items()}
    return _Adapter(config, str(config_path), str(weights_path), *_modules(shapes, config["r"], str(weights_path)),
                    shapes, lambda key: ckpt.read(key).view(shapes[key][0]))


def merge_adapters(adapters: Sequence[str | os.PathLike], out: str | os.PathLike, *, combination_type: str, weights,
                   density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
                   svd_clamp: float | None = None, svd_full_matrices: bool = True, seed: int | None = None,
                   dtype: torch.dtype | None = None, base_model_name_or_path: str | None = None,
                   overwrite: bool = False, backend: str = "auto") -> list[Path]:
    """Merge PEFT LoRA adapter folders into the adapter folder ``out``, as PEFT's
    ``add_weighted_adapter`` merges adapters loaded in one model (see the module's doc).

    Parameters
    ----------
    adapters : folders holding adapter_config.json and adapter_model.safetensors (PEFT's
        ``save_pretrained``); LoRA only, without DoRA, biases, modules_to_save,
        rank_pattern or alpha_pattern, and with 2-D LoRA weights (no convolutions).
    out : the merged adapter's folder: new or empty (or ``overwrite=True``), apart from the
        inputs; it receives adapter_model.safetensors and adapter_config.json, loadable with
        ``PeftModel.from_pretrained(base, out)``.
    combination_type : one of COMBINATION_TYPES. linear, ties, dare_* and magnitude_prune
        need adapters of one rank r (the output's); cat gives the sum of the ranks; svd types
        give ``svd_rank`` (default: the largest rank).
    weights : one number per adapter (negative ones subtract).
    density : fraction kept by ties, dare_*, magnitude_prune and their svd variants.
    majority_sign_method : "total" (the sign of the summed values) or "frequency" (of the
        summed signs): the ties and dare_ties election.
    svd_rank, svd_clamp, svd_full_matrices : the svd types' rank, quantile clamp and
        ``torch.linalg.svd(full_matrices=...)``.
    seed : dare types: the seed of the Philox masks (one stream per tensor name).
    dtype : dtype written (default: the adapters' own; float32 when they differ).
    base_model_name_or_path : written into the config (default: the adapters' common one;
        an error when they name different ones).
    overwrite : replace a non-empty ``out`` as a whole.
    backend : backend of the reductions (see :mod:`transferops.merging`).

    Returns the paths written. Every argument is used or is an error naming it; a mistake in
    the inputs is a ValueError naming the file and what was expected.
    """
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError("adapters: expected a non-empty list of adapter folders")
    opts = _options(combination_type, len(adapters), weights, density, majority_sign_method, svd_rank, svd_clamp,
                    svd_full_matrices, seed, dtype, backend)
    with contextlib.ExitStack() as stack:
        sources: set[Path] = set()
        opened = [_open_folder(folder, stack, sources) for folder in adapters]
        output = OutputFolder(out, inputs=sources, overwrite=overwrite)
        stack.callback(output.abort)  # after commit, abort has nothing left to remove
        state, config = _merge(opened, opts, base_model_name_or_path)
        return write_adapter_folder(output, state, config)
