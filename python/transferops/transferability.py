"""Transferability: LogME and the model-selection scores, for many candidate models at once.

Every score takes the target task's labels and, per candidate model, what that model gives on
the target inputs (features, or source-class probabilities), and returns float64 scores: a
0-d tensor for one model, [M] for several (higher is better for every score).

LogME (You et al., ICML 2021) is the log marginal evidence of Bayesian linear regression from
the features to the one-hot labels (or regression targets), maximized over the prior and
noise precisions; its equations and both backends' solvers are in :mod:`transferops._logme`.
The other scores follow their papers, cited in each docstring.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _checks, _dist
from ._backend import BackendUnavailable, forced_backend
from ._logme import add_rows, logme_from_grams, logme_op

COMPAT = ("corrected", "official")


# ---- inputs ----------------------------------------------------------------------------------


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Labels follow the features to their device (the convention of every score here, as of
    transferops.ot); features never move. A no-op where they are there already."""
    return t if t.device == device else t.to(device)


def _feature_list(features, name: str = "features", *, min_samples: int = 2,
                  along: tuple[str, torch.device] | None = None) -> tuple[list[torch.Tensor], bool]:
    """Per-model [N, D_m] tensors, and whether the caller gave several models (a batch [M, N, D]
    or a list). Every model must see the same N samples, on one device: the first model's, or
    ``along`` = (the name of another argument, its device)."""
    if isinstance(features, (list, tuple)):
        if not features:
            raise ValueError(f"{name}: expected at least one model's features, got an empty list")
        feats, many = [_as_tensor(f, f"{name}[{i}]") for i, f in enumerate(features)], True
    else:
        f = _as_tensor(features, name)
        if f.dim() not in (2, 3):
            raise ValueError(f"{name}: expected [N, D], [M, N, D] or a list of [N, D_m], got shape {tuple(f.shape)}")
        feats, many = (list(f.unbind(0)) if f.dim() == 3 else [f]), f.dim() == 3
    other, device = along or (f"{name}[0]", feats[0].device)
    for i, f in enumerate(feats):
        what = f"{name}[{i}]" if many else name
        if f.dim() != 2:
            raise ValueError(f"{what}: expected a 2-D [N, D] tensor, got shape {tuple(f.shape)}")
        if not (f.is_floating_point() or f.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{what}: expected a float dtype, got {f.dtype}")
        if f.shape[0] != feats[0].shape[0]:
            raise ValueError(f"{what}: {f.shape[0]} samples, but {name}[0] has {feats[0].shape[0]}")
        if f.device != device:
            raise ValueError(f"{what}: on {f.device}, expected {device} as {other} (one device for all)")
        if f.shape[0] < min_samples or f.shape[1] < 1:
            raise ValueError(f"{what}: expected at least {min_samples} sample{'s' if min_samples > 1 else ''} and 1 "
                             f"feature, got shape {tuple(f.shape)}")
        bad = _checks.count_nonfinite(f) if f.is_floating_point() else 0
        if bad:
            raise ValueError(f"{what}: expected finite features, found NaN or Inf in {bad} entries")
    return feats, many


def _class_labels(labels, N: int, name: str = "labels", *,
                  min_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, y): the distinct class ids, sorted (int64), and each sample's index among them [N],
    0..C-1 (int64, on the labels' device). Only which samples share an id matters, so any
    distinct integers name the classes (negative, or 10**12: a class costs the same whatever
    its id), and an id that no sample has is not a class. Labels: a tensor, array or sequence of
    any integer or bool dtype, or floats holding integers; at least ``min_classes`` must occur."""
    try:
        y = labels.detach() if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. strings, objects, ints past int64
        raise TypeError(f"{name}: expected integer class ids, got {type(labels).__name__} ({e})") from None
    y = y.reshape(-1)
    if y.numel() != N:
        raise ValueError(f"{name}: expected {N} labels (one per sample), got {y.numel()}")
    if y.is_complex():
        raise TypeError(f"{name}: expected integer class ids, got {y.dtype}")
    if y.is_floating_point():
        bad = ~(torch.isfinite(y) & (y == y.round()) & (y >= -2.0**63) & (y < 2.0**63))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}: expected integer class ids, got {float(y[i])} at index {i}")
    ids, y = torch.unique(y.long(), return_inverse=True)  # uint64 wraps, a bijection: ids stay distinct
    if ids.numel() < min_classes:
        raise ValueError(f"{name}: expected at least two classes, got only class {int(ids[0])}")
    return ids, y


def _targets(labels, N: int, regression: bool, name: str = "labels", *,
             min_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float64 targets [N, K] (one-hot class indicators, or the regression targets) and the
    class indices behind them, 0..C-1 (None for regression); see :func:`_class_labels`."""
    if not regression:
        ids, y = _class_labels(labels, N, name, min_classes=min_classes)
        return torch.nn.functional.one_hot(y, ids.numel()).double(), y
    y = _as_tensor(labels, name)
    if not y.is_floating_point():
        y = y.double()
    y = y.double().reshape(N, -1) if y.dim() == 1 or y.shape[0] == N else None
    if y is None or y.shape[0] != N:
        raise ValueError(f"{name}: expected regression targets [N] or [N, K] with N = {N}, got shape "
                         f"{tuple(_as_tensor(labels, name).shape)}")
    bad = _checks.count_nonfinite(y)
    if bad:
        raise ValueError(f"{name}: expected finite regression targets, found NaN or Inf in {bad} entries")
    return y, None


# ---- LogME -----------------------------------------------------------------------------------


class LogMEStream:
    """LogME over features that arrive in chunks of rows, so N is not bounded by memory: keeps
    per model the float64 Gram matrix F^T F, F^T Y and |y|^2 (O(D^2 + DK) memory) on the device
    of the features fed to it, and finishes on the backend :func:`logme` would choose there:
    on the CPU the native one (the Gram matrix added to by BLAS syrk), on CUDA the triton one
    (the Gram matrix added to by a GEMM on the GPU, every model's fixed point in one kernel).
    Scores equal ``logme(all_features, all_labels)`` up to float64 rounding.

    >>> stream = LogMEStream()
    >>> for feats, labels in loader:      # feats [n, D] (or a list, one per model)
    ...     stream.update(feats, labels)
    >>> stream.score()

    ``compat="official"`` needs N > D in the end (the official code takes another route when
    N <= D, through F F^T, which does not stream). Classes are the distinct ids over all chunks.
    ``backend`` as :func:`logme`'s, chosen at the first update for its features' device; every
    later chunk must come on that device (labels are moved there).

    ``group``: a torch.distributed process group (None: this process alone). Each rank feeds its
    own rows (any number, none included: a rank may never call update) of the same models, and
    :meth:`score` sums every rank's statistics, one all-reduce of the Gram matrices' lower
    triangles, F^T Y and |y|^2 (the classes united over the ranks, in id order), so the scores
    are those of all the rows in one process, to float64 rounding.
    """

    def __init__(self, *, regression: bool = False, compat: str = "corrected", backend: str = "auto", group=None):
        if compat not in COMPAT:
            raise ValueError(f"compat: expected one of {list(COMPAT)}, got {compat!r}")
        forced_backend(backend)  # a name that is no backend fails here, not at the first update
        self.regression, self.compat, self.backend = regression, compat, backend
        self.group = _dist.group_of(group)
        self.samples, self.many, self.chosen, self.device = 0, None, None, None
        self.grams: list[torch.Tensor] = []  # per model (native: the lower triangle, column ordered)
        self.projected: list[torch.Tensor] = []  # per model, F^T Y [D_m, K]
        self.y2 = self.classes = None  # |y|^2 per target column; the class id of each column

    def update(self, features, labels) -> "LogMEStream":
        """Add rows: ``features`` [n, D] or a list of [n, D_m] (the same models every time),
        ``labels`` their n class ids (or regression targets [n] / [n, K])."""
        feats, many = _feature_list(features, min_samples=1,
                                    along=None if self.device is None else ("the first update's features", self.device))
        n, device = feats[0].shape[0], feats[0].device
        if self.many is None:
            self.chosen, _ = logme_op.select(self.backend, device, torch.float64, name="LogMEStream")
            self.many, self.device = many, device
            f64 = dict(dtype=torch.float64, device=device)
            self.grams = [torch.zeros(f.shape[1], f.shape[1], **f64) for f in feats]
            self.projected = [torch.zeros(f.shape[1], 0, **f64) for f in feats]
            self.y2, self.classes = torch.zeros(0, **f64), torch.zeros(0, dtype=torch.int64, device=device)
        widths = [g.shape[0] for g in self.grams]
        if [f.shape[1] for f in feats] != widths:
            raise ValueError(f"features: expected models of widths {widths} as in the first update, got "
                             f"{[f.shape[1] for f in feats]}")
        Y, classes = _targets(labels, n, True) if self.regression else self._class_targets(labels, n)
        Y = _on_device(Y, device)
        if self.regression and self.y2.numel() and Y.shape[1] != self.y2.numel():
            raise ValueError(f"labels: expected {self.y2.numel()} regression targets per row as before, got "
                             f"{Y.shape[1]}")
        K = max(Y.shape[1], self.y2.numel())
        Y = torch.nn.functional.pad(Y, (0, K - Y.shape[1]))
        self.y2 = torch.nn.functional.pad(self.y2, (0, K - self.y2.numel())) + (Y * Y).sum(0)
        for i, f in enumerate(feats):
            self.grams[i], B = add_rows(self.grams[i], f, Y, classes, self.chosen == "native")
            self.projected[i] = torch.nn.functional.pad(self.projected[i], (0, K - self.projected[i].shape[1])) + B
        self.samples += n
        return self

    def _class_targets(self, labels, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One-hot targets of a chunk's labels, and their columns: a class keeps the column it got
        in the update where it first occurred (score() takes them in id order)."""
        ids, y = (_on_device(t, self.device) for t in _class_labels(labels, n, min_classes=1))
        self.classes = torch.cat([self.classes, ids[~torch.isin(ids, self.classes)]])
        by_id = torch.argsort(self.classes)
        columns = by_id[torch.searchsorted(self.classes[by_id], ids)][y]
        return torch.nn.functional.one_hot(columns, self.classes.numel()).double(), columns

    def score(self, *, return_params: bool = False):
        """The scores so far, as :func:`logme` returns them (the stream can go on after). With a
        ``group``, over every rank's rows: collective, every rank calls it and gets the same
        scores; each model is solved on one rank (split by D^3) and its result shared."""
        world = _dist.world(self.group)
        if world > 1:
            from .transferability_dist import stream_totals

            samples, many, chosen, grams, projections, y2 = stream_totals(self)
        else:
            by_id = slice(None) if self.regression or self.classes is None else torch.argsort(self.classes)
            samples, many, chosen, grams = self.samples, self.many, self.chosen, self.grams
            projections = [B[:, by_id] for B in self.projected]  # the classes as logme() orders them
            y2 = None if self.y2 is None else self.y2[by_id]
        if samples < 2:
            raise ValueError(f"LogMEStream: expected at least 2 samples, got {samples}")
        if not self.regression and int((y2 > 0).sum()) < 2:
            raise ValueError("labels: expected at least two classes over all updates")
        for H in grams:
            if self.compat == "official" and samples <= H.shape[0]:
                raise ValueError(f"compat='official' streams only when N > D (N = {samples}, D = {H.shape[0]}); "
                                 "use compat='corrected' or logme() on the whole features")
        if world > 1:
            from .transferability_dist import owned, shared_solutions

            mine = owned([H.shape[0] ** 3 for H in grams], self.group)
            solved = _dist.agreed(self.group, lambda: logme_from_grams(  # a solver's failure stops every rank
                chosen, [grams[i] for i in mine], [projections[i] for i in mine], y2, samples, self.compat,
                return_params) if mine else (None, []))
            scores, params = shared_solutions(mine, *solved, len(grams), return_params, grams[0].device, self.group)
        else:
            scores, params = logme_from_grams(chosen, grams, projections, y2, samples, self.compat, return_params)
        scores = scores if many else scores[0]
        if return_params:
            return scores, (params if many else params[0])
        return scores


def logme(features, labels, *, regression: bool = False, compat: str = "corrected", return_params: bool = False,
          backend: str = "auto"):
    """LogME scores of candidate models for a labeled target task (higher is better).

    Parameters
    ----------
    features : [N, D] tensor (one model), [M, N, D] tensor or a list of [N, D_m] tensors (one per
        model), any float dtype (computed in float64), or numpy arrays.
    labels : class ids [N] (any distinct integers, see below), or with ``regression=True`` real
        targets [N] or [N, K].
    compat : "corrected" (default) or "official". "official" reproduces thuml/LogME's
        ``LogME.fit`` (the fixed-point solver) to float64 rounding, including its defect for
        rank k < D (always when N < D, upstream issue #23): its log-determinant sums log(alpha +
        beta sigma_i) over the k nonzero eigenvalues only, dropping (D - k) log(alpha), which
        inflates scores (8.96 instead of 0.87 on the N=200, D=512 golden case). With N > D the
        official code keeps null directions (dead units, zero or duplicated columns): their
        rounding-level singular values clear its 1e-10 cut, so its scores equal the corrected
        ones unless the features are of scale ~1e-5 or less. "corrected" keeps the (D - k)
        term, and drops singular values below max(N, D) * eps * the largest.
    return_params : also return, per model, a dict of float64 tensors ``alpha`` [K], ``beta``
        [K], ``m`` [K, D] (posterior mean weights) and ``evidence`` [K] (per target: the classes
        in the order of their ids).
    backend : "auto" runs features on the CPU natively and CUDA features with triton (batched
        eigendecompositions and one kernel for every fixed point, on the GPU throughout);
        "reference" runs anywhere. Features must share one device; labels are moved to it.

    The classes are the distinct ids in ``labels``, as in every score here: the official code
    also counts each absent id below the largest (0..max) as a class, with an all-zero target;
    with ids 0..C-1 that all occur, the two agree.

    Returns
    -------
    float64 scores, 0-d for one [N, D] model and [M] otherwise; with ``return_params``,
    (scores, params) where params is one dict, or a list of M dicts.
    """
    if compat not in COMPAT:
        raise ValueError(f"compat: expected one of {list(COMPAT)}, got {compat!r}")
    feats, many = _feature_list(features)
    N = feats[0].shape[0]
    Y, classes = _targets(labels, N, regression)
    Y, classes = _on_device(Y, feats[0].device), (None if classes is None else _on_device(classes, feats[0].device))
    scores, params = logme_op(backend, feats[0].device, torch.float64, feats, Y, classes, compat, return_params,
                              name="logme")
    scores = scores if many else scores[0]
    if return_params:
        return scores, (params if many else params[0])
    return scores


# ---- scores from source-model predictions ------------------------------------------------------


def torch_backend(backend: str, name: str) -> None:
    """The scores other than LogME (and OTCE, whose transport is :func:`transferops.sinkhorn`'s)
    are float64 torch code on the inputs' device: the reference backend. Another one asked for,
    by ``backend=``, use_backend or the environment, raises as any op's missing backend does."""
    forced = forced_backend(backend)
    if forced not in (None, "reference"):
        raise BackendUnavailable(f"{name}: backend {forced!r} cannot run: {name} has no {forced} implementation "
                                 "(it is torch code on any device: 'reference')")


def leep(source_probs, labels, *, backend: str = "auto"):
    """LEEP (Nguyen et al., ICML 2020, eq. 2): with the empirical joint
    P(y, z) = 1/N sum_i theta(x_i)_z [y_i = y] of target labels and source-class probabilities,
    LEEP = 1/N sum_i log sum_z P(y_i | z) theta(x_i)_z.

    ``source_probs``: [N, Z] (one model), [M, N, Z] or a list of [N, Z_m]: each row a
    probability vector (non-negative, summing to 1 within 1e-3). Returns float64 scores, 0-d or
    [M]. A source class no sample gives mass to has no P(y | z) and is skipped."""
    torch_backend(backend, "leep")
    probs, many = _feature_list(source_probs, "source_probs")
    ids, y = _class_labels(labels, probs[0].shape[0])
    y = _on_device(y, probs[0].device)
    scores = []
    for i, p in enumerate(probs):
        p = p.to(torch.float64)
        what = f"source_probs[{i}]" if many else "source_probs"
        if bool((p < 0).any()) or float((p.sum(1) - 1).abs().max()) > 1e-3:
            raise ValueError(f"{what}: expected rows of probabilities (>= 0, summing to 1); apply softmax to logits")
        onehot = torch.nn.functional.one_hot(y, ids.numel()).double()
        joint = onehot.T @ p / p.shape[0]  # [C, Z]
        mass = joint.sum(0)
        cond = torch.where(mass > 0, joint / mass.clamp(min=torch.finfo(torch.float64).tiny), 0.0)  # P(y | z)
        expected = (p @ cond.T).gather(1, y[:, None])[:, 0]
        scores.append(torch.log(expected).mean())
    scores = torch.stack(scores)
    return scores if many else scores[0]


def nce(source_labels, labels, *, backend: str = "auto"):
    """NCE (Tran et al., ICCV 2019, eq. 4): the negative conditional entropy -H(Y | Z) of the
    target labels given the source model's predicted labels, from their empirical joint.

    ``source_labels``: source class ids [N] (e.g. the argmax of the source model's outputs),
    [M, N] or a list of [N]; like ``labels``, any distinct integers. Returns float64 scores,
    0-d or [M]."""
    torch_backend(backend, "nce")
    if isinstance(source_labels, (list, tuple)):
        zs, many = [_as_tensor(z, f"source_labels[{i}]") for i, z in enumerate(source_labels)], True
    else:
        z = _as_tensor(source_labels, "source_labels")
        zs, many = (list(z.unbind(0)) if z.dim() == 2 else [z]), z.dim() == 2
    ids, y = _class_labels(labels, zs[0].numel())
    device = zs[0].device
    y = _on_device(y, device)
    scores = []
    for i, z in enumerate(zs):
        what = f"source_labels[{i}]" if many else "source_labels"
        if z.device != device:
            raise ValueError(f"{what}: on {z.device}, expected {device} as source_labels[0] (one device for all)")
        source_ids, z = _class_labels(z, y.numel(), what, min_classes=1)
        joint = torch.zeros(ids.numel(), source_ids.numel(), dtype=torch.float64, device=device)
        joint.index_put_((y, z), torch.full((z.numel(),), 1.0 / z.numel(), dtype=torch.float64, device=device),
                         accumulate=True)
        pz = joint.sum(0, keepdim=True)
        cond = joint / pz.clamp(min=torch.finfo(torch.float64).tiny)
        scores.append(torch.xlogy(joint, cond).sum())  # sum P(y, z) log P(y | z), 0 log 0 = 0
    scores = torch.stack(scores)
    return scores if many else scores[0]


# ---- scores from features ---------------------------------------------------------------------


def _ledoit_wolf_from(emp: torch.Tensor, fourth: float, N: int) -> tuple[torch.Tensor, float]:
    """Ledoit & Wolf (2004) shrinkage of the empirical covariance ``emp`` = (1/N) Xc^T Xc of N
    centered rows towards mu I, mu its mean eigenvalue, given ``fourth`` = sum_i |Xc_i|^4:
    (covariance, shrinkage in [0, 1]), as scikit-learn's LedoitWolf computes them."""
    D = emp.shape[0]
    mu = float(torch.trace(emp)) / D
    delta_sum = float((emp * emp).sum())
    beta = (fourth / N - delta_sum) / (D * N)
    delta = (delta_sum - 2 * mu * float(torch.trace(emp)) + D * mu * mu) / D
    shrink = 0.0 if beta == 0 else min(beta, delta) / delta
    cov = (1 - shrink) * emp + shrink * mu * torch.eye(D, dtype=emp.dtype, device=emp.device)
    return cov, shrink


def _hscore_trace(cov_f: torch.Tensor, cov_g: torch.Tensor, N: int, noise: float) -> torch.Tensor:
    """tr(cov_f^+ cov_g) of D features over N samples whose rounding alone gives a direction the
    variance ``noise`` (see _noise_variance). The pseudo-inverse drops eigenvalues of cov_f
    below max(noise, max(N, D) eps lambda_max): a null direction holds only that rounding
    (LayerNorm outputs sum to a constant, so mean-pooled transformer features always have
    one), which the LogME repository's cutoff 1e-15 keeps and inverts; on BERT features that
    scattered the score at 3e-3 between two summation orders. Directions above the features'
    precision are unaffected."""
    rtol = max(N, cov_f.shape[0]) * torch.finfo(torch.float64).eps
    return torch.trace(torch.linalg.pinv(cov_f, atol=noise, rtol=rtol, hermitian=True) @ cov_g)


def _noise_variance(dtype: torch.dtype, mean_square: float) -> float:
    """The variance a direction of features of ``dtype`` gets from their rounding alone: each
    entry is off by up to u |x| (u the unit roundoff), so about u^2 times the mean square entry;
    16 times that, for margin. 0 for float64 input (the float64 arithmetic's own cut rules)."""
    u = torch.finfo(dtype).eps / 2 if dtype.is_floating_point and dtype != torch.float64 else 0.0
    return 16 * u * u * mean_square


def _per_model(features, labels, score, *, with_dtype: bool = False) -> torch.Tensor:
    """``score(F, y)`` for every model's features F (float64 [N, D]) with the class indices y
    (0..C-1, every one occurring; see :func:`_class_labels`) on F's device, after checking both
    (``with_dtype``: ``score(F, y, the features' own dtype)``): float64 scores, 0-d for one
    [N, D] model, [M] for several."""
    feats, many = _feature_list(features)
    _, y = _class_labels(labels, feats[0].shape[0])
    y = _on_device(y, feats[0].device)
    scores = torch.stack([score(f.to(torch.float64), y, *((f.dtype,) if with_dtype else ()))
                          for f in feats])
    return scores if many else scores[0]


def hscore(features, labels, *, shrinkage: bool = False, backend: str = "auto"):
    """H-score (Bao et al., ICIP 2019, def. 2): tr(cov(f)^+ cov(E[f | y])), with np.cov's N - 1
    normalization and a pseudo-inverse (the LogME repository's reference code, with a cutoff
    at the features' rounding level instead of its 1e-15: see _hscore_trace). ``shrinkage=True``:
    the regularized H-score (Ibrahim et al., ICLR 2023):
    cov(f) replaced by its Ledoit-Wolf shrinkage with coefficient a (1/N normalization, as
    scikit-learn), and cov(E[f | y]) scaled by (1 - a).

    ``features`` as :func:`logme`; ``labels`` class ids [N]. Returns float64 scores, 0-d or [M]."""
    torch_backend(backend, "hscore")
    def one(F, y, dtype):
        N = F.shape[0]
        G = _class_means(F, y)[1][y]  # E[f | y] per sample
        Gc = G - G.mean(0)
        cov_g = Gc.T @ Gc / (N - 1)
        Fc = F - F.mean(0)
        if shrinkage:
            cov_f, a = _ledoit_wolf_from(Fc.T @ Fc / N, float(((Fc * Fc).sum(1) ** 2).sum()), N)
            cov_g = (1 - a) * cov_g
        else:
            cov_f = Fc.T @ Fc / (N - 1)
        return _hscore_trace(cov_f, cov_g, N, _noise_variance(dtype, float((F * F).mean())))
    return _per_model(features, labels, one, with_dtype=True)


def _class_means(F: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [C], means [C, D]) of the classes y (0..C-1, each occurring) over F's rows."""
    counts = torch.bincount(y)
    sums = torch.zeros(counts.numel(), F.shape[1], dtype=F.dtype, device=F.device).index_add_(0, y, F)
    return counts, sums / counts[:, None]


def _rows_by_class(Z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of each class 0..C-1, from one sort of the labels (not C passes over them)."""
    # split takes the class sizes as host ints: C scalar reads, never the rows themselves.
    return Z[torch.argsort(y, stable=True)].split([int(n) for n in torch.bincount(y)])


GBC_TYPES = ("diagonal", "spherical")
_GBC_MIN_VARIANCE = 1e-4  # the authors' floor on each class's per-feature variance


def _gbc_from_moments(means: torch.Tensor, var: torch.Tensor, gaussian_type: str, log: bool) -> torch.Tensor:
    """GBC (or -log(-GBC) for ``log``) of the classes' float64 means [C, D] and per-feature
    variances [C, D] (1/n_c; floored at 1e-4 here, so rounding below 0 does no harm): the sum
    over the ordered pairs c != c' in log-sum-exp form, one class against all at a time."""
    var = var.clamp(min=_GBC_MIN_VARIANCE)
    if gaussian_type == "spherical":
        var = var.mean(1, keepdim=True)
    log_det = torch.log(var).sum(1)  # [C]
    C = means.shape[0]
    row_lse = torch.empty(C, dtype=torch.float64, device=means.device)
    for c in range(C):  # [C, D] at a time, never [C, C, D]
        avg = (var[c] + var) / 2
        distance = (((means[c] - means) ** 2 / avg).sum(1) / 8
                    + 0.5 * (torch.log(avg).sum(1) - 0.5 * log_det[c] - 0.5 * log_det))
        distance[c] = math.inf  # c' = c is no term of the sum: exp(-inf) = 0
        row_lse[c] = torch.logsumexp(-distance, 0)
    log_overlap = torch.logsumexp(row_lse, 0)  # log sum_{c != c'} exp(-D_B)
    return -log_overlap if log else -torch.exp(log_overlap)


def gbc(features, labels, *, gaussian_type: str = "diagonal", log: bool = False, backend: str = "auto"):
    """GBC (Pándy et al., CVPR 2022, eqs. 3-5): -sum_{c != c'} exp(-D_B(c, c')) over the classes.

    Each class that occurs is a Gaussian N(mu_c, diag(v_c)) with the class's mean and per-feature
    variance (1/n_c, floored at 1e-4 as the authors' code does); D_B is the Bhattacharyya
    distance D_B = 1/8 sum_d (mu_c - mu_c')^2 / v + 1/2 (sum_d log v - 1/2 sum_d log v_c
    - 1/2 sum_d log v_c'), v = (v_c + v_c') / 2. ``gaussian_type="spherical"`` replaces each v_c by
    its mean over features and, as the authors' code, keeps one log term (not D of them).
    The paper reduces features to 64 dimensions with PCA first; pass reduced features for that.

    The sum runs over the ordered pairs c != c' only (the paper's and the authors' code), taken
    in log-sum-exp form, so a GBC of any magnitude keeps its digits (adding the c = c' terms,
    exp(0) = 1, and subtracting them again would round every |GBC| below ~1e-16 to -0).
    ``log=True`` returns -logsumexp_{c != c'}(-D_B) = -log(-GBC) instead: it orders models as GBC
    does (higher is better) and stays finite where GBC itself underflows to -0, as it does for
    well separated classes in 768- or 2048-dimensional features (D_B past ~745).

    ``features`` as :func:`logme`; ``labels`` class ids [N]. Returns float64 scores (GBC <= 0,
    higher is better), 0-d or [M]."""
    torch_backend(backend, "gbc")
    if gaussian_type not in GBC_TYPES:
        raise ValueError(f"gaussian_type: expected one of {list(GBC_TYPES)}, got {gaussian_type!r}")
    if not isinstance(log, bool):
        raise TypeError(f"log: expected a bool, got {type(log).__name__} {log!r}")
    def one(F, y):
        counts, means = _class_means(F, y)
        var = torch.zeros_like(means).index_add_(0, y, (F - means[y]) ** 2) / counts[:, None]
        return _gbc_from_moments(means, var, gaussian_type, log)
    return _per_model(features, labels, one)


def _coding_rate(Z: torch.Tensor, eps: float) -> torch.Tensor:
    """1/2 log det(I + Z^T Z / (n eps)) of rows Z [n, D], through the smaller Gram matrix
    (Z^T Z and Z Z^T share their nonzero eigenvalues); 0 for no rows."""
    n = Z.shape[0]
    if n == 0:
        return torch.zeros((), dtype=Z.dtype, device=Z.device)
    return _rate_of_scatter(Z.T @ Z if n > Z.shape[1] else Z @ Z.T, n, eps)


def _rate_of_scatter(G: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """1/2 log det(I + G / (n eps)) of a scatter matrix G (Z^T Z or Z Z^T) of n rows."""
    return 0.5 * torch.log1p(torch.linalg.eigvalsh(G).clamp(min=0) / (n * eps)).sum()


def transrate(features, labels, *, eps: float = 1e-4, backend: str = "auto"):
    """TransRate (Huang et al., ICML 2022, eq. 6): the coding rate of the centered features
    minus their rate given the label, TrR = R(Z, eps) - 1/C sum_c R(Z_c, eps), with
    R(Z, eps) = 1/2 log det(I + Z^T Z / (n eps)) as the authors' code (and TLlib) compute it,
    eps = 1e-4. C counts the distinct ids (the authors' code counts 0..max, an absent id with
    rate 0; the same for ids 0..C-1 that all occur).

    ``features`` as :func:`logme`; ``labels`` class ids [N]. Returns float64 scores, 0-d or [M]."""
    torch_backend(backend, "transrate")
    eps = _checks.positive(eps, "eps")
    def one(Z, y):
        Z = Z - Z.mean(0)
        rows = _rows_by_class(Z, y)
        return _coding_rate(Z, eps) - sum(_coding_rate(Zc, eps) for Zc in rows) / len(rows)
    return _per_model(features, labels, one)


_DISTANCE_BLOCK = 1 << 24  # entries of the n x n distance matrix held at once


def _kth_neighbour_distance(Z: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's max-norm distance to its k-th nearest other row, a block of rows at a time."""
    n = Z.shape[0]
    rows = max(1, _DISTANCE_BLOCK // n)
    out = torch.empty(n, dtype=Z.dtype, device=Z.device)
    for i in range(0, n, rows):
        # A row's distance to itself (0) is its smallest: the (k+1)-th smallest is the k-th neighbour.
        out[i:i + rows] = torch.cdist(Z[i:i + rows], Z, p=math.inf).topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def tmi(features, labels, *, k: int = 3, min_dist: float = 1.0, backend: str = "auto"):
    """TMI (Xu & Kang, ICCV 2023, §3): the intra-class feature entropy H(Z | Y), higher for models
    whose features keep more within-class variation. Each class's entropy is the
    Kozachenko-Leonenko k-nearest-neighbour estimate in Kraskov et al.'s max-norm form (Phys.
    Rev. E 2004), H_c = -psi(k) + psi(n_c) + d/n_c sum_i log(2 max(eps_i, min_dist)), eps_i the
    max-norm distance of sample i to its k-th nearest neighbour in its class. As the authors' code
    (k = 3, min_dist = 1.0) the score is the mean of p_c H_c over the classes: H(Z | Y) / C when
    every class has more than k samples; a class of 1 sample adds 0 and counts, one with 2..k
    samples (no k-th neighbour) is left out. The classes are the distinct ids (the authors' code
    takes 0..max, where an absent id adds 0 and counts; the same for ids 0..C-1 that all occur).

    The clamp at ``min_dist`` matters: features whose neighbours all lie closer than it (unit
    normalized embeddings, say) score the same whatever their quality; scale them, or lower it.
    ``features`` as :func:`logme`; ``labels`` class ids [N]. Costs O(sum_c n_c^2 D) per model.
    Returns float64 scores, 0-d or [M]."""
    torch_backend(backend, "tmi")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer number of neighbours, got {k!r}")
    min_dist = _checks.positive(min_dist, "min_dist")
    def one(Z, y):
        rows = _rows_by_class(Z, y)
        largest = max(Zc.shape[0] for Zc in rows)
        if largest <= k:
            raise ValueError(f"labels: tmi needs a class with more than k = {k} samples, the largest has {largest}")
        total, classes = torch.zeros((), dtype=torch.float64, device=Z.device), 0
        for Zc in rows:
            n = Zc.shape[0]
            if 2 <= n <= k:
                continue
            classes += 1
            if n > k:
                eps = _kth_neighbour_distance(Zc, k).clamp(min=min_dist)
                psi_k, psi_n = torch.special.digamma(torch.tensor([k, n], dtype=torch.float64, device=Z.device))
                total = total + n / y.numel() * (psi_n - psi_k + Z.shape[1] / n * torch.log(2 * eps).sum())
        return total / classes
    return _per_model(features, labels, one)


def _top_eigenvalue_estimate(A: torch.Tensor, iterations: int = 3) -> float:
    """SFDA's estimate of the largest eigenvalue of a symmetric A: ``iterations`` double steps of
    the power method from A's row sums, then the Rayleigh-like quotient x^T A y of the last two
    iterates (as the authors' code, so the adaptive shrinkage is theirs)."""
    x = A.sum(1)
    for _ in range(iterations):
        y = A @ x
        y = y / torch.linalg.vector_norm(y)
        x = A @ y
        x = x / torch.linalg.vector_norm(x)
    return float(x @ A @ y)


def _shrunk(S: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """(1 - s) S + s tr(S)/d I: scikit-learn's shrunk covariance (SFDA's and NCTI's LDA)."""
    out = (1 - shrinkage) * S
    out.diagonal().add_(shrinkage * float(torch.trace(S)) / S.shape[0])
    return out


def _regularized_fda(X: torch.Tensor, y: torch.Tensor, shrinkage: float | None):
    """SFDA's regularized Fisher discriminant, fit on and applied to X with the classes y
    (0..C-1, each occurring): (class posteriors [N, C], the shrinkage used, the class means
    [C, D]). The within-class scatter S_w = sum_c p_c cov_c (1/n_c normalization) is shrunk
    to (1 - s) S_w + s tr(S_w)/D I, s = max(exp(-5 lambda_max(S_w)), 1e-10) unless given. The
    authors project on all D generalized eigenvectors V of (S_b, shrunk S_w) and classify with
    means V V^T; V V^T is the inverse of the shrunk S_w, applied here by Cholesky instead."""
    N = X.shape[0]
    counts, means = _class_means(X, y)
    R = X - means[y]
    Sw = R.T @ R / N
    if shrinkage is None:
        shrinkage = max(math.exp(-5 * _top_eigenvalue_estimate(Sw)), 1e-10)
    L, info = torch.linalg.cholesky_ex(_shrunk(Sw, shrinkage))
    if int(info) != 0:
        raise ValueError("features: sfda needs features that vary within the classes; the within-class scatter "
                         "is singular")
    coef = torch.cholesky_solve(means.T, L).T  # [C, D]
    intercept = -0.5 * (means * coef).sum(1) + torch.log(counts.to(X.dtype) / N)
    return torch.softmax(X @ coef.T + intercept, dim=1), shrinkage, means


def sfda(features, labels, *, shrinkage: float | None = None, backend: str = "auto"):
    """SFDA (Shao et al., ECCV 2022, §3.2-3.3): the mean posterior of the true class under a
    regularized Fisher discriminant, fit a second time after ConfMix has pulled every sample
    towards the mean of the other classes' means by the first fit's doubt,
    x_i <- q_i x_i + (1 - q_i) mean_{c != y_i} mu_c, with q = softmax over classes of the first
    fit's posteriors (the authors' softening); the second fit reuses the first's shrinkage.
    Classes are those that occur in ``labels``. ``shrinkage``: None for the paper's adaptive
    strength (see _regularized_fda), or a number in (0, 1].

    ``features`` as :func:`logme`; ``labels`` class ids [N]. Costs O(N D^2 + D^3) per model.
    Returns float64 scores in (0, 1), 0-d or [M]."""
    torch_backend(backend, "sfda")
    if shrinkage is not None and not 0 < _checks.finite(shrinkage, "shrinkage") <= 1:
        raise ValueError(f"shrinkage: expected None (adaptive) or a number in (0, 1], got {shrinkage!r}")
    def one(X, y):
        rows = torch.arange(X.shape[0], device=X.device)
        probs, s, means = _regularized_fda(X, y, shrinkage)
        q = torch.softmax(probs, dim=1)[rows, y][:, None]
        others = (means.sum(0) - means) / (means.shape[0] - 1)
        probs, *_ = _regularized_fda(q * X + (1 - q) * others[y], y, s)
        return probs[rows, y].mean()
    return _per_model(features, labels, one)


def otce(source_features, source_labels, target_features, target_labels, *, eps: float, tol: float = 1e-6,
         return_parts: bool = False, backend: str = "auto"):
    """OT-based NCE (Tan et al., CVPR 2021, eqs. 4-6; the score their code recommends): couple
    the source and target samples by entropic OT on |x_s - x_t|^2 (uniform weights; the paper
    takes the exact coupling, the limit eps -> 0), form the joint distribution of labels
    P(y_s, y_t) = sum_ij P_ij [ys_i = y_s][yt_j = y_t], and return -H(Y_t | Y_s) (higher is better).

    ``source_features`` [Ns, d] with class ids ``source_labels`` [Ns]; the same for the target.
    With ``return_parts``, also a dict: ``conditional_entropy``, ``domain_difference`` (the
    transport cost, OTCE's W_D) and ``joint`` [source classes, target classes] (the distinct
    ids of each, in order)."""
    from .ot import sinkhorn

    Xs, _ = _feature_list(source_features, "source_features")
    Xt, _ = _feature_list(target_features, "target_features", along=("source_features", Xs[0].device))
    if len(Xs) != 1 or len(Xt) != 1:
        raise ValueError("otce: expected one source and one target feature matrix [n, d]")
    Xs, Xt = Xs[0].to(torch.float64), Xt[0].to(torch.float64)
    source_ids, ys = _class_labels(source_labels, Xs.shape[0], "source_labels", min_classes=1)
    target_ids, yt = _class_labels(target_labels, Xt.shape[0], "target_labels", min_classes=1)
    result = sinkhorn(Xs, Xt, eps=eps, tol=tol, backend=backend)
    source_onehot = torch.nn.functional.one_hot(_on_device(ys, Xs.device), source_ids.numel()).double()
    target_onehot = torch.nn.functional.one_hot(_on_device(yt, Xs.device), target_ids.numel()).double()
    joint = source_onehot.T @ result.apply(target_onehot)  # [Cs, Ct], never the N x M plan
    marginal = joint.sum(1, keepdim=True)
    entropy = -torch.xlogy(joint, joint / marginal.clamp(min=torch.finfo(torch.float64).tiny)).sum()
    score = -entropy
    if return_parts:
        return score, {"conditional_entropy": entropy, "domain_difference": result.transport_cost, "joint": joint}
    return score
