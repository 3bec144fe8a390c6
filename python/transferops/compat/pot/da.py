"""POT's domain-adaptation transports (``ot.da``): :class:`SinkhornTransport`,
:class:`EMDTransport` and :class:`UnbalancedSinkhornTransport` on this package's ``dist``,
``sinkhorn``, ``emd`` and ``sinkhorn_unbalanced``, with POT 0.9.7's parameters, attributes
(``cost_``, ``coupling_``, ``mu_s``, ``mu_t``, ``xs_``, ``xt_``, ``log_``, ``norm_cost_``) and
methods; numpy or torch samples (the results in the samples' kind).

``fit`` builds the costs ``dist(Xs, Xt, metric)``, normalized by ``norm``; with source and
target labels (-1: unlabelled), labelled pairs of different classes cost
``limit_max * max(cost)`` (the largest float when ``limit_max`` is inf), and ``limit_max``
becomes that value, as in POT. ``transform`` maps each source sample to the barycentre of its
coupled targets; other samples move with their nearest source sample (Ferradans et al. 2014),
or, for :class:`SinkhornTransport` with ``out_of_sample_map="continuous"`` (POT's default),
through the entropic map x -> sum_j softmax_j(log_v_j - M(x, x_j) / reg) x_j (Pooladian &
Niles-Weed 2021). ``transform_labels`` propagates one-hot labels through the normalized coupling.

Where POT prints a warning and returns None for missing samples, these raise ValueError.
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings

import numpy as np
import torch

from ... import _checks
from ._core import Arrays
from .utils import dist, unif

__all__ = ["distribution_estimation_uniform", "BaseTransport", "SinkhornTransport", "EMDTransport",
           "UnbalancedSinkhornTransport"]

MISSING_LABEL = -1  # POT's mark of an unlabelled sample
NORMS = (None, "median", "max", "log", "loglog")
# Penalties above this many times reg are zero plan entries for the entropic solver already
# (exp(-2^40) underflows), and stay below its bound on costs / reg (2^44).
_ENTROPIC_CAP = 2.0**40


def distribution_estimation_uniform(X):
    """Uniform weights 1/n over the n samples (rows) of X, in X's kind and dtype."""
    return unif(X.shape[0], type_as=X)


def _tensor(x, name: str) -> torch.Tensor:
    return Arrays(**{name: x}).tensor(x, name)


