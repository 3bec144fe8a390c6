"""Merging: sign-elected reductions of task vectors (TIES and relatives).

Every method here is one configuration of a single fused pass (:class:`MergeSpec`): an
optional per-task top-k trim by magnitude, then either a weighted sum or the TIES sign
election with a disjoint mean. The reference backend is that pass written plainly in float64
torch; the fast backends run it reading each input once, with no T x P temporaries.

Ties at the top-k threshold: where several entries share the k-th largest magnitude, the
ones at the lowest flat (row-major) positions are kept, on every backend. PEFT and mergekit
keep whichever ``torch.topk``/``argsort`` returns first, which no other implementation can
promise to follow; everywhere else the results agree with theirs exactly.

Whole models, in memory or streamed from checkpoints (:func:`merge`, :func:`merge_files`), are
merged by :mod:`transferops.merging_models`; both names are importable from here too.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from . import _checks
from . import _memory
from . import _topk
from ._philox import U32 as _U32
from ._backend import Op, native_buffer, native_module
from ._mergenames import METHODS, SEMANTICS, SIGN_RULES
from ._selection import (L1_BLOCK, _at, _keep_below, kept_l1_partials, l1_partials, l1_scales,
                         selection as _selection)
from ._selection import _dare_keep, _della_keep_probability, _draws, _topk_keep  # noqa: F401 (tests use them here)

_DTYPES = _checks.FLOAT_DTYPES


@dataclass(frozen=True)
class MergeSpec:
    # The fractions density, dare, gamma and della's are one value for all tasks or a tuple of
    # one per task (mergekit's per-model parameters).
    density: float | tuple | None  # keep the top int(density * numel) magnitudes per task; None: no trim
    elect: bool  # TIES election + disjoint mean; False: weighted sum
    sign: str = "sum"  # election rule, see SIGN_RULES
    semantics: str = "peft"  # see SEMANTICS and ties()
    # DARE keep probability; survivors divided by it, except under "mergekit". None: no DARE.
    dare: float | tuple | None = None
    seed: int = 0  # DARE: with `stream` (a hash of the tensor's name), keys the Philox counter
    stream: int = 0
    # Set only when a tensor is merged in chunks: the whole tensor's top-k trims, one
    # (lo, hi, cut, drop_lo, drop_hi, drop_cut) per task (see _topk.trims; numbers, or 0-d
    # tensors where a device select found them), and the chunk's first flat index (for the
    # trims' cuts and DARE).
    trims: tuple | None = None
    offset: int = 0
    lam: float = 1.0  # merging models onto a base: base + lam * merged
    # The sign a vote of exactly 0 elects: +1 (PEFT, mergekit); None ("paper"): the sign of the
    # sum of the elected signs over the input, -1 where that is 0 too; set to +1 or -1 when the
    # input is a chunk of a larger scope, whose majority is then found by a pass of its own.
    zero_sign: int | None = 1
    gamma: float | tuple | None = None  # Model Breadcrumbs: the top fraction of magnitudes dropped
    della: tuple | None = None  # DELLA's (density, epsilon): keep probabilities by rank, see below
    # Elections divide the agreeing sum by its count or weight, unless False (mergekit's
    # normalize: false: by 1); sums are divided by the weights' sum only if True (mergekit's
    # normalize: true; by 1 where |sum| < 1e-8). None: elections divide, sums do not.
    normalize: bool | None = None
    # mergekit's rescale: each task's kept values times ||tau_t||_1 / ||kept tau_t||_1 over the
    # whole tensor (1 where either is below 1e-7); `scales` holds those ratios when the tensor is
    # merged in chunks, found by a pass of their own (see l1_scales; on the Triton path a float64
    # tensor on the device), else the backend finds them.
    rescale: bool = False
    scales: tuple | torch.Tensor | None = None

    @property
    def divides(self) -> bool:
        """Whether the fused pass divides its sum (see ``normalize``)."""
        return self.elect if self.normalize is None else self.normalize

    @property
    def divides_survivors(self) -> bool:
        """DARE and DELLA divide survivors by their keep probability (PEFT, the papers), not
        under mergekit's semantics, where ``rescale`` may rescale them to the L1 norm instead."""
        return self.semantics != "mergekit"

    @property
    def tasks(self) -> int | None:
        """How many tasks the per-task parameters are given for; None: one value for all."""
        sizes = {len(v) for v in (self.density, self.dare, self.gamma, *(self.della or ())) if isinstance(v, tuple)}
        return sizes.pop() if sizes else None

    @property
    def weight_before_election(self) -> bool:
        """mergekit votes with w_t * tv_t and divides by the agreeing weight."""
        return self.semantics == "mergekit"

    def keep_count(self, numel: int, task: int = 0) -> int:
        """The rank of task ``task``'s top-k threshold: int(density * numel); mergekit's
        ``magnitude`` keeps at least one of a non-empty tensor when density > 0 (its
        ``magnitude_outliers``, breadcrumbs, does not); the paper's code thresholds at the
        (int(density * numel) + 1)-th largest magnitude and keeps every tie (see keep_ties)."""
        density = _at(self.density, task)
        k = int(density * numel)
        if self.semantics == "paper":
            return min(k + 1, numel)
        return max(1, k) if self.semantics == "mergekit" and self.gamma is None and density > 0 else k

    def drop_count(self, numel: int, task: int = 0) -> int:
        """Breadcrumbs: how many of the largest magnitudes are dropped, int(gamma * numel), fewer
        where the kept int(density * numel) would otherwise run out of entries (mergekit's
        ``magnitude_outliers``)."""
        if self.gamma is None:
            return 0
        return min(int(_at(self.gamma, task) * numel), numel - self.keep_count(numel, task))

    @property
    def keep_ties(self) -> bool:
        """Keep every entry tied with the threshold (the paper's |x| >= kth value), rather than
        exactly k entries (lowest flat index first among the ties)."""
        return self.semantics == "paper"


