"""Merging whole models: state dicts in memory (:func:`merge`) or safetensors checkpoints streamed
from disk in bounded memory (:func:`merge_files`), with a method of :mod:`transferops.merging`
applied to every floating-point tensor.

Each tensor is merged chunk by chunk with the method's fused pass, which forms the task vectors
theta_t - theta_0 itself; a top-k trim over several chunks, or over the whole model
(``scope="global"``, the TIES paper's choice), first finds each task's exact threshold in
passes over the streamed data. ``out=`` writes the result into given tensors, the base's own
included.

Each tensor is merged on its own device, where its inputs lie (:func:`merge`) or where
:func:`merge_files` is asked to merge: on a GPU the Triton kernels run every pass, the exact
top-k's included, and nothing goes back to the host but what is written to disk.
"""
from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from . import _checks
from . import _memory
from . import _topk
from . import merging_interp
from ._mergeconfig import layer_fractions
from .merging_interp import TENSORWISE
from ._backend import BackendUnavailable, backend_reason, forced_backend, native_buffer, native_module
from .merging import (_DTYPES, MergeSpec, _accumulation_dtype, _check_compatible, _fnv1a32, _majority, _native_pass,
                      _native_trims, _reference_votes, _task_vectors, merge_op, method_spec, streamed_scales)

# merge() works through tensors in chunks of this many elements where a backend forms the task
# vectors, so that they stay O(chunk) rather than O(T x tensor); the fused native pass forms
# none and takes whole tensors.
_IN_MEMORY_CHUNK = 1 << 22


def _paths(backend: str, device: torch.device, dtype: torch.dtype, spec: MergeSpec) -> tuple[str, str | None]:
    """(the backend that merges a tensor of ``dtype`` on ``device`` with ``spec``, and the select
    that streams an exact top-k over its chunks): "native" on the CPU; "triton" where the merge
    runs Triton, or on a GPU with Triton installed; None where neither can, and such a tensor
    is merged whole."""
    picked = merge_op.select(backend, device, dtype, ([], None, spec), name="merge")[0]
    if picked == "triton" or (device.type != "cpu" and backend_reason("triton", device) is None):
        return picked, "triton"
    return picked, "native" if device.type == "cpu" and native_module() is not None else None


def _chunk_elements(spec: MergeSpec, numel: int, chunk: int, select: str | None) -> int:
    """Elements per chunk: a top-k trim over several chunks needs a streamed ``select``, else the
    whole tensor is one chunk."""
    if (spec.density is not None and select is None) or spec.della is not None:
        return max(numel, 1)  # della ranks whole rows
    return chunk


def _chunks(numel: int, chunk: int):
    return [(s, min(chunk, numel - s)) for s in range(0, numel, chunk)]


def _merge_tensor(name: str, base_read, model_reads, numel: int, dtype: torch.dtype, device: torch.device,
                  spec: MergeSpec, weights, lam: float, chunk: int, backend: str, target, emit=None, trims=None,
                  shape=None) -> None:
    """Merge one tensor, whose reads give pieces on ``device``, chunk by chunk with the method's
    fused pass, which forms
    tau_t = theta_t - theta_0 in the accumulation dtype (float32, or float64 for float64 models)
    and writes theta_0 + lam * merged in ``dtype`` into ``target(start, count)`` (a flat
    tensor), then calls ``emit(start, that tensor)``.
    A top-k trim over several chunks first finds each task's exact threshold over the whole
    tensor, streaming it once per radix digit (``trims`` given: already found, e.g. over the
    whole model; then ``spec.zero_sign`` is too); mergekit's rescale, its L1 ratios in one
    more pass. DELLA, merged whole, sees the tensor in its ``shape``, whose rows it ranks."""
    picked, streams = _paths(backend, device, dtype, spec)
    spec = replace(spec, stream=_fnv1a32(name), lam=lam)
    ranges = _chunks(numel, chunk)
    pieces = [(model_reads, base_read, s, c) for s, c in ranges]
    if trims is not None:
        spec = replace(spec, trims=trims)
    elif spec.density is not None and len(ranges) > 1:
        select = _streamed_select(streams, pieces, numel, len(model_reads), _accumulation_dtype(dtype), device)
        spec = replace(spec, trims=tuple(_topk.trims(select, numel, spec)))
    if spec.rescale and len(ranges) > 1:  # mergekit's L1 ratios need the whole tensor first
        spec = replace(spec, scales=streamed_scales(model_reads, base_read, numel, chunk, spec, picked))
    if spec.zero_sign is None and len(ranges) > 1:
        spec = replace(spec, zero_sign=_scope_majority([p + (spec.trims, weights) for p in pieces], spec, picked))
    shaped = (lambda x: x.view(shape)) if spec.della is not None and shape is not None else (lambda x: x)
    for s, c in ranges:
        merged = merge_op(backend, device, dtype, [shaped(read(s, c)) for read in model_reads], weights,
                          replace(spec, offset=s), shaped(base_read(s, c)), shaped(target(s, c)), name="merge")
        if emit:
            emit(s, merged.view(-1))


