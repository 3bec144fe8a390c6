"""Rank candidate models, not feature files: :func:`rank_models` runs every model over the
labelled target data in batches, pools the layers asked for, and feeds each pooled batch into
the streaming statistics of :mod:`transferops.transferability_stats` (one pass over the data
per model, every layer and every score at once). No [N, D] feature array is held: memory is
one batch's activations plus O(D^2 + C D) per layer.

The workflow of transformer-ranker (``TransformerRanker(dataset).run(models)``) and of the
LogME repository's examples, with the extraction streamed into the scores.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _dist
from . import transferability as tr
from . import transferability_stats as ts

POOLINGS = ("mean", "cls", "last")


# ---- the candidates -----------------------------------------------------------------------------


@dataclass
class _Candidate:
    name: str
    forward: object  # batch -> list of layer outputs, the hidden states of a transformers model
    module: torch.nn.Module | None
    tokenizer: object = None
    transformers: bool = False


def load_model(name, device=None) -> tuple:
    """(model, tokenizer or None) from a local transformers folder, or a model the local Hugging
    Face cache holds (nothing is downloaded): config and safetensors weights (no pickles, no
    remote code), on ``device`` (default: where it loads, the CPU)."""
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ValueError(f"models: {name}: loading a folder needs transformers (pip install transferops[peers])") from None
    path = Path(name)
    if path.exists() and not path.is_dir():
        raise ValueError(f"models: {name}: expected a transformers folder, got a file")
    if not path.exists() and (path.is_absolute() or str(name).startswith(".") or str(name).count("/") > 1):
        raise ValueError(f"models: {name}: expected a transformers folder, and there is no such folder")
    try:
        model = AutoModel.from_pretrained(name, local_files_only=True, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "" if path.is_dir() else "no such folder, and not in the local Hugging Face cache: "
        raise ValueError(f"models: {name}: cannot load as a transformers model ({where}nothing is downloaded): "
                         f"{first}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        tokenizer = None  # token ids or input dicts still serve
    return (model.to(device) if device is not None else model), tokenizer


def _padded(tokenizer):
    """The tokenizer, or a copy with a pad token where it has none (GPT-2's and LLaMA's): the
    caller's object is left as it was."""
    if tokenizer is None or getattr(tokenizer, "pad_token", None) is not None:
        return tokenizer
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token if getattr(tokenizer, "eos_token", None) else tokenizer.unk_token
    return tokenizer


def _is_transformers(model) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model.config, "output_hidden_states")


def _candidate(model, name: str, tokenizer=None, device=None) -> _Candidate:
    if isinstance(model, tuple) and len(model) == 2:
        return _candidate(model[0], name, model[1])
    if isinstance(model, (str, Path)):
        return _candidate(load_model(model, device), name)
    tokenizer = _padded(tokenizer)
    if _is_transformers(model):
        def forward(batch):
            kwargs = batch if isinstance(batch, dict) else {"input_ids": batch}
            return list(model(**kwargs, output_hidden_states=True, return_dict=True).hidden_states)
        return _Candidate(name, forward, model, tokenizer, True)
    if callable(model):
        def forward(batch):
            out = model(**batch) if isinstance(batch, dict) else model(batch)
            return list(out) if isinstance(out, (tuple, list)) else [out]
        return _Candidate(name, forward, model if isinstance(model, torch.nn.Module) else None, tokenizer, False)
    raise TypeError(f"models: {name}: expected a torch.nn.Module, a callable, a (model, tokenizer) pair or a folder, "
                    f"got {type(model).__name__}")


def _named(models) -> list[tuple[str, object]]:
    """(name, model) pairs from a dict, a list, or one model (a tuple (model, tokenizer) is one)."""
    if isinstance(models, dict):
        items = [(str(k), v) for k, v in models.items()]
    elif isinstance(models, list) or (isinstance(models, tuple) and not (len(models) == 2 and _is_tokenizer(models[1]))):
        items = [(_default_name(m, i), m) for i, m in enumerate(models)]
    else:
        items = [(_default_name(models, 0), models)]
    if not items:
        raise ValueError("models: expected at least one model")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"models: names must differ, got {names}; pass a dict name -> model")
    return items


def _is_tokenizer(obj) -> bool:
    return hasattr(obj, "pad_token_id") and callable(obj)