def _fused_only(what: str, **allowed):
    """An Op limit: this backend runs only the specs whose fields equal ``allowed``."""
    def limit(tvs, weights, spec, *_):
        bad = [k for k, v in allowed.items() if getattr(spec, k) != v]
        return f"{what} does not implement {', '.join(bad)} yet" if bad else None
    return limit


merge_op = Op("merge", order=("triton", "cuda", "native", "reference"))


def _fnv1a32(name: str) -> int:
    """The DARE stream of a tensor: FNV-1a of its name, so each tensor of a model draws its
    own mask from one seed."""
    h = 0x811C9DC5
    for byte in name.encode():
        h = ((h ^ byte) * 0x01000193) & _U32
    return h


def _majority(sign_sum: int) -> int:
    """The paper code's sign for exactly-zero votes: that of the summed elected signs; where
    that is 0 as well its mask keeps the negative entries."""
    return 1 if sign_sum > 0 else -1


def _with_base(merged: torch.Tensor, base: torch.Tensor, spec: MergeSpec) -> torch.Tensor:
    """base + lam * merged, rounded as the fused kernels round: merged and the sum in the
    accumulation dtype, one rounding to the base's dtype."""
    acc = _accumulation_dtype(base.dtype)
    return (merged.to(acc) * spec.lam + base.to(acc)).to(base.dtype)


def _task_vectors(models, base):
    """theta_t - theta_0 in the accumulation dtype, as the fused kernels form them."""
    acc = _accumulation_dtype(base.dtype)
    return [m.to(acc) - base.to(acc) for m in models]


def _unfused_base(impl):
    """An impl of task vectors made to take what every impl takes, (tvs, weights, spec, base,
    out): with ``base``, ``tvs`` are models theta_t, the task vectors are theta_t - base and
    the result is base + spec.lam * merged in base's dtype; ``out`` receives the result. This
    one forms the task vectors first; the native and Triton kernels fuse both."""
    def run(tvs, weights, spec: MergeSpec, base=None, out=None):
        if base is None:
            result = impl(tvs, weights, spec)
        else:
            result = _with_base(impl(_task_vectors(tvs, base), weights, spec), base, spec)
        return result if out is None else out.copy_(result)
    return run