def _scope_majority(pieces, spec: MergeSpec, picked: str, ranks=None) -> int:
    """The paper's sign for zero votes over a scope merged in pieces (model_reads, base_read,
    start, count, whole-tensor trims, weights): a counting pass, native or Triton where the
    merge runs that backend (``picked``), torch otherwise. With ``ranks`` (a
    transferops.merging_dist.Ranks of several processes), the counts of each rank's pieces
    are summed across them."""
    total = 0
    for model_reads, base_read, s, c, trims, weights in pieces:
        models, base, piece = [read(s, c) for read in model_reads], base_read(s, c), replace(spec, offset=s, trims=trims)
        if picked == "native":
            bufs = [native_buffer(_checks.as_rows(m)) for m in models]
            trims = _native_trims(bufs, None, c, piece)
            total += _native_pass(bufs, native_buffer(_checks.as_rows(base)), None, weights,
                                  replace(piece, trims=trims, zero_sign=1))[1]
        elif picked == "triton":  # the count stays on the device until the end
            from .kernels import merging as kernels

            total = total + kernels.spec_pass([m.view(1, -1) for m in models], base.view(1, -1), None, weights,
                                              replace(piece, zero_sign=1), "signs")
        else:
            total += int(torch.sign(_reference_votes(_task_vectors(models, base), weights, piece)[3]).sum())
    return _majority(int(total) if ranks is None else ranks.count(int(total)))


def _streamed_select(kind: str, pieces, numel: int, tasks: int, key_dtype: torch.dtype, device: torch.device,
                     ranks=None, mine=None):
    """The exact top-k select (see :mod:`transferops._topk`) over chunks (model_reads, base_read,
    start, count) in flat order, whose task values are theta_t - theta_0 in ``key_dtype``: the
    native one (``kind``) or the device one. With ``ranks`` (a transferops.merging_dist.Ranks
    of several processes) each rank feeds the chunks ``mine`` flags to a radix select on sums
    across the ranks (see transferops._topk.Shared), in torch on the CPU."""
    if kind == "native" and ranks is None:
        return _topk.streamed(_model_passes(pieces), numel, tasks, max(c for *_, c in pieces))
    starts = list(itertools.accumulate((c for *_, c in pieces), initial=0))[:-1]  # in the whole scope

    def chunks():
        for (model_reads, base_read, s, c), at, fed in zip(pieces, starts, mine or itertools.repeat(True)):
            if fed:
                yield at, lambda model_reads=model_reads, base_read=base_read, s=s, c=c: (
                    [read(s, c).view(1, -1) for read in model_reads], base_read(s, c).view(1, -1))
    shared = None if ranks is None else _topk.Shared(starts, ranks.total)
    if kind == "native":
        return _topk.spread(chunks, numel, tasks, key_dtype, shared)
    return _topk.device(chunks, numel, tasks, key_dtype, device, shared)


def _model_passes(pieces):
    """``passes`` for :func:`transferops._topk.streamed` over chunks (model_reads, base_read,
    start, count) in order: the native passes form theta_t - theta_0 themselves."""
    def passes(which):
        for model_reads, base_read, s, c in pieces:
            yield ([native_buffer(model_reads[t](s, c).view(1, -1)) for t in which],
                   native_buffer(base_read(s, c).view(1, -1)))
    return passes