def _default_name(model, i: int) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).name or str(model)
    if isinstance(model, tuple):
        model = model[0]
    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    return Path(path).name if path else f"{type(model).__name__}-{i}"


# ---- the data ------------------------------------------------------------------------------------


def _data_size(data) -> int:
    if isinstance(data, torch.Tensor):
        return data.shape[0]
    if isinstance(data, dict):
        sizes = {k: v.shape[0] if isinstance(v, torch.Tensor) else len(v) for k, v in data.items()}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"data: expected a dict of tensors with the same first dimension, got sizes {sizes}")
        return next(iter(sizes.values()))
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        return len(data)
    raise TypeError(f"data: expected a list of texts, a tensor [N, ...] or a dict of tensors [N, ...], "
                    f"got {type(data).__name__}")


def _batch(data, lo: int, hi: int, cand: _Candidate, max_length: int, device):
    """Rows lo..hi of ``data`` as the candidate takes them, on its device (None: where they
    are), and their attention mask (or None)."""
    if isinstance(data, (list, tuple)):
        if cand.tokenizer is None:
            raise ValueError(f"models: {cand.name}: texts need a tokenizer: pass (model, tokenizer) or a folder that "
                             "holds one")
        batch = dict(cand.tokenizer(list(data[lo:hi]), padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt"))
    elif isinstance(data, dict):
        batch = {k: v[lo:hi] for k, v in data.items()}
    else:
        batch = data[lo:hi]
        if cand.transformers and not batch.is_floating_point():
            batch = {"input_ids": batch}
    if isinstance(batch, dict):
        batch = {k: tr._on_device(v, device) if isinstance(v, torch.Tensor) and device is not None else v
                 for k, v in batch.items()}
        if cand.transformers and "token_type_ids" in batch and not _takes(cand.module, "token_type_ids"):
            batch.pop("token_type_ids")
        return batch, batch.get("attention_mask")
    return (batch if device is None else tr._on_device(batch, device)), None


def _takes(module, arg: str) -> bool:
    import inspect

    return arg in inspect.signature(module.forward).parameters


# ---- layers and pooling ----------------------------------------------------------------------------


def _layer_ids(layers, count: int, cand: _Candidate) -> list:
    """Indices into the forward's list of outputs (hidden states: 0 is the embedding output),
    or "mean" for the average over layers 1..L (transformer-ranker's layermean)."""
    first = 1 if cand.transformers and count > 1 else 0
    if layers == "last":
        return [count - 1]
    if layers == "all":
        return list(range(first, count))
    if layers == "mean":
        return ["mean"]
    ids = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
            raise ValueError(f"layers: expected 'last', 'all', 'mean' or indices in [{-count}, {count}) for "
                             f"{cand.name} ({count} outputs), got {i!r}")
        out.append(i % count)
    if len(set(out)) != len(out):
        raise ValueError(f"layers: {ids} names a layer twice for {cand.name}")
    return out


def _pool(h: torch.Tensor, mask: torch.Tensor | None, pooling: str, where: str) -> torch.Tensor:
    """[B, D] from a layer's output: [B, D] as it is, [B, T, D] over the tokens (mean over the
    unmasked ones, the first, or the last unmasked one), [B, C, H, W] averaged over H and W."""
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise ValueError(f"{where}: expected a float tensor output, got {type(h).__name__}")
    if h.element_size() < 4:  # sums of bf16/fp16 in float32 (a bf16 token count is exact to 256 only)
        h = h.float()
    if h.dim() == 2:
        return h
    if h.dim() == 4:
        return h.mean((2, 3))
    if h.dim() != 3:
        raise ValueError(f"{where}: expected an output [B, D], [B, T, D] or [B, C, H, W], got shape {tuple(h.shape)}")
    if mask is None:
        return h.mean(1) if pooling == "mean" else h[:, 0] if pooling == "cls" else h[:, -1]
    m = mask.to(h.dtype)
    if pooling == "mean":
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    # The first or last unmasked token: tokenizers that pad on the left (LLaMA's) shift both.
    position = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    index = ((mask > 0) * (mask.shape[1] + 1 - position) if pooling == "cls" else (mask > 0) * position).argmax(1)
    return h[torch.arange(h.shape[0], device=h.device), index]


# ---- the result ----------------------------------------------------------------------------------


@dataclass
class RankResult:
    """Scores per model and layer (``rows``: one dict per (model, layer): model, layer, dim and
    every score), the best layer of each model by the first score (``best``), and the models in
    order of their best layer's first score (``ranking``, best first). Higher is better."""
    scores: tuple
    rows: list = field(default_factory=list)

    @property
    def best(self) -> dict:
        out = {}
        for r in self.rows:
            if r["model"] not in out or r[self.scores[0]] > out[r["model"]][self.scores[0]]:
                out[r["model"]] = r
        return out

    @property
    def ranking(self) -> list:
        return sorted(self.best, key=lambda m: -self.best[m][self.scores[0]])

    def table(self) -> str:
        best = self.best
        width = max(5, *(len(m) for m in best))
        lines = [f"{'rank':>4}  {'model':<{width}} {'layer':>6} {'dim':>6} " + " ".join(f"{s:>14}" for s in self.scores)]
        for i, m in enumerate(self.ranking, 1):
            r = best[m]
            lines.append(f"{i:>4}  {m:<{width}} {str(r['layer']):>6} {r['dim']:>6} "
                         + " ".join(f"{r[s]:>14.6g}" for s in self.scores))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"scores": list(self.scores), "ranking": self.ranking,
                           "best": {m: r["layer"] for m, r in self.best.items()}, "rows": self.rows}, indent=1)

    def to_csv(self) -> str:
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=["model", "layer", "dim", *self.scores])
        w.writeheader()
        w.writerows(self.rows)
        return out.getvalue()