def streamed_scales(model_reads, base_read, numel: int, chunk: int, spec: MergeSpec, kind: str):
    """mergekit's rescale ratios (see l1_scales) of one tensor that is merged in chunks, from a
    pass of their own over it: ``model_reads``/``base_read`` (start, count) give flat pieces of
    the models and the base, ``spec`` carries the whole tensor's trims. Its chunks of about
    ``chunk`` elements start on kept_l1_block boundaries, so each block's sums, and the ratios,
    are those of the tensor merged whole: native (cpu::kept_l1) where the merge runs native
    (``kind``), torch (l1_partials) where it runs the reference; where it runs Triton, that
    kernel's sums, and the ratios as a tensor on the device."""
    if kind == "triton":
        from .kernels import merging as kernels
    step = max(L1_BLOCK, chunk // L1_BLOCK * L1_BLOCK)
    parts = []
    for s in range(0, numel, step):
        c = min(step, numel - s)
        models, base = [read(s, c) for read in model_reads], base_read(s, c)
        piece = replace(spec, offset=s)
        if kind == "native":
            trims = None if spec.trims is None else _topk.shift(spec.trims, s)
            parts.append(native_module().kept_l1([native_buffer(m.view(1, -1)) for m in models],
                                                 native_buffer(base.view(1, -1)), trims, _dare_args(piece, len(models)), s))
        elif kind == "triton":
            parts.append(kernels.spec_pass([m.view(1, -1) for m in models], base.view(1, -1), None, None, piece, "l1"))
        else:
            parts.append(kept_l1_partials(_task_vectors(models, base), piece))
    return kernels.l1_ratios(parts) if kind == "triton" else l1_scales(parts)


def _reference_votes(tvs: list[torch.Tensor], weights: list[float] | None, spec: MergeSpec):
    """The reference pass up to the vote, in float64: (selected x [T, ...], w, signs of the
    voters, vote)."""
    x = torch.stack([t.to(torch.float64) for t in tvs])  # [T, ...]
    _checks.raise_nonfinite(int((~torch.isfinite(x)).any(0).sum()), "task_vectors")
    keep, divisor = _selection(x, spec)
    if spec.rescale:
        scales = spec.scales or l1_scales([l1_partials(x, keep, spec.offset)])
        divisor = divisor / torch.tensor(scales, dtype=torch.float64, device=x.device).view(-1, *[1] * (x.dim() - 1))
    x = torch.where(keep, x / divisor, 0.0)
    w = torch.tensor(weights if weights is not None else [1.0] * len(tvs), dtype=torch.float64, device=x.device)
    w = w.view(-1, *([1] * (x.dim() - 1)))
    voter = w * x if spec.weight_before_election else x
    s = torch.sign(voter)
    vote = voter.sum(0) if spec.sign == "sum" else s.sum(0)
    return x, w, s, vote


@merge_op.register("reference", dtypes=_DTYPES)
@_unfused_base
def _merge_reference(tvs: list[torch.Tensor], weights: list[float] | None, spec: MergeSpec) -> torch.Tensor:
    x, w, s, vote = _reference_votes(tvs, weights, spec)
    if not spec.elect:
        total = float(w.sum())  # mergekit's normalize: true divides by it, unless it is about 0
        return ((w * x).sum(0) / (total if spec.divides and abs(total) >= 1e-8 else 1.0)).to(tvs[0].dtype)
    zero = spec.zero_sign if spec.zero_sign is not None else _majority(int(torch.sign(vote).sum()))
    elected = torch.where(vote > 0, 1.0, torch.where(vote < 0, -1.0, float(zero))).to(torch.float64)
    agree = s == elected  # zeros have sign 0: they never agree, so never count
    den = ((w if spec.weight_before_election else 1.0) * agree).sum(0)
    merged = (w * x * agree).sum(0)
    if spec.divides:
        merged = merged / torch.where(den == 0, 1.0, den)
    return merged.to(tvs[0].dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Task vectors and accumulators: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _native_trims(bufs, base, numel: int, spec: MergeSpec):
    """The chunk's trims for the native pass, found here unless ``spec`` brings them."""
    if spec.trims is not None:
        return _topk.shift(spec.trims, spec.offset)
    if spec.density is None:
        return None
    return _topk.trims(_topk.in_memory(bufs, base), numel, spec)


@merge_op.register("native", dtypes=_DTYPES, limit=_fused_only("native", della=None))
def _merge_native(tvs, weights, spec: MergeSpec, base=None, out=None):
    if out is None:
        like = tvs[0] if base is None else base
        out = _memory.empty(like.shape, like.dtype)
    bufs = [native_buffer(_checks.as_rows(t)) for t in tvs]
    base_buf = None if base is None else native_buffer(_checks.as_rows(base))
    spec = replace(spec, trims=_native_trims(bufs, base_buf, out.numel(), spec))
    if spec.rescale and spec.scales is None:
        spec = replace(spec, scales=l1_scales([native_module().kept_l1(bufs, base_buf, spec.trims,
                                                                        _dare_args(spec, len(bufs)), spec.offset)]))
    if spec.zero_sign is None:  # the paper's majority: a counting pass first
        spec = replace(spec, zero_sign=_majority(_native_pass(bufs, base_buf, None, weights, spec)[1]))
    bad, _ = _native_pass(bufs, base_buf, native_buffer(_checks.as_rows(out)), weights, spec)
    _checks.raise_nonfinite(bad, "task_vectors")
    return out


def _native_pass(bufs, base_buf, out_buf, weights, spec: MergeSpec):
    """One native merge pass; ``spec.trims`` already chunk-relative. Returns (positions with a
    NaN/Inf input, sum of the elected signs); ``out_buf`` None: count only."""
    return native_module().merge(bufs, base_buf, out_buf, weights, spec.trims, _dare_args(spec, len(bufs)), spec.elect,
                                 SIGN_RULES.index(spec.sign), spec.weight_before_election,
                                 1 if spec.zero_sign is None else spec.zero_sign, spec.lam, scales=spec.scales,
                                 normalize=spec.divides)


def _dare_args(spec: MergeSpec, tasks: int):
    """(seed, stream, keep_below per task, divisor of the survivors per task, index offset) for
    the fast kernels, or None."""
    if spec.dare is None:
        return None
    divisors = [_at(spec.dare, t) if spec.divides_survivors else 1.0 for t in range(tasks)]
    return spec.seed, spec.stream, [_keep_below(spec, t) for t in range(tasks)], divisors, spec.offset


@merge_op.register("triton", dtypes=_DTYPES)
def _merge_triton(tvs, weights, spec: MergeSpec, base=None, out=None):
    from .kernels import merging as kernels

    return kernels.fused_merge(tvs, weights, spec, base, out)


def _cuda_limit(tvs, weights, spec, *_):
    why = _fused_only("cuda", density=None, elect=True, semantics="peft", dare=None, trims=None, della=None)(
        tvs, weights, spec)
    limit = native_module().cuda_max_tasks
    return why or (None if len(tvs) <= limit else f"cuda takes at most {limit} task vectors, got {len(tvs)}")


@merge_op.register("cuda", dtypes=_DTYPES, limit=_cuda_limit)
@_unfused_base
def _merge_cuda(tvs, weights, spec: MergeSpec):
    rows = [_checks.as_rows(t) for t in tvs]
    out = torch.empty_like(tvs[0], memory_format=torch.contiguous_format)
    out_rows = _checks.as_rows(out)
    nonfinite = torch.zeros(1, dtype=torch.int64, device=out.device)
    native_module().cuda_disjoint_merge(
        [(r.data_ptr(), r.stride(0)) for r in rows], out_rows.data_ptr(), out_rows.stride(0),
        out_rows.shape[0], out_rows.shape[1], _DTYPES.index(out.dtype), weights,
        SIGN_RULES.index(spec.sign), nonfinite.data_ptr(), torch.cuda.current_stream(out.device).cuda_stream)
    _checks.raise_nonfinite(int(nonfinite.item()), "task_vectors")
    return out


def _run(name: str, task_vectors, weights, spec: MergeSpec, backend: str) -> torch.Tensor:
    tvs = _checks.tensor_list(task_vectors, "task_vectors")
    weights = _checks.weight_list(weights, len(tvs))
    check_tasks(spec, len(tvs))
    if tvs[0].numel() == 0:
        return torch.empty_like(tvs[0], memory_format=torch.contiguous_format)
    tvs = [t.detach() for t in tvs]
    return merge_op(backend, tvs[0].device, tvs[0].dtype, tvs, weights, spec, name=name)


_MERGEKIT = r"""
    density, gamma, epsilon : float, or T floats
        One fraction for every task, or one per task (mergekit's per-model parameters).
    semantics : str
        "peft", "mergekit" or "paper" (see :func:`ties`).
    normalize : bool, optional
        Elections divide the agreeing sum by its count or weight, unless False (mergekit's
        normalize: false, a sum); sums divide by the weights' sum only if True (1 where it is
        about 0). None: the method's default for ``semantics`` (mergekit's own under "mergekit":
        False for dare_ties and breadcrumbs_ties).
    rescale : bool, optional
        Only with semantics="mergekit": each task's kept values times
        :math:`\|\tau_t\|_1 / \|\text{kept } \tau_t\|_1` over the whole tensor (1 where either is
        below 1e-7). None: mergekit's default, True for the dare and della methods."""
_COMMON = """
    task_vectors : sequence of T tensors of one shape, dtype and device, or one tensor [T, ...]
        Task vectors tau_t = theta_t - theta_0.
    weights : T floats, optional
        Per-task weights w_t (None: all ones).
    backend : str
        "auto", "reference", "native", "triton" or "cuda".

    Returns
    -------
    Tensor of the task vectors' shape, dtype and device. float32, bf16 and fp16 accumulate in
    float32, float64 in float64. NaN or Inf in the inputs raises ValueError (counted in element
    positions during the pass itself, not by an extra pass)."""


def _fractions(value, name: str):
    """A fraction in [0, 1] for all tasks, or a sequence (or 1-D tensor) of one per task, as a tuple."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not value:
            raise ValueError(f"{name}: expected a fraction, or one per task, got an empty sequence")
        return tuple(_checks.fraction(v, f"{name}[{i}]") for i, v in enumerate(value))
    return _checks.fraction(value, name)


def check_tasks(spec: MergeSpec, tasks: int) -> None:
    """The per-task parameters of ``spec`` are given for ``tasks`` tasks (or once for all)."""
    for name, value in (("density", spec.density), ("density", spec.dare), ("gamma", spec.gamma),
                        *zip(("density", "epsilon"), spec.della or ())):
        if isinstance(value, tuple) and len(value) != tasks:
            raise ValueError(f"{name}: expected one value for all tasks or one per task ({tasks}), got {len(value)}")


def method_spec(method: str, *, density=None, sign: str = "sum", semantics: str = "peft", seed=None,
                gamma=None, epsilon=None, normalize=None, rescale=None, tasks: int | None = None) -> MergeSpec:
    """The fused-pass configuration of a named method (see the function of the same name).
    ``density``, ``gamma`` and ``epsilon`` are one fraction, or one per task (``tasks`` of them,
    when given). ``normalize`` (None: the method's default for ``semantics``; see MergeSpec) and
    ``rescale`` (only with semantics="mergekit"; None: mergekit's default, True for the dare and
    della methods) follow mergekit's keys of those names."""
    _checks.choice(method, "method", METHODS)
    if method.startswith("breadcrumbs"):
        gamma = _fractions(0.01 if gamma is None else gamma, "gamma")
    elif gamma is not None:
        raise ValueError(f"gamma: only the breadcrumbs methods drop the largest magnitudes, not {method!r}")
    _checks.choice(sign, "sign", SIGN_RULES)
    _checks.choice(semantics, "semantics", SEMANTICS)
    if method != "task_arithmetic" and density is None:
        raise ValueError(f"density: method {method!r} needs a density in [0, 1]")
    if epsilon is not None and not method.startswith("della"):
        raise ValueError(f"epsilon: only the della methods spread keep probabilities, not {method!r}")
    if method.startswith(("dare", "della")) and seed is None:
        raise ValueError(f"seed: method {method!r} needs an integer seed for its random masks")
    for flag, name in ((normalize, "normalize"), (rescale, "rescale")):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name}: expected True, False or None, got {type(flag).__name__} {flag!r}")
    mergekit = semantics == "mergekit"
    if rescale is not None and not mergekit:
        raise ValueError(f"rescale: mergekit's rescale to the L1 norm needs semantics='mergekit', got "
                         f"semantics={semantics!r} (PEFT's and the papers' DARE and DELLA divide survivors by their "
                         "keep probability instead)")
    if normalize is None and mergekit and method in ("dare_ties", "breadcrumbs_ties"):
        normalize = False  # mergekit's default for these two: the sum of the agreeing entries
    common = dict(sign=sign, normalize=normalize, seed=0 if seed is None else _checks.seed(seed),
                  rescale=method != "task_arithmetic" and (method.startswith(("dare", "della"))
                                                           if rescale is None else rescale) and mergekit)
    # DARE and DELLA follow PEFT (the papers' rescale) unless asked for mergekit's semantics.
    random = dict(semantics="mergekit" if mergekit else "peft", elect=method in ("dare_ties", "della"), **common)
    if method.startswith("della"):
        density = _fractions(density, "density")
        epsilon = None if epsilon is None else _fractions(epsilon, "epsilon")
        spec = MergeSpec(None, della=(density, epsilon), **random)
        check_tasks(spec, spec.tasks or 1)
        if mergekit:  # its della_magprune keeps every entry at density 1 and none at 0, whatever epsilon
            edges = [0.0 if _at(density, t) in (0.0, 1.0) else _at(epsilon, t) for t in range(spec.tasks or 1)]
            epsilon = edges[0] if spec.tasks is None else tuple(edges)
            spec = replace(spec, della=(density, epsilon))
        for t in range(spec.tasks or 1):
            d, e = _at(density, t), _at(epsilon, t)
            if mergekit and d == 0:
                continue
            if e is None or not e < d or d + e > 1:
                raise ValueError(f"epsilon: method {method!r} needs 0 <= epsilon < density and density + epsilon "
                                 f"<= 1 (keep probabilities density -/+ epsilon), got epsilon={e!r}, density={d}")
    elif method.startswith("dare"):
        spec = MergeSpec(None, dare=_fractions(density, "density"), **random)
    elif method == "task_arithmetic":
        spec = MergeSpec(None, False, normalize=normalize)
    else:
        spec = MergeSpec(_fractions(density, "density"), method in ("ties", "breadcrumbs_ties"), semantics=semantics,
                         zero_sign=None if semantics == "paper" else 1, gamma=gamma, **common)
    check_tasks(spec, tasks or spec.tasks or 1)
    return spec


def task_arithmetic(task_vectors, *, weights=None, normalize=None, backend: str = "auto") -> torch.Tensor:
    r"""Task arithmetic (Ilharco et al., ICLR 2023): :math:`\sum_t w_t \tau_t` (``normalize=True``:
    divided by :math:`\sum_t w_t`, as mergekit's normalize)."""
    return _run("task_arithmetic", task_vectors, weights, method_spec("task_arithmetic", normalize=normalize), backend)


def magnitude_prune(task_vectors, *, density, weights=None, semantics: str = "peft", normalize=None, rescale=None,
                    backend: str = "auto") -> torch.Tensor:
    r"""Keep each task vector's top ``int(density * numel)`` magnitudes, then
    :math:`\sum_t w_t \operatorname{trim}(\tau_t)` (PEFT's ``magnitude_prune``)."""
    spec = method_spec("magnitude_prune", density=density, semantics=semantics, normalize=normalize, rescale=rescale)
    return _run("magnitude_prune", task_vectors, weights, spec, backend)


def ties(task_vectors, *, density, weights=None, sign: str = "sum", semantics: str = "peft", normalize=None,
         rescale=None, backend: str = "auto") -> torch.Tensor:
    r"""TIES-Merging (Yadav et al., NeurIPS 2023, eq. 1-3) of already-subtracted task vectors.

    Trim each :math:`\tau_t` to its top ``k = int(density * numel)`` magnitudes (ties at the
    threshold: lowest flat index first), elect a sign per entry, and average the entries that
    agree with it; zeros never vote nor count, and a vote of exactly zero elects +1.

    ``sign="sum"`` elects the sign of the summed values (the paper's mass rule), ``"count"``
    that of the summed signs (majority). ``semantics`` picks the anchor to reproduce:

    - ``"peft"`` (PEFT 0.21 ``ties``): the vote uses the unweighted trimmed values; weights
      multiply afterwards; the mean divides by the count of agreeing entries.
    - ``"mergekit"`` (mergekit 0.1.5 ``ties``, normalize=True): the vote uses
      :math:`w_t \tau_t` (a negative weight flips a task's votes); the mean divides by the sum
      of the agreeing weights (1 where that is 0); the trim keeps at least one entry when
      ``density > 0``. With weights of mixed sign that sum can nearly cancel; the mean is then
      ill-conditioned and a float32 input loses digits in proportion (as in mergekit).
    - ``"paper"`` (the TIES authors' code, ``topk_values_mask`` + ``resolve_sign`` +
      ``disjoint_merge``): the trim keeps every :math:`|\tau| \ge` the
      ``(int(density * numel) + 1)``-th largest magnitude, ties included (so at least one
      more entry than the others); a vote of exactly zero elects the sign of the sum of all
      elected signs of the input (over the whole model with ``merge(scope="global")``, as
      the paper runs it), and the negative side where that sum is zero too. Weights as PEFT
      (the paper has none).

    With all weights equal to 1 and no ties at the threshold, "peft" and "mergekit" agree.
    """
    spec = method_spec("ties", density=density, sign=sign, semantics=semantics, normalize=normalize, rescale=rescale)
    return _run("ties", task_vectors, weights, spec, backend)


def dare_linear(task_vectors, *, density, seed: int, weights=None, name: str = "", semantics: str = "peft",
                normalize=None, rescale=None, backend: str = "auto") -> torch.Tensor:
    r"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024) then task arithmetic:
    drop each entry with probability ``1 - density``, divide survivors by ``density`` (PEFT's
    rescale; ``semantics="mergekit"``: keep them, times :math:`\|\tau_t\|_1 / \|\text{kept}\|_1`
    over the tensor with ``rescale``, mergekit's default), and return
    :math:`\sum_t w_t \tilde\tau_t`.

    The masks come from Philox4x32-10 keyed by (``seed``, FNV-1a of ``name``, task index,
    flat element index): identical on every backend and thread count, never materialized.
    Give each tensor of a model its ``name`` so that tensors get independent masks."""
    spec = method_spec("dare_linear", density=density, seed=seed, semantics=semantics, normalize=normalize,
                       rescale=rescale)
    return _run("dare_linear", task_vectors, weights, replace(spec, stream=_fnv1a32(_checks.name(name))), backend)


def dare_ties(task_vectors, *, density, seed: int, weights=None, sign: str = "sum", name: str = "",
              semantics: str = "peft", normalize=None, rescale=None, backend: str = "auto") -> torch.Tensor:
    """DARE's random drop and rescale (see :func:`dare_linear`), then the TIES election and
    disjoint mean in the given ``semantics`` (see :func:`ties`; "mergekit": its dare_ties, whose
    default normalize=False sums the agreeing entries), in one pass."""
    spec = method_spec("dare_ties", density=density, sign=sign, seed=seed, semantics=semantics, normalize=normalize,
                       rescale=rescale)
    return _run("dare_ties", task_vectors, weights, replace(spec, stream=_fnv1a32(_checks.name(name))), backend)


def breadcrumbs(task_vectors, *, density, gamma=0.01, weights=None, semantics: str = "peft", normalize=None,
                rescale=None, backend: str = "auto") -> torch.Tensor:
    r"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, sec. 3): drop each task vector's
    largest ``int(gamma * numel)`` magnitudes (outliers) and keep the next
    ``int(density * numel)``, dropping the small rest, then :math:`\sum_t w_t \tilde\tau_t`.
    As mergekit 0.1.5 ``breadcrumbs`` (``magnitude_outliers``): fewer outliers are dropped
    where the kept entries would otherwise run out; ties at either threshold are kept lowest
    flat index first (mergekit: its sort's order)."""
    spec = method_spec("breadcrumbs", density=density, gamma=gamma, semantics=semantics, normalize=normalize,
                       rescale=rescale)
    return _run("breadcrumbs", task_vectors, weights, spec, backend)


def breadcrumbs_ties(task_vectors, *, density, gamma=0.01, weights=None, sign: str = "sum",
                     semantics: str = "peft", normalize=None, rescale=None, backend: str = "auto") -> torch.Tensor:
    """The breadcrumbs trim (see :func:`breadcrumbs`), then the TIES election and disjoint mean
    of :func:`ties` in the given ``semantics`` ("mergekit": its ``breadcrumbs_ties``, whose
    default normalize=False sums the agreeing entries; normalize=True divides by their weight)."""
    spec = method_spec("breadcrumbs_ties", density=density, gamma=gamma, sign=sign, semantics=semantics,
                       normalize=normalize, rescale=rescale)
    return _run("breadcrumbs_ties", task_vectors, weights, spec, backend)


def della(task_vectors, *, density, epsilon, seed: int, weights=None, sign: str = "sum", name: str = "",
          semantics: str = "peft", normalize=None, rescale=None, backend: str = "auto") -> torch.Tensor:
    r"""DELLA-Merging (Deep et al., 2024): MagPrune then the TIES election and disjoint mean of
    :func:`ties`. MagPrune keeps each entry with a probability that grows linearly with its
    magnitude rank within its row, from ``density - epsilon`` (smallest) to
    ``density + epsilon`` (largest), as mergekit's ``della_magprune`` ranks (ties: lower index
    ranks lower; rows along dimension 1 under "mergekit", the last otherwise), and divides
    survivors by their probability (the paper's rescale; ``semantics="mergekit"``: keeps them,
    rescaled to the L1 norm with ``rescale``, mergekit's default). Draws as :func:`dare_linear`
    (``seed``, ``name``). Runs on the reference and Triton backends (the ranks need a sort per
    row: Triton's path ranks with torch on the device, holding T keep probabilities in float64)."""
    spec = method_spec("della", density=density, epsilon=epsilon, sign=sign, seed=seed, semantics=semantics,
                       normalize=normalize, rescale=rescale)
    return _run("della", task_vectors, weights, replace(spec, stream=_fnv1a32(_checks.name(name))), backend)


def della_linear(task_vectors, *, density, epsilon, seed: int, weights=None, name: str = "", semantics: str = "peft",
                 normalize=None, rescale=None, backend: str = "auto") -> torch.Tensor:
    """DELLA's MagPrune (see :func:`della`), then the weighted sum :math:`\\sum_t w_t \\tilde\\tau_t`."""
    spec = method_spec("della_linear", density=density, epsilon=epsilon, seed=seed, semantics=semantics,
                       normalize=normalize, rescale=rescale)
    return _run("della_linear", task_vectors, weights, replace(spec, stream=_fnv1a32(_checks.name(name))), backend)


def disjoint_merge(task_vectors, *, sign: str = "sum", weights=None, backend: str = "auto") -> torch.Tensor:
    r"""TIES sign election and disjoint mean over already-trimmed task vectors (PEFT's
    ``calculate_majority_sign_mask`` + ``disjoint_merge``), i.e. :func:`ties` without the trim:
    :math:`\gamma = \operatorname{sgn}(\sum_t \tau_t)`,
    :math:`\tau = \sum_{t \in A} w_t \tau_t / |A|` with :math:`A = \{t : \operatorname{sgn}(\tau_t) = \gamma\}`.
    Exact zeros are trimmed entries. See :func:`ties` for ``sign``; weights apply after the
    election."""
    spec = MergeSpec(density=None, elect=True, sign=_checks.choice(sign, "sign", SIGN_RULES))
    return _run("disjoint_merge", task_vectors, weights, spec, backend)


for _fn in (task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
            della_linear, disjoint_merge):
    _fn.__doc__ = (_fn.__doc__ or "").rstrip() + "\n\n    Parameters\n    ----------" + (
        _MERGEKIT if _fn is not disjoint_merge else "") + _COMMON


fisher_op = Op("fisher_average", order=("native", "reference"))


@fisher_op.register("reference", dtypes=_DTYPES)
def _fisher_reference(models, fishers, weights, eps: float) -> torch.Tensor:
    theta = torch.stack([m.to(torch.float64) for m in models])
    fisher = torch.stack([f.to(torch.float64) for f in fishers])
    _checks.raise_nonfinite(int((~(torch.isfinite(theta) & torch.isfinite(fisher))).any(0).sum()), "models/fishers")
    _raise_negative(int((fisher < 0).any(0).sum()))
    w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float64, device=theta.device)
    wf = w.view(-1, *([1] * (theta.dim() - 1))) * fisher.clamp(min=eps)
    return ((wf * theta).sum(0) / wf.sum(0)).to(models[0].dtype)


@fisher_op.register("native", dtypes=_DTYPES)
def _fisher_native(models, fishers, weights, eps: float) -> torch.Tensor:
    out = _memory.empty(models[0].shape, models[0].dtype)
    bad, negative = native_module().fisher_average(
        [native_buffer(_checks.as_rows(m)) for m in models], [native_buffer(_checks.as_rows(f)) for f in fishers],
        native_buffer(_checks.as_rows(out)), weights, eps)
    _checks.raise_nonfinite(bad, "models/fishers")
    _raise_negative(negative)
    return out


def _raise_negative(count: int) -> None:
    if count:
        raise ValueError(f"fishers: {count} positions hold a negative value; a Fisher information (e.g. mean "
                         "squared gradients) is never negative")


def fisher_average(models, fishers, *, weights=None, eps: float = 1e-6, backend: str = "auto"):
    r"""Fisher merging (Matena & Raffel, NeurIPS 2022, eq. 3):
    :math:`\theta^* = \sum_t w_t F_t \theta_t / \sum_t w_t F_t`, per entry, with the diagonal
    Fishers floored at ``eps`` (as the authors' ``fisher_floor``) so that entries no model is
    informed about get the weighted mean instead of 0/0.

    ``models`` and ``fishers``: T tensors each (one shape, dtype and device), or T state dicts;
    with dicts, every floating-point tensor of the first model is merged (a tensor without
    Fishers is averaged with weights ``w_t``) and the others are copied from ``models[0]``.
    ``weights``: T positive floats (None: all ones). float32/bf16/fp16 accumulate in float32.
    NaN/Inf in either input and negative Fishers raise ValueError.
    """
    if not isinstance(eps, (int, float)) or not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps: expected a positive finite Fisher floor, got {eps!r}")
    if isinstance(models, Sequence) and models and isinstance(models[0], Mapping):
        if not isinstance(fishers, Sequence) or len(fishers) != len(models):
            raise ValueError(f"fishers: expected {len(models)} state dicts, one per model")
        layout = lambda sd: {name: (tuple(t.shape), t.dtype) for name, t in sd.items()}
        _check_compatible(layout(models[0]), [layout(m) for m in models[1:]], [f"models[{i + 1}]" for i in range(len(models) - 1)])
        out = {}
        for name, first in models[0].items():
            if first.dtype not in _DTYPES:
                out[name] = first.clone()
                continue
            ts = [m[name] for m in models]
            fs = [f[name] for f in fishers] if all(name in f for f in fishers) else [torch.ones_like(first)] * len(ts)
            out[name] = fisher_average(ts, fs, weights=weights, eps=eps, backend=backend)
        return out
    models = [t.detach() for t in _checks.tensor_list(models, "models")]
    fishers = [t.detach() for t in _checks.tensor_list(fishers, "fishers")]
    if len(fishers) != len(models) or fishers[0].shape != models[0].shape or fishers[0].dtype != models[0].dtype \
            or fishers[0].device != models[0].device:
        raise ValueError(f"fishers: expected {len(models)} tensors of the models' shape {tuple(models[0].shape)}, "
                         f"dtype and device, got {len(fishers)} of {tuple(fishers[0].shape)} {fishers[0].dtype} "
                         f"on {fishers[0].device}")
    weights = _checks.weight_list(weights, len(models))
    if weights is not None and min(weights) <= 0:
        raise ValueError(f"weights: Fisher merging needs positive weights, got {weights}")
    if models[0].numel() == 0:
        return torch.empty_like(models[0], memory_format=torch.contiguous_format)
    return fisher_op(backend, models[0].device, models[0].dtype, models, fishers, weights, float(eps),
                     name="fisher_average")


def _check_compatible(base: dict, models: list[dict], labels: list[str]) -> None:
    """Every model has the base's tensor names, shapes and dtypes; ``base`` and ``models``
    map names to (shape, dtype), ``labels`` name the models in the names error."""
    for label, m in zip(labels, models):
        missing, extra = sorted(set(base) - set(m)), sorted(set(m) - set(base))
        if missing or extra:
            raise ValueError(f"{label}: tensor names differ from the base (missing {missing[:3]}, extra {extra[:3]})")
    for name, ref in base.items():
        for i, m in enumerate(models):
            if tuple(m[name]) != tuple(ref):
                raise ValueError(f"models[{i}]: tensor {name!r} is {tuple(m[name][0])} {m[name][1]}, "
                                 f"but the base has {tuple(ref[0])} {ref[1]}")


# The model level (merging_models.py), importable from here as well. Resolved on first use
# (PEP 562): merging_models imports this module, and either must import first now that the
# package's __init__ imports neither.
_MODEL_LEVEL = ("SCOPES", "merge", "merge_files")


def __getattr__(name: str):
    if name not in _MODEL_LEVEL:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import merging_models

    return getattr(merging_models, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODEL_LEVEL))