def _global_trims(items, spec: MergeSpec, chunk_of, weights_of, backend: str, ranks=None) -> tuple[dict, MergeSpec]:
    """One top-k threshold per task over all the float tensors of the model together (the TIES
    paper's choice), streamed chunk by chunk, split into per-tensor trims; and ``spec`` with
    the paper's zero-vote sign, when it asks for it, taken over the whole model too. The
    tensors are concatenated in sorted-name order, as the paper's code flattens them, so that
    the ties kept at the threshold (lowest position first) do not depend on file or dict order.
    ``items`` holds (name, numel, dtype, device, reads), reads[0] the base's. With ``ranks`` (a
    transferops.merging_dist.Ranks of several processes) each rank reads only the tensors it
    owns, and the counts are summed across the ranks: the same trims and sign on every rank."""
    if spec.density is None or not items:
        return {}, spec
    items = sorted(items, key=lambda item: item[0])
    accs = {_accumulation_dtype(dtype) for _, _, dtype, _, _ in items}
    if len(accs) > 1:
        raise ValueError("scope: 'global' needs the float tensors all float64 or none float64")
    devices = {device for _, _, _, device, _ in items}
    if len(devices) > 1:
        raise ValueError(f"scope: 'global' needs the float tensors on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    picked, kind = _paths(backend, device, items[0][2], spec)
    if kind is None:
        raise BackendUnavailable("scope='global' needs the native module on the CPU, or Triton on a GPU (their radix "
                                 "select streams the model)")
    total = sum(numel for _, numel, _, _, _ in items)
    chunked = [(name, reads, s, c) for name, numel, dtype, _, reads in items
               for s, c in _chunks(numel, chunk_of(numel, dtype, device))]
    mine = None if ranks is None else [ranks.owns(name) for name, *_ in chunked]
    select = _streamed_select(kind, [(reads[1:], reads[0], s, c) for _, reads, s, c in chunked], total,
                              len(items[0][4]) - 1, accs.pop(), device, ranks, mine)
    per_task = _topk.trims(select, total, spec)
    out, offset = {}, 0
    for name, numel, _, _, _ in items:
        out[name] = _topk.shift(per_task, offset, numel)
        offset += numel
    if spec.zero_sign is None:
        spec = replace(spec, zero_sign=_scope_majority(
            [(reads[1:], reads[0], s, c, out[name], weights_of(name)) for name, reads, s, c in chunked
             if ranks is None or ranks.owns(name)], spec, picked, ranks))
    return out, spec


SCOPES = ("tensor", "global")


def _block_weights(weights, T: int):
    """name -> the T task weights of that tensor. ``weights``: None, T floats for every tensor,
    or, aTLAS-style (Zhang et al., NeurIPS 2024: one coefficient per task and parameter block),
    a mapping from fnmatch patterns of tensor names to T floats, the first matching pattern
    applying (put a "*" last for a default). A tensor no pattern matches is an error."""
    if not isinstance(weights, Mapping):
        fixed = _checks.weight_list(weights, T)
        return lambda name: fixed
    table = [(str(p), _checks.weight_list(w, T, f"weights[{p!r}]")) for p, w in weights.items()]

    def of(name: str):
        for pattern, w in table:
            if fnmatch.fnmatchcase(name, pattern):
                return w
        raise ValueError(f"weights: no pattern matches tensor {name!r} (patterns: {[p for p, _ in table]}); "
                         "add '*' for a default")
    return of


class _Plan:
    """The method's arguments tensor by tensor: ``plan(name)`` gives (spec, weights, lam) for a
    task-vector method, or the params of a tensor-wise one (:mod:`transferops.merging_interp`).
    ``tensor_args(name, t)``, when given, overrides ``args`` per tensor, ``t`` being the
    tensor's layer fraction (see :func:`transferops._mergeconfig.layer_fractions`), as a
    mergekit config's gradients and filters do."""

    def __init__(self, method: str, lam: float, weights, args: dict, tensor_args, names, T: int):
        self.method, self.T, self.args, self.tensor_args = method, T, args, tensor_args
        self.tensorwise = method in TENSORWISE
        self.lam = _checks.finite(lam, "lam")
        self.weights = weights
        self._specs: dict = {}
        if tensor_args is not None and not callable(tensor_args):
            raise TypeError(f"tensor_args: expected a callable (name, t) -> arguments, got {type(tensor_args).__name__}")
        self.t = layer_fractions(names) if tensor_args is not None else {}
        if not self.tensorwise:
            self.weights_of = _block_weights(weights, T)
            # With tensor_args, what the plain arguments lack (a density, say) comes per tensor.
            self.spec = None if tensor_args is not None else self._spec(args)
        # Checked before anything is read: every tensor's arguments where they vary per tensor
        # (a gradient or a filter may put one tensor's out of range).
        for name in names if tensor_args is not None else names[:1]:
            arguments = self(name)
            if self.tensorwise:
                merging_interp.check(method, arguments)
        if self.tensorwise and not names:
            merging_interp.check(method, self._params(args.get("params"), weights))

    def _params(self, params, weights) -> dict:
        params = dict(params or {})
        if weights is not None:
            if isinstance(weights, Mapping):
                raise ValueError(f"weights: method {self.method!r} takes one weight per model, not per pattern")
            params["weight"] = _checks.weight_list(weights, self.T)
        return params

    def _spec(self, args: dict) -> MergeSpec:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in args.items()))
        if key not in self._specs:
            self._specs[key] = method_spec(self.method, tasks=self.T, **args)
        return self._specs[key]

    def __call__(self, name: str):
        over = {} if self.tensor_args is None else dict(self.tensor_args(name, self.t.get(name, 0.0)))
        if self.tensorwise:
            return self._params({**(self.args.get("params") or {}), **over.pop("params", {})}, over.pop("weights", self.weights))
        weights = over.pop("weights", None)
        lam = _checks.finite(over.pop("lam", self.lam), "lam")
        spec = self._spec({**self.args, **over}) if over or self.spec is None else self.spec
        return spec, (_checks.weight_list(weights, self.T) if weights is not None else self.weights_of(name)), lam