# ---- the pass ------------------------------------------------------------------------------------


def _progress(total: int, name: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=name, unit="sample", file=sys.stderr, leave=False)
        except ImportError:
            pass
    return None


def _device_of(cand: _Candidate):
    """Where the candidate's parameters are; None for a callable or a module without any,
    which takes the data where it is (tokenized texts: the CPU)."""
    if cand.module is not None:
        for p in cand.module.parameters():
            return p.device
    return None


def _one_pass(cand: _Candidate, data, N: int, layers, pooling: str, batch_size: int, max_length: int,
              progress: bool, add) -> None:
    """Run one model over the data once: ``add(layer, pooled features [b, D], lo, hi, dtype)``
    for each layer asked for, batch after batch (``dtype``: the layer's own, which the pooled
    features' precision is), in inference mode, every submodule's train flag restored after."""
    device = _device_of(cand)
    ids = None
    bar = _progress(N, cand.name, progress)
    modules = list(cand.module.modules()) if cand.module is not None else []
    training = [m.training for m in modules]
    if modules:
        cand.module.eval()
    limit = getattr(getattr(cand.module, "config", None), "max_position_embeddings", None)
    max_length = min(max_length, limit) if isinstance(limit, int) and limit > 0 else max_length
    try:
        with torch.inference_mode():
            for lo in range(0, N, batch_size):
                hi = min(N, lo + batch_size)
                batch, mask = _batch(data, lo, hi, cand, max_length, device)
                try:
                    outputs = cand.forward(batch)
                except (IndexError, RuntimeError, TypeError, ValueError) as e:
                    if isinstance(e, torch.OutOfMemoryError):
                        raise
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise ValueError(f"models: {cand.name}: its forward pass failed on samples {lo}..{hi - 1} "
                                     f"(data of another model, or token ids past its vocabulary?): {first}") from None
                if ids is None:
                    ids = _layer_ids(layers, len(outputs), cand)
                for i in ids:
                    if i == "mean":
                        hs = outputs[1:] if cand.transformers and len(outputs) > 1 else outputs
                        pooled = [_pool(h, mask, pooling, f"{cand.name} output {j}") for j, h in enumerate(hs)]
                        if len({p.shape for p in pooled}) != 1:
                            raise ValueError(f"layers: 'mean' averages outputs of one shape, {cand.name} gives "
                                             f"{[tuple(p.shape[1:]) for p in pooled]}")
                        x, dtype = sum(pooled) / len(pooled), hs[0].dtype
                    else:
                        x, dtype = _pool(outputs[i], mask, pooling, f"{cand.name} output {i}"), outputs[i].dtype
                    if x.shape[0] != hi - lo:
                        raise ValueError(f"{cand.name} output {i}: expected {hi - lo} rows for the batch, got "
                                         f"{x.shape[0]}")
                    if not bool(torch.isfinite(x).all()):
                        raise ValueError(f"{cand.name} layer {i}: non-finite features in samples {lo}..{hi - 1}")
                    add(i, x, lo, hi, dtype)
                if bar is not None:
                    bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
        for m, flag in zip(modules, training):
            m.training = flag