def _median(C: torch.Tensor) -> torch.Tensor:
    """numpy's median (mean of the two middle values), which POT's backends agree on."""
    s = C.flatten().sort().values
    k = s.numel()
    return (s[(k - 1) // 2] + s[k // 2]) / 2


def _normalize(C: torch.Tensor, norm, value=None):
    """POT's cost_normalization: (C / median(C) or C / max(C), the divisor; the fitted
    ``value`` when given), (log(1 + C), None), (log(1 + log(1 + C)), None) or (C, None)."""
    if norm == "median":
        value = _median(C) if value is None else value
        return C / value, value
    if norm == "max":
        value = C.max() if value is None else value
        return C / value, value
    if norm == "log":
        return torch.log1p(C), None
    if norm == "loglog":
        return torch.log1p(torch.log1p(C)), None
    return C, None


def _masks(y: torch.Tensor) -> torch.Tensor:
    """One-hot rows [n, classes] over the sorted distinct labels (-1 counts as one)."""
    _, index = torch.unique(y, return_inverse=True)
    return torch.nn.functional.one_hot(index).to(torch.float64)


def _rows_normalized(P: torch.Tensor) -> torch.Tensor:
    """P with rows summing to 1; rows without mass stay 0 (POT: 0/0 -> nan -> 0)."""
    s = P.sum(1, keepdim=True)
    return torch.where(s > 0, P / torch.where(s > 0, s, 1), 0)


class BaseTransport:
    """POT's ``BaseTransport``: the shared ``fit`` (costs, label penalties, weights, samples)
    and the barycentric ``transform``, ``inverse_transform``, ``transform_labels`` and
    ``inverse_transform_labels``; subclasses compute ``coupling_`` and ``log_``. ``get_params``
    and ``set_params`` follow scikit-learn (the ``__init__`` arguments)."""

    metric = "sqeuclidean"
    norm = None
    limit_max = np.inf
    distribution_estimation = staticmethod(distribution_estimation_uniform)
    out_of_sample_map = "ferradans"
    _maps = ("ferradans",)

    def get_params(self, deep=True):
        params = inspect.signature(type(self).__init__).parameters.values()
        return {p.name: getattr(self, p.name) for p in params
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def set_params(self, **params):
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"{key}: not a parameter of {type(self).__name__} (parameters: {sorted(valid)})")
            setattr(self, key, value)
        return self

    def _validate(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {list(NORMS)}, got {self.norm!r}")
        if self.out_of_sample_map not in self._maps:
            raise ValueError(f"out_of_sample_map: expected one of {list(self._maps)}, got {self.out_of_sample_map!r}")
        if not callable(self.distribution_estimation):
            raise TypeError("distribution_estimation: expected a callable X -> weights [n]")
        limit = self.limit_max
        if not (isinstance(limit, torch.Tensor) or (isinstance(limit, numbers.Real) and limit > 0)):
            raise ValueError(f"limit_max: expected a number > 0 (inf: no finite penalty), got {self.limit_max!r}")

    def _out(self, t: torch.Tensor, like: torch.Tensor):
        return t.to(like.dtype) if self._torch else t.to(like.dtype).detach().cpu().numpy()

    def fit(self, Xs=None, ys=None, Xt=None, yt=None):
        """Costs, label penalties, weights and samples (see the module docstring); the
        coupling is the subclass's."""
        _require(Xs=Xs, Xt=Xt)
        self._validate()
        self._torch = Arrays(Xs=Xs, ys=ys, Xt=Xt, yt=yt).torch
        cost = _tensor(dist(Xs, Xt, metric=self.metric), "cost")
        cost, value = _normalize(cost, self.norm)
        self.norm_cost_ = None if value is None else self._out(value, cost)
        if ys is not None and yt is not None:
            ys_, yt_ = _tensor(ys, "ys"), _tensor(yt, "yt")
            if ys_.shape != (cost.shape[0],) or yt_.shape != (cost.shape[1],):
                raise ValueError(f"ys, yt: expected one label per sample ({cost.shape[0]}, {cost.shape[1]}), got "
                                 f"shapes {tuple(ys_.shape)} and {tuple(yt_.shape)}")
            limit = self.limit_max
            if not math.isinf(float(limit)):
                limit = float(limit) * cost.max()
                self.limit_max = self._out(limit, cost)
                if not self._torch:
                    self.limit_max = self.limit_max[()]
            penalty = limit if isinstance(limit, torch.Tensor) else torch.finfo(cost.dtype).max
            labelled = (ys_ != MISSING_LABEL)[:, None] & (yt_ != MISSING_LABEL)[None, :]
            conflict = labelled & (ys_[:, None] != yt_[None, :])
            # POT takes max(cost, correction), the correction 0 off the conflicting pairs.
            cost = torch.maximum(cost, torch.zeros_like(cost).masked_fill(conflict, penalty))
        self.cost_ = self._out(cost, cost)
        self.mu_s = self.distribution_estimation(Xs)
        self.mu_t = self.distribution_estimation(Xt)
        self.xs_, self.xt_ = Xs, Xt
        return self

    def fit_transform(self, Xs=None, ys=None, Xt=None, yt=None):
        """``fit`` then ``transform`` of the same source samples."""
        return self.fit(Xs, ys, Xt, yt).transform(Xs, ys, Xt, yt)

    def _fitted(self) -> torch.Tensor:
        if not hasattr(self, "coupling_"):
            raise RuntimeError(f"{type(self).__name__}: call fit before transforming")
        return _tensor(self.coupling_, "coupling_")

    def _map(self, X, P: torch.Tensor, anchors, targets, batch_size: int):
        """Barycentric map of the anchors' samples through P [anchors, targets] (rows
        normalized); other samples move by the displacement of their nearest anchor."""
        batch_size = _checks.count(batch_size, "batch_size", low=1)
        Xa, Xb = _tensor(anchors, "anchors"), _tensor(targets, "targets")
        moved = _rows_normalized(P.double()) @ Xb.double()
        Xq = _tensor(X, "X")
        if Xq.shape == Xa.shape and bool(torch.equal(Xq.double(), Xa.double())):
            return self._out(moved, Xq)
        if Xq.dim() != 2 or Xq.shape[1] != Xa.shape[1]:
            raise ValueError(f"X: expected samples [n, {Xa.shape[1]}], got shape {tuple(Xq.shape)}")
        out = []
        for i in range(0, Xq.shape[0], batch_size):
            chunk = Xq[i:i + batch_size]
            # POT picks the neighbour with dist's default metric, whatever ``metric`` is.
            nearest = dist(chunk.detach(), Xa.detach()).argmin(1)
            out.append(moved[nearest] + (chunk - Xa[nearest]).double())
        return self._out(torch.cat(out), Xq)

    def transform(self, Xs=None, ys=None, Xt=None, yt=None, batch_size=128):
        """Source samples mapped onto the target domain (``ys``, ``Xt``, ``yt``: unused, as POT)."""
        _require(Xs=Xs)
        return self._map(Xs, self._fitted(), self.xs_, self.xt_, batch_size)

    def inverse_transform(self, Xs=None, ys=None, Xt=None, yt=None, batch_size=128):
        """Target samples mapped onto the source domain (``Xs``, ``ys``, ``yt``: unused)."""
        _require(Xt=Xt)
        return self._map(Xt, self._fitted().T, self.xt_, self.xs_, batch_size)

    def transform_labels(self, ys=None):
        """Soft target labels [nt, classes]: the source one-hot labels ``ys`` averaged by the
        coupling's columns (Redko et al. 2019)."""
        _require(ys=ys)
        P = self._fitted()
        return self._out(_rows_normalized(P.double().T) @ self._label_masks(ys, P.shape[0], "ys"), P)

    def inverse_transform_labels(self, yt=None):
        """Soft source labels [ns, classes] from the target labels ``yt``."""
        _require(yt=yt)
        P = self._fitted()
        return self._out(_rows_normalized(P.double()) @ self._label_masks(yt, P.shape[1], "yt"), P)

    @staticmethod
    def _label_masks(y, n: int, name: str) -> torch.Tensor:
        y_ = _tensor(y, name)
        if y_.shape != (n,):
            raise ValueError(f"{name}: expected {n} labels, got shape {tuple(y_.shape)}")
        return _masks(y_)

    def _entropic_cost(self):
        """cost_ for the entropic solvers: entries past 2^40 reg (label penalties) give zero plan
        entries as POT's exp(-penalty / reg) does, and are capped there, under the solver's bound
        on costs / reg (2^44); cost_ itself stays POT's."""
        t = _tensor(self.cost_, "cost_")
        cap = _ENTROPIC_CAP * float(self.reg_e)
        return self._out(t.clamp(max=cap), t) if bool((t > cap).any()) else self.cost_


def _require(**named) -> None:
    missing = [name for name, value in named.items() if value is None]
    if missing:
        raise ValueError(f"{', '.join(missing)}: required (got None)")


class SinkhornTransport(BaseTransport):
    """POT's ``SinkhornTransport``: the entropic coupling ``sinkhorn(mu_s, mu_t, cost_, reg_e)``.
    ``method`` is any of :func:`ot.sinkhorn`'s (each gives the same converged plan);
    ``out_of_sample_map="continuous"`` (POT's default) needs the log-potentials, so it keeps the
    log (``log_``) whatever ``log`` says, and warns and switches ``method`` to "sinkhorn_log" as
    POT does; ``"ferradans"``: the nearest-sample map."""

    _maps = ("ferradans", "continuous")

    def __init__(self, reg_e=1.0, method="sinkhorn_log", max_iter=1000, tol=10e-9, verbose=False, log=False,
                 metric="sqeuclidean", norm=None, distribution_estimation=distribution_estimation_uniform,
                 out_of_sample_map="continuous", limit_max=np.inf):
        self.reg_e, self.method, self.max_iter, self.tol = reg_e, method, max_iter, tol
        self.verbose, self.log, self.metric, self.norm = verbose, log, metric, norm
        self.distribution_estimation, self.out_of_sample_map, self.limit_max = (distribution_estimation,
                                                                                out_of_sample_map, limit_max)
        self._validate()

    def fit(self, Xs=None, ys=None, Xt=None, yt=None):
        from .bregman import sinkhorn
        super().fit(Xs, ys, Xt, yt)
        keep_log = self.log or self.out_of_sample_map == "continuous"
        if self.out_of_sample_map == "continuous" and self.method != "sinkhorn_log":
            warnings.warn("method: set to 'sinkhorn_log', the method out_of_sample_map='continuous' takes (as POT)",
                          UserWarning, stacklevel=2)
            self.method = "sinkhorn_log"
        out = sinkhorn(self.mu_s, self.mu_t, self._entropic_cost(), self.reg_e, method=self.method,
                       numItermax=self.max_iter, stopThr=self.tol, verbose=self.verbose, log=keep_log)
        self.coupling_, self.log_ = out if keep_log else (out, {})
        return self

    def _continuous(self, X, samples, log_w, batch_size: int):
        """The entropic map: softmax_j(log_w_j - M(x, x_j) / reg) averages the samples x_j."""
        batch_size = _checks.count(batch_size, "batch_size", low=1)
        Xq, Xb = _tensor(X, "X"), _tensor(samples, "samples")
        if Xq.dim() != 2 or Xq.shape[1] != Xb.shape[1]:
            raise ValueError(f"X: expected samples [n, {Xb.shape[1]}], got shape {tuple(Xq.shape)}")
        w = _tensor(log_w, "log_w").double()
        value = None if self.norm_cost_ is None else _tensor(self.norm_cost_, "norm_cost_")
        out = []
        for i in range(0, Xq.shape[0], batch_size):
            M = _tensor(dist(X[i:i + batch_size], samples, metric=self.metric), "M").double()
            M, _ = _normalize(M, self.norm, value)
            out.append(torch.softmax(w[None, :] - M / float(self.reg_e), dim=1) @ Xb.double())
        return self._out(torch.cat(out), Xq)

    def transform(self, Xs=None, ys=None, Xt=None, yt=None, batch_size=128):
        """Source samples mapped onto the target domain (see the class docstring)."""
        if self.out_of_sample_map == "ferradans":
            return super().transform(Xs, ys, Xt, yt, batch_size)
        _require(Xs=Xs)
        self._fitted()
        return self._continuous(Xs, self.xt_, self.log_["log_v"], batch_size)

    def inverse_transform(self, Xs=None, ys=None, Xt=None, yt=None, batch_size=128):
        """Target samples mapped onto the source domain (see the class docstring)."""
        if self.out_of_sample_map == "ferradans":
            return super().inverse_transform(Xs, ys, Xt, yt, batch_size)
        _require(Xt=Xt)
        self._fitted()
        return self._continuous(Xt, self.xs_, self.log_["log_u"], batch_size)


class EMDTransport(BaseTransport):
    """POT's ``EMDTransport``: the exact coupling ``emd(mu_s, mu_t, cost_)`` (POT's network
    simplex where installed, else scipy's HiGHS: see :mod:`.lp`), with at most ``max_iter``
    iterations."""

    def __init__(self, metric="sqeuclidean", norm=None, log=False, distribution_estimation=distribution_estimation_uniform,
                 out_of_sample_map="ferradans", limit_max=10, max_iter=100000):
        self.metric, self.norm, self.log = metric, norm, log
        self.distribution_estimation, self.out_of_sample_map = distribution_estimation, out_of_sample_map
        self.limit_max, self.max_iter = limit_max, max_iter
        self._validate()

    def fit(self, Xs, ys=None, Xt=None, yt=None):
        from .lp import emd
        super().fit(Xs, ys, Xt, yt)
        out = emd(self.mu_s, self.mu_t, self.cost_, numItermax=self.max_iter, log=self.log)
        self.coupling_, self.log_ = out if self.log else (out, {})
        return self


class UnbalancedSinkhornTransport(BaseTransport):
    """POT's ``UnbalancedSinkhornTransport``: ``sinkhorn_unbalanced(mu_s, mu_t, cost_, reg_e,
    reg_m)``, KL-relaxed marginals. POT's default ``max_iter=10`` stops its iterations early;
    this solver warns there that it has not converged (raise ``max_iter`` for the plan that POT's
    iterations converge to)."""

    def __init__(self, reg_e=1.0, reg_m=0.1, method="sinkhorn", max_iter=10, tol=1e-9, verbose=False, log=False,
                 metric="sqeuclidean", norm=None, distribution_estimation=distribution_estimation_uniform,
                 out_of_sample_map="ferradans", limit_max=10):
        self.reg_e, self.reg_m, self.method, self.max_iter, self.tol = reg_e, reg_m, method, max_iter, tol
        self.verbose, self.log, self.metric, self.norm = verbose, log, metric, norm
        self.distribution_estimation, self.out_of_sample_map = distribution_estimation, out_of_sample_map
        self.limit_max = limit_max
        self._validate()

    def fit(self, Xs, ys=None, Xt=None, yt=None):
        from .unbalanced import sinkhorn_unbalanced
        super().fit(Xs, ys, Xt, yt)
        out = sinkhorn_unbalanced(self.mu_s, self.mu_t, self._entropic_cost(), self.reg_e, self.reg_m,
                                  method=self.method, numItermax=self.max_iter, stopThr=self.tol,
                                  verbose=self.verbose, log=self.log)
        self.coupling_, self.log_ = out if self.log else (out, {})
        return self