def _method_args(method: str, *, params=None, **args) -> dict:
    """The arguments given to merge() or merge_files() for ``method``: a task-vector method's
    (those left at their defaults dropped, so that a tensor-wise method refuses any other)."""
    defaults = {"sign": "sum", "semantics": "peft"}
    given = {k: v for k, v in args.items() if v is not None and v != defaults.get(k)}
    if method in TENSORWISE:
        if given:
            raise ValueError(f"{sorted(given)[0]}: method {method!r} takes its arguments in params "
                             f"(mergekit's names), not as {sorted(given)}")
        return {"params": params}
    if params is not None:
        raise ValueError(f"params: method {method!r} takes keyword arguments (density, ...), not params")
    return args


def _check_base(plan: _Plan, has_base: bool) -> None:
    needs = merging_interp.needs_base(plan.method)
    if needs is True and not has_base:
        raise ValueError(f"base: method {plan.method!r} needs a base model")
    if needs is False and has_base:
        raise ValueError(f"base: method {plan.method!r} takes no base model (give the models only)")


def _scope_trims(plan: _Plan, scope: str, items, chunk_of, backend: str, ranks=None) -> tuple[dict, MergeSpec | None]:
    """Model-wide trims (``scope="global"``) and the spec they go with, or ({}, None); see
    :func:`_global_trims` for ``ranks``."""
    if scope != "global":
        return {}, None
    if plan.tensorwise or plan.tensor_args is not None:
        raise ValueError("scope: 'global' takes one set of task-vector arguments for the whole model "
                         f"({'a tensor-wise method' if plan.tensorwise else 'tensor_args given'})")
    return _global_trims(items, plan.spec, lambda n, d, dev: chunk_of(n, d, dev, plan.spec), plan.weights_of, backend,
                         ranks)


def _merge_tensorwise(plan: _Plan, name: str, base, models: list, backend: str) -> torch.Tensor:
    if backend not in merging_interp.BACKENDS:
        raise ValueError(f"backend: method {plan.method!r} runs on {merging_interp.BACKENDS}, got {backend!r}")
    return merging_interp.apply(plan.method, None if base is None else base.detach(), [m.detach() for m in models],
                                plan(name), backend=backend)


def _jsonable(weights):
    return dict(weights) if isinstance(weights, Mapping) else weights


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor view can touch."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi + t.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr(), a.dtype, a.shape, a.stride(), a.device) == (b.data_ptr(), b.dtype, b.shape, b.stride(), b.device)


def _tied(base: dict, models: list) -> dict[str, str]:
    """name -> the first name of its tie group, for the names of ``base`` whose tensor is the same
    view of the same memory as an earlier one (tied parameters: a LLaMA or GPT-2 lm_head and its
    embeddings), each checked tied or equal in every model too. They are merged once."""
    seen, tied = {}, {}
    for name, b in base.items():
        if not b.numel():
            continue
        key = (b.data_ptr(), b.dtype, tuple(b.shape), b.stride(), b.device)
        first = seen.setdefault(key, name)
        if first == name:
            continue
        for i, m in enumerate(models):
            if not (_same_view(m[name], m[first]) or torch.equal(m[name], m[first])):
                raise ValueError(f"models[{i}][{name!r}]: differs from {first!r}, which base ties it to; untie the "
                                 "base (clone one of them) to merge them apart")
        tied[name] = first
    return tied


def _state_dict(x, name: str):
    """A model's state dict (its tensors, sharing their memory), or a mapping as given."""
    if isinstance(x, torch.nn.Module):
        return x.state_dict()
    if not isinstance(x, Mapping):
        raise TypeError(f"{name}: expected a state dict or an nn.Module, got {type(x).__name__}")
    return x