def _statistics(cand: _Candidate, data, N: int, y: torch.Tensor, classes: int, wanted: set, lowest: int,
                settings: dict) -> dict:
    """{layer: FeatureStats} of one model over the data (``lowest``: ETran's sample count)."""
    stats: dict = {}

    def add(i, x, lo, hi, dtype):
        if i not in stats:
            stats[i] = ts.FeatureStats(x.shape[1], classes, wanted, x.device, lowest=lowest)
        stats[i].update(x, tr._on_device(y[lo:hi], x.device), dtype)

    _one_pass(cand, data, N, add=add, **settings)
    return stats


def _posteriors(cand: _Candidate, data, N: int, y: torch.Tensor, stats: dict, settings: dict) -> dict:
    """NCTI's second pass: {layer: its ts.Posteriors over the data}."""
    post = {i: ts.Posteriors(st, f"{cand.name} layer {i}") for i, st in stats.items()}
    _one_pass(cand, data, N, add=lambda i, x, lo, hi, dtype: post[i].update(x, tr._on_device(y[lo:hi], x.device)),
              **settings)
    return post


def rank_models(models, data, labels, *, scores=("logme", "hscore", "gbc_log"), layers="last", pooling: str = "mean",
                batch_size: int = 32, max_length: int = 128, compat: str = "corrected", device=None,
                progress: bool = True, backend: str = "auto", group=None) -> RankResult:
    """Score candidate models on a labelled target set by running them over it once each.

    Parameters
    ----------
    models : a dict name -> model, a list of models, or one model. A model is a torch
        ``nn.Module`` (a transformers model gives its hidden states; another module its
        output, or a tuple/list of outputs, one per layer), a ``(model, tokenizer)`` pair, a
        callable (batch -> tensor or list of tensors), or the path of a local transformers
        folder (config, safetensors weights and tokenizer; nothing is downloaded).
    data : N texts (tokenized by each model's tokenizer, up to ``max_length`` tokens), a tensor
        [N, ...] (integer token ids for transformers models, else the module's input), or a
        dict of tensors [N, ...] passed as keyword arguments (input_ids, attention_mask...).
    labels : class ids [N], any distinct integers.
    scores : names from ``transferops.transferability_stats.STREAMED``: logme, hscore,
        hscore_shrinkage, gbc, gbc_log (GBC as -log(-GBC): the same order, no underflow to -0),
        transrate (O(C D^2) memory per layer), etran, ncti (normalized over every (model,
        layer) candidate, 0 for a single one; each model runs a second time for its
        posteriors). The first one picks each model's best layer and sorts the ranking.
    layers : "last" (default), "all" (every hidden state past the embeddings, or every output
        of a callable), "mean" (their average, transformer-ranker's layermean), or indices into
        the hidden states (0 = embeddings, -1 = last).
    pooling : over the tokens of a [B, T, D] output: "mean" over the attention mask (default),
        "cls" (the first unmasked token) or "last" (the last unmasked one), right or left
        padding alike. [B, C, H, W] outputs are averaged over H and W.
    group : a torch.distributed process group, None (default) for this process alone. Each
        rank passes the same models and its own shard of the samples (``data`` and ``labels``,
        any number of them, none included), and every model's statistics are summed over the
        ranks (one all-reduce per model) before its scores are taken, so the result is that of
        all the samples in one process, to float64 rounding, and the same on every rank.
        Collective: every rank calls it. An error on any rank raises
        ``transferops._dist.RankFailure`` on every rank, naming the rank and its error.

    Each model runs in inference mode on its own device and dtype (``device``: where models
    given as folders go, default the CPU; each is loaded when its turn comes; a callable or a
    module without parameters gets the data where it is); pooled features
    are added to float64 statistics on that device. ``max_length`` is capped at a model's
    positions; ``compat`` and ``backend`` are LogME's (see :func:`transferops.logme`; the
    other scores are torch code, "reference"). Returns a :class:`RankResult`.
    """
    wanted_scores = ts.check_scores(scores)
    rows, terms = candidate_rows(models, data, labels, scores=wanted_scores, layers=layers, pooling=pooling,
                                 batch_size=batch_size, max_length=max_length, compat=compat, device=device,
                                 progress=progress, backend=backend, group=group)
    return ranked(wanted_scores, rows, terms)