def _check_devices(base: dict, base_label: str, models: list) -> None:
    """Each model's tensor lies on the device of the base's tensor of that name (where that
    tensor is merged)."""
    for name, b in base.items():
        for i, m in enumerate(models):
            if m[name].device != b.device:
                raise ValueError(f"models[{i}][{name!r}]: on {m[name].device}, but {base_label}[{name!r}] is on "
                                 f"{b.device}; a tensor is merged where its inputs lie: move them to one device")


def _fresh(b: torch.Tensor, backend: str) -> torch.Tensor:
    """A new output for base tensor ``b``, on its device; on the CPU on huge pages (see
    transferops._memory) unless a backend other than the native one is asked for."""
    native = backend == "native" or (backend == "auto" and forced_backend(None) in (None, "native"))
    if b.device.type == "cpu" and native:
        return _memory.empty(b.shape, b.dtype)
    return torch.empty(b.shape, dtype=b.dtype, device=b.device)


def _device(device) -> torch.device:
    """merge_files' ``device``: the CPU, or a CUDA device torch sees."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device: {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                         f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built'})")
    return d


def _check_out(out, base: dict, models: list, tied: dict[str, str]) -> None:
    """``out`` holds, for every name of ``base``, a contiguous tensor of its shape, dtype and
    device that overlaps no input and no other output, except that it may be the base's own
    tensor of that name (merging in place: the passes read each element of it before writing).
    A tied name's output may be its group's first output itself."""
    missing = sorted(set(base) - set(out))
    if missing:
        raise ValueError(f"out: no tensor for {missing[:3]} ({len(missing)} of base's names missing)")
    spans = []  # (first, last, label, the name it is the output of, or None for an input)
    for name, b in base.items():
        o = out[name]
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"out[{name!r}]: expected a tensor, got {type(o).__name__}")
        if name in tied and _same_view(o, out[tied[name]]):
            continue
        if o.shape != b.shape or o.dtype != b.dtype or o.device != b.device:
            raise ValueError(f"out[{name!r}]: expected {tuple(b.shape)} {b.dtype} on {b.device} as in base, "
                             f"got {tuple(o.shape)} {o.dtype} on {o.device}")
        if not o.is_contiguous():
            raise ValueError(f"out[{name!r}]: expected a contiguous tensor")
        if o.requires_grad:
            raise ValueError(f"out[{name!r}]: requires grad, and the merge writes into it in place; pass a tensor "
                             "that does not (t.detach(), or a model's state_dict())")
        if o.numel():
            spans.append((*_extent(o), f"out[{name!r}]", name))
            if not (o.data_ptr() == b.data_ptr() and b.is_contiguous()):
                spans.append((*_extent(b), f"base[{name!r}]", None))
        for i, m in enumerate(models):
            if m[name].numel():
                spans.append((*_extent(m[name]), f"models[{i}][{name!r}]", None))
    # A sweep over spans by first address: each output against every span still open.
    spans.sort(key=lambda s: s[0])
    open_ = []
    for first, last, label, written in spans:
        open_ = [s for s in open_ if s[1] > first]
        for _, _, other, other_written in open_:
            if written is not None or other_written is not None:
                first_named, then = (label, other) if written is not None else (other, label)
                raise ValueError(f"out: {first_named} overlaps {then}; outputs may only be the base's own tensors "
                                 "(in place) or memory no input and no other output uses")
        open_.append((first, last, label, written))


def merge(base: dict | None, models: list, *, method: str, lam: float = 1.0, weights=None, density=None,
          sign: str = "sum", semantics: str = "peft", seed=None, gamma=None, epsilon=None, normalize=None,
          rescale=None, scope: str = "tensor",
          params: dict | None = None, tensor_args=None, backend: str = "auto", out: dict | None = None) -> dict:
    r"""Merge fine-tuned state dicts into ``base``: for every floating-point tensor,
    :math:`\theta_0 + \lambda \cdot \mathrm{method}(\theta_1 - \theta_0, \dots, \theta_T - \theta_0)`
    in the base's dtype (task vectors formed in float32, float64 for float64 models).
    Other tensors (integer buffers) are copied from ``base``. ``method`` is one of
    :data:`METHODS`; its arguments are those of the function of the same name, and DARE
    draws each tensor's masks from ``seed`` and the tensor's name. ``scope`` sets where the
    top-k threshold of ties/magnitude_prune is taken: per tensor (PEFT, mergekit) or over all
    float tensors of the model together (the TIES paper's code), with the same tie rule.
    ``weights``: T floats, or per parameter block (aTLAS-style) a mapping from name patterns
    to T floats (see :func:`_block_weights`). The native pass forms the task vectors itself
    and takes whole tensors (its exact top-k keeps about 1% of each task's keys a while); the
    Triton pass forms them too, and it and the others process 4M elements at a time, so that
    their temporaries stay O(chunk).
    ``base``, ``models`` and ``out`` may be ``nn.Module``s (their state dicts are used, so
    ``out=model`` writes into its parameters). Tied parameters (names of ``base`` that are one
    tensor) are merged once and stay tied in a fresh output.
    Each tensor is merged on the device its inputs lie on (a GPU: by the Triton kernels, with
    no copy to the host); a model's tensor on another device than the base's is an error.
    ``out``: where to write the result instead of fresh tensors, returned: a dict with a
    contiguous tensor of the base's shape, dtype and device for each of its names (say, the
    state dict of a model to load the merge into, or ``base`` itself to merge in place and
    save a model's memory). Writing into memory in use also spares the kernel's first-touch
    page faults of a fresh output.

    The tensor-wise methods of :mod:`transferops.merging_interp` (linear, slerp, model_stock,
    ...) take their arguments in ``params``, named as in mergekit's configs (per-model values
    as lists; ``weights`` fills ``params["weight"]``); ``base`` is None where the method needs
    none. ``tensor_args(name, t)``: per-tensor overrides of the arguments (see :class:`_Plan`).
    """
    _checks.choice(scope, "scope", SCOPES)
    if not models:
        raise ValueError("models: expected at least one fine-tuned state dict")
    models = [_state_dict(m, f"models[{i}]") for i, m in enumerate(models)]
    plan = _Plan(method, lam, weights, _method_args(method, density=density, sign=sign, semantics=semantics,
                                                    seed=seed, gamma=gamma, epsilon=epsilon, normalize=normalize,
                                                    rescale=rescale, params=params),
                 tensor_args, list(models[0]), len(models))
    has_base = base is not None
    _check_base(plan, has_base)
    base = _state_dict(base, "base") if has_base else models[0]
    layout = lambda sd: {name: (tuple(t.shape), t.dtype) for name, t in sd.items()}
    _check_compatible(layout(base), [layout(m) for m in models], [f"models[{i}]" for i in range(len(models))])
    _check_devices(base, "base" if has_base else "models[0]", models)
    tied = _tied(base, models)
    if out is not None:
        out = _state_dict(out, "out")
        _check_out(out, base, models, tied)

    def chunk_of(numel: int, dtype: torch.dtype, device: torch.device, spec: MergeSpec) -> int:
        picked, streams = _paths(backend, device, dtype, spec)
        return _chunk_elements(spec, numel, max(numel, 1) if picked == "native" else _IN_MEMORY_CHUNK, streams)

    items = []
    for name, b in base.items():
        if b.dtype in _DTYPES and name not in tied:
            flat = [b.detach().reshape(-1)] + [m[name].detach().reshape(-1) for m in models]
            items.append((name, b.numel(), b.dtype, b.device, [lambda s, c, x=x: x[s:s + c] for x in flat]))
    trims, spec = _scope_trims(plan, scope, items, chunk_of, backend)
    # Tensors that are not merged (integer buffers) are the base's, copied.
    if out is None:
        out = {name: _fresh(b, backend) if b.dtype in _DTYPES else b.clone()
               for name, b in base.items() if name not in tied}
        out.update({name: out[first] for name, first in tied.items()})  # tied again
        out = {name: out[name] for name in base}
    else:
        for name, b in base.items():
            if b.dtype not in _DTYPES and name not in tied:
                out[name].copy_(b)
    for name, numel, dtype, device, reads in items:
        if plan.tensorwise:
            out[name].copy_(_merge_tensorwise(plan, name, base[name] if has_base else None, [m[name] for m in models],
                                              backend))
            continue
        result = out[name].view(-1)
        tensor_spec, weights, lam = plan(name)
        _merge_tensor(name, reads[0], reads[1:], numel, dtype, device, spec or tensor_spec, weights, lam,
                      chunk_of(numel, dtype, device, tensor_spec), backend, lambda s, c: result[s:s + c],
                      trims=trims.get(name), shape=base[name].shape)
    for name, first in tied.items():
        if not _same_view(out[name], out[first]):
            out[name].copy_(out[first])
    return out


def merge_files(base, models, out, *, method: str, lam: float = 1.0, weights=None, density=None,
                sign: str = "sum", semantics: str = "peft", seed=None, gamma=None, epsilon=None, normalize=None,
                rescale=None, scope: str = "tensor",
                params: dict | None = None, tensor_args=None, max_memory: int = 2 << 30, shard_size: int = 5 << 30, overwrite: bool = False, dtype=None,
                out_dtype=None, model_files: bool = True, tokenizer_source=None, config_text: str | None = None,
                backend: str = "auto", device="cpu", progress=None, group=None) -> list:
    """:func:`merge` over safetensors checkpoints (files, or folders of shards with
    ``model.safetensors.index.json``), streamed tensor by tensor and in chunks of huge tensors
    so that the working memory stays under about ``max_memory`` bytes whatever the model size.
    Writes the folder ``out`` as safetensors shards of at most ``shard_size`` bytes, with an
    index when there are several and metadata naming the method and its arguments.
    Checkpoints are untrusted: headers are validated and no file outside a checkpoint's folder
    is read. ``out`` must not be or lie inside an input, must be empty unless ``overwrite``
    (which replaces its contents as a whole), and is locked against a concurrent merge.
    Inputs are validated before anything is written; on any error, or an interrupt, no output
    file is left behind. ``progress(done_bytes, total_bytes, name)`` is called after each
    tensor. Returns the written paths.

    ``dtype``: the float dtype the inputs are cast to and merged in (default: each tensor's
    own), ``out_dtype`` the one written (default: ``dtype``), as mergekit's keys of those
    names. ``model_files``: also write what makes the folder load as a model (config.json and
    generation_config.json from ``base``, the tokenizer's files from ``tokenizer_source``,
    default ``base``, a model card naming the merge, and ``config_text`` as
    mergekit_config.yml); see :mod:`transferops._modelfiles`. ``base`` is None for a
    tensor-wise method that takes none (then the first model gives the layout, the model
    files and the tensors that are not merged); such methods read whole tensors, which must
    fit in ``max_memory`` with their temporaries.

    ``device``: where the chunks are merged, "cpu" or a CUDA device ("cuda", "cuda:1"): each is
    read from disk, moved there and merged there (Triton's passes, the exact top-k's included);
    only the merged chunks come back to the host, to be written. ``max_memory`` then bounds the
    working memory on the device as well as on the host.

    ``group``: a torch.distributed process group (``torch.distributed.group.WORLD``: all
    ranks) whose ranks merge together, each a disjoint share of the tensors balanced by bytes,
    into the checkpoint one process writes, bit for bit (``scope="global"`` and random masks
    included); call it on every rank with the same arguments, ``out`` on a filesystem they
    share. Nothing is committed unless every rank succeeds; if one fails or dies, every other
    raises transferops._dist.RankFailure naming it, and no output is left. ``progress`` then
    counts this rank's share. See :mod:`transferops.merging_dist`."""
    import json

    from . import __version__, _modelfiles, merging_dist
    from ._safetensors import Checkpoint

    ranks = merging_dist.Ranks(group)
    method_args = _method_args(method, density=density, sign=sign, semantics=semantics, seed=seed, gamma=gamma,
                               epsilon=epsilon, normalize=normalize, rescale=rescale, params=params)
    _checks.choice(scope, "scope", SCOPES)
    device = _device(device)
    max_memory = _checks.count(max_memory, "max_memory", low=1)
    shard_size = _checks.count(shard_size, "shard_size", low=1)
    for flag, name in ((overwrite, "overwrite"), (model_files, "model_files")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    for d, name in ((dtype, "dtype"), (out_dtype, "out_dtype")):
        if d is not None and d not in _DTYPES:
            raise ValueError(f"{name}: expected one of {sorted(map(str, _DTYPES))} or None, got {d!r}")
    out_dtype = out_dtype or dtype
    if not models:
        raise ValueError("models: expected at least one fine-tuned checkpoint")
    ckpts, output = [], None
    try:
        with ranks.step():
            for path in [base, *models] if base is not None else models:
                ckpts.append(Checkpoint(path))
            b, ms = ckpts[0], ckpts[1:] if base is not None else ckpts
            merging = _Plan(method, lam, weights, method_args, tensor_args, list(b.tensors), len(ms))
            _check_base(merging, base is not None)
            layout = lambda c: {name: (info.shape, info.dtype) for name, info in c.tensors.items()}
            _check_compatible(layout(b), [layout(m) for m in ms],
                              [f"models[{i}] ({m.path})" for i, m in enumerate(ms)])
            T = len(ms)
            compute = {n: dtype if dtype is not None and i.dtype in _DTYPES else i.dtype for n, i in b.tensors.items()}
            written = {n: out_dtype if out_dtype is not None and i.dtype in _DTYPES else i.dtype
                       for n, i in b.tensors.items()}
            args = {"lam": lam, "weights": _jsonable(weights), "density": density, "sign": sign,
                    "semantics": semantics, "seed": seed, "gamma": gamma, "epsilon": epsilon, "normalize": normalize,
                    "rescale": rescale, "scope": scope, "params": params, "per_tensor": tensor_args is not None,
                    "dtype": None if dtype is None else str(dtype),
                    "out_dtype": None if out_dtype is None else str(out_dtype)}
            meta = {"format": "pt", "merged_by": f"transferops {__version__}", "merge_method": method,
                    "merge_args": json.dumps(args), "merge_inputs": json.dumps([str(c.path) for c in ckpts])}

            def per_element(dtype: torch.dtype) -> int:
                # T + 1 chunks read and 1 written; T + 3 accumulation-dtype temporaries where the
                # backend forms the task vectors before merging (the fused native and Triton passes
                # have none; the latter's tie cut, where one is needed, about as much for one task
                # at a time).
                return (T + 2) * dtype.itemsize + (T + 3) * _accumulation_dtype(dtype).itemsize

            def chunk_of(numel: int, dtype: torch.dtype, device: torch.device, spec: MergeSpec) -> int:
                return _chunk_elements(spec, numel, max(1024, max_memory // per_element(dtype)),
                                       _paths(backend, device, dtype, spec)[1])

            if merging.tensorwise:
                for name, info in b.tensors.items():
                    need = info.numel * per_element(compute[name])
                    if info.dtype in _DTYPES and need > max_memory:
                        raise ValueError(f"max_memory: {method} merges whole tensors, and {name!r} "
                                         f"({tuple(info.shape)}) needs about {need} bytes; raise max_memory")
            ranks.assign({n: i.nbytes for n, i in b.tensors.items()})
            output = merging_dist.Output(ranks, out, inputs=set().union(*(c.sources for c in ckpts)),
                                         overwrite=overwrite, plan=[(n, written[n], i.shape) for n, i in b.tensors.items()],
                                         shard_size=shard_size, metadata=meta)
        with ranks.step():
            writer = output.open()
            items = [(name, info.numel, compute[name], device,
                      [lambda s, c, m=m, name=name: m.read(name, s, c).to(device=device, dtype=compute[name])
                       for m in ckpts])
                     for name, info in b.tensors.items() if info.dtype in _DTYPES]
            trims, spec = _scope_trims(merging, scope, items, chunk_of, backend, ranks if ranks.world > 1 else None)
            reads_of = {name: reads for name, _, _, _, reads in items}
            total = sum(info.nbytes for name, info in b.tensors.items() if ranks.owns(name))
            done = 0
            for name, info in b.tensors.items():
                if not ranks.owns(name):
                    continue
                ranks.poll()
                reads = reads_of.get(name)
                if info.dtype not in _DTYPES:
                    writer.write(name, 0, b.read(name))
                elif merging.tensorwise:
                    whole = [read(0, info.numel).view(info.shape) for read in reads]
                    merged = _merge_tensorwise(merging, name, whole[0] if base is not None else None,
                                               whole[1:] if base is not None else whole, backend)
                    writer.write(name, 0, merged.to(device="cpu", dtype=written[name]).reshape(-1))
                else:
                    tensor_spec, weights_t, lam_t = merging(name)
                    chunk = chunk_of(info.numel, compute[name], device, tensor_spec)
                    buf = torch.empty(min(chunk, info.numel), dtype=compute[name], device=device)  # for every chunk
                    _merge_tensor(name, reads[0], reads[1:], info.numel, compute[name], device, spec or tensor_spec,
                                  weights_t, lam_t, chunk, backend, lambda s, c: buf[:c],
                                  lambda s, x, name=name: writer.write(name, s, x.to("cpu", written[name])),
                                  trims=trims.get(name), shape=info.shape)
                done += info.nbytes
                if progress:
                    progress(done, total, name)
            extra = _modelfiles.write(output.folder, b.path, None if tokenizer_source is None else Path(tokenizer_source),
                                      out_dtype, method, args, [str(m.path) for m in ms],
                                      config_text) if model_files and ranks.rank == 0 else []
            output.finish()
        return output.commit(extra)
    except BaseException:
        if output is not None:
            output.abort()
        raise
    finally:
        for c in ckpts:
            c.close()