def ranked(scores: tuple, rows: list, terms: list) -> RankResult:
    """The :class:`RankResult` of rows from :func:`candidate_rows`, NCTI (when asked for)
    normalized over every row's raw terms, which meet on the first one's device."""
    result = RankResult(scores, rows)
    if terms:
        from .transferability_collapse import ncti_combine

        combined = ncti_combine(torch.stack([tr._on_device(t, terms[0].device) for t in terms]))
        for row, value in zip(rows, combined):
            row["ncti"] = float(value)
    return result


def candidate_rows(models, data, labels, *, scores, layers, pooling: str, batch_size: int, max_length: int,
                   compat: str, device, progress: bool, backend: str, group=None) -> tuple[list, list]:
    """:func:`rank_models`' work before NCTI's normalization over the candidates: its rows (one
    per model and layer, every score but ncti) and, if ncti is asked for, each row's raw NCTI
    terms [3] (else []). Rows of models scored apart (by ``transferops rank`` on several ranks)
    join into one result through :func:`ranked`."""
    from . import transferability_dist as td
    from .transferability_collapse import etran_count

    group = _dist.group_of(group)
    wanted_scores = ts.check_scores(scores)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {list(POOLINGS)}, got {pooling!r}")
    for value, name in ((batch_size, "batch_size"), (max_length, "max_length")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if compat not in tr.COMPAT:
        raise ValueError(f"compat: expected one of {list(tr.COMPAT)}, got {compat!r}")
    if not (layers in ("last", "all", "mean") or isinstance(layers, (int, list, tuple))):
        raise ValueError(f"layers: expected 'last', 'all', 'mean' or layer indices, got {layers!r}")
    ts.check_backend(wanted_scores, backend)
    items = _named(models)
    world, me = _dist.world(group), _dist.rank(group)

    def shard():  # what may differ between ranks: checked on each, then agreed on
        N = _data_size(data)
        if world == 1 and N < 2:
            raise ValueError(f"data: expected at least 2 samples, got {N}")
        return (N, *tr._class_labels(labels, N, min_classes=2 if world == 1 else 0))

    N, ids, y = _dist.agreed(group, shard)
    classes, total = ids.numel(), N
    if world > 1:
        y, classes, total = td.shard_classes(ids, y, N, group)
    wanted = ts.needs(wanted_scores)
    settings = dict(layers=layers, pooling=pooling, batch_size=batch_size, max_length=max_length,
                    progress=progress and me == 0)
    mine: dict = {}  # model index -> (rows, terms) of the models this rank scores
    for index, (name, model) in enumerate(items):
        def first_pass():
            cand = _candidate(model, name, device=device)
            return cand, _statistics(cand, data, N, y, classes, wanted, etran_count(total), settings)

        cand, stats = _dist.agreed(group, first_pass)
        stats = td.summed_stats(stats, group, classes, wanted, etran_count(total))
        post = {}
        if "ncti" in wanted_scores:
            post = _dist.agreed(group, lambda: _posteriors(cand, data, N, y, stats, settings))
            td.summed_posteriors(post, group)

        def score():  # on one rank per model, in turn
            rows = []
            for layer, st in stats.items():
                row = {"model": name, "layer": layer, "dim": st.dim}
                for s in wanted_scores:
                    if s not in ts.SECOND_PASS:
                        row[s] = ts.score(st, s, compat=compat, backend=backend)
                rows.append(row)
            return rows, [post[layer].terms() for layer in stats if layer in post]

        scored = _dist.agreed(group, lambda: score() if index % world == me else None)
        if scored is not None:
            mine[index] = scored
    if world > 1:
        mine = td.share({i: (rows, [t.cpu() for t in terms]) for i, (rows, terms) in mine.items()}, group)
    rows = [row for i in range(len(items)) for row in mine[i][0]]
    return rows, [t for i in range(len(items)) for t in mine[i][1]]
