"""POT's entropic solvers (``ot.bregman``): the Sinkhorn family, point-cloud entry points and
barycenters, with POT's signatures, on transferops' solver.

Every ``method`` of :func:`sinkhorn` ("sinkhorn", "sinkhorn_log", "greenkhorn",
"sinkhorn_stabilized", "sinkhorn_epsilon_scaling") solves the same problem to ``stopThr``, so
each returns what POT's converges to; their own keywords (``tau``, ``epsilon0``, ...) are
checked and change how POT iterates, not the answer. ``stopThr`` bounds the L1 error of the
row marginals relative to the mass (POT: the L2 norm of the column error, a looser test at
equal value). With ``reg=0`` POT's iterations overflow to NaN (with a warning); here the
warning says so and the unregularized problem is solved exactly (:func:`ot.lp.emd`).
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

from ... import _checks, _ot_checks
from ... import ot as _ot
from . import _core
from ._core import Arrays
from .utils import dist

__all__ = ["sinkhorn", "sinkhorn2", "sinkhorn_knopp", "sinkhorn_log", "greenkhorn", "sinkhorn_stabilized",
           "sinkhorn_epsilon_scaling", "empirical_sinkhorn", "empirical_sinkhorn2", "empirical_sinkhorn_divergence",
           "barycenter", "barycenter_sinkhorn", "barycenter_stabilized", "barycenter_debiased"]

METHODS = ("sinkhorn", "sinkhorn_log", "greenkhorn", "sinkhorn_stabilized", "sinkhorn_epsilon_scaling")
METHODS_LOSS = ("sinkhorn", "sinkhorn_log", "sinkhorn_stabilized")  # POT's sinkhorn2 takes these
# POT's method-specific keywords, each checked: they tune how POT iterates (absorption
# threshold, eps-scaling start, inner iterations, print period), not the converged answer.
METHOD_KWARGS = {"sinkhorn_stabilized": ("tau", "print_period"),
                 "sinkhorn_epsilon_scaling": ("tau", "print_period", "epsilon0", "numInnerItermax")}


def _check_method_kwargs(method: str, kwargs: dict, where: str) -> None:
    accepted = METHOD_KWARGS.get(method, ())
    _core.check_kwargs(kwargs, accepted, f"{where} (method={method!r})")
    for key, value in kwargs.items():
        if key in ("print_period", "numInnerItermax"):
            _checks.count(value, key, low=1)
        else:
            _ot_checks.positive(value, key)


def _reg(reg) -> float:
    reg = _core.number(reg, "reg")
    if isinstance(reg, numbers.Real) and not isinstance(reg, bool) and reg == 0:
        return 0.0
    return _ot_checks.positive(reg, "reg")


def _problem(arrays: Arrays, a, b, M, hists: bool = True):
    Mt = arrays.tensor(M, "M", (2,))
    if 0 in Mt.shape:
        raise ValueError(f"M: expected a non-empty cost matrix [n, m], got shape {tuple(Mt.shape)}")
    if not bool(torch.isfinite(Mt).all()):
        raise ValueError("M: expected finite costs, found NaN or Inf")
    n, m = Mt.shape
    return Mt, _core.weights(arrays, a, n, "a", Mt), _core.weights(arrays, b, m, "b", Mt, hists=hists)


def _unregularized(arrays, at, bt, Mt, log: bool, loss: bool):
    """reg=0: POT's iterations overflow there; the problem is exact OT, solved by emd."""
    from .lp import emd, emd2
    warnings.warn("reg=0: entropic regularization is off, which overflows POT's Sinkhorn iterations; solving the "
                  "unregularized problem exactly (ot.emd)", UserWarning, stacklevel=4)
    conv = (lambda t: t) if arrays.torch else (lambda t: t.detach().cpu().numpy())
    if bt.dim() == 2:  # emd2 gives a list of costs; POT's sinkhorn an array
        out = emd2(conv(at), conv(bt), conv(Mt), log=log)
        values = [v for v, _ in out] if log else out
        stacked = torch.stack(values) if arrays.torch else np.asarray(values)
        return (stacked, [lg for _, lg in out]) if log else stacked
    if loss:
        return emd2(conv(at), conv(bt), conv(Mt), log=log)
    return emd(conv(at), conv(bt), conv(Mt), log=log)


def _entropic(a, b, M, reg, method, numItermax, stopThr, verbose, log, warn, warmstart, kwargs, *, where: str,
              loss: bool, methods: tuple[str, ...] = METHODS):
    """The plan (one b) or the costs <M, P> (``loss``, or b [m, k]) and POT's log dict."""
    method = _core.check_method(method, methods)
    _check_method_kwargs(method, kwargs, where)
    arrays = Arrays(a=a, b=b, M=M)
    Mt, at, bt = _problem(arrays, a, b, M)
    hists = bt.dim() == 2
    if hists and method == "greenkhorn":
        raise ValueError("method: 'greenkhorn' takes one target histogram b [m], got b of shape "
                         f"{tuple(bt.shape)}")
    _core.check_warmstart(warmstart, *Mt.shape, arrays)
    reg = _reg(reg)
    if reg == 0:
        return _unregularized(arrays, at, bt, Mt, log, loss)
    sol = _core.solve(Mt, at, bt, reg, numItermax=numItermax, tol=_core.stop_threshold(stopThr, torch.float64))
    if not sol.converged and warn:
        _core.not_converged(where)
    if verbose:
        _core.report(where, sol.n_iter, sol.error)
    if hists or loss:
        value = (sol.P * Mt.double()).sum((-1, -2))
        out = value if hists else value[0]
    else:
        out = sol.P[0]
    out = _core.scalar(arrays.out(out, Mt.dtype))
    if not log:
        return out
    la, lb = at.log(), (bt[:, None] if bt.dim() == 1 else bt).T.log()
    log_u, log_v = la + sol.f / reg, lb + sol.g / reg  # P = diag(u) exp(-M / reg) diag(v)
    log_u, log_v = (log_u.T, log_v.T) if hists else (log_u[0], log_v[0])
    logs = {"err": [sol.error], "niter": sol.n_iter, "n_iter": sol.n_iter, "log_u": log_u, "log_v": log_v,
            "u": log_u.exp(), "v": log_v.exp(), "logu": log_u, "logv": log_v, "alpha": reg * log_u,
            "beta": reg * log_v}
    logs = arrays.outs(logs, Mt.dtype)
    logs["warmstart"] = (logs["alpha"], logs["beta"])
    return out, logs


def sinkhorn(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
             warmstart=None, **kwargs):
    """The entropic plan P [n, m] (``ot.sinkhorn``): min <M, P> + reg KL(P | a b^T) with P 1 = a
    and P^T 1 = b. ``a``, ``b``: weights (empty or None: uniform); b [m, k] solves k problems
    and returns their costs <M, P_k> [k], as POT does. ``log``: also a dict with POT's keys
    (``niter``, ``err``, ``u``, ``v``, ``log_u``, ``log_v``, and ``logu``, ``logv``, ``alpha``,
    ``beta``, ``warmstart`` of the stabilized methods), P = diag(u) exp(-M / reg) diag(v)."""
    return _entropic(a, b, M, reg, method, numItermax, stopThr, verbose, log, warn, warmstart, kwargs,
                     where="sinkhorn", loss=False)


def sinkhorn2(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=False,
              warmstart=None, **kwargs):
    """<M, P> of the entropic plan (``ot.sinkhorn2``; [k] for b [m, k]), differentiable in M,
    a and b on torch inputs: the gradient of the converged plan by implicit differentiation,
    which POT's autodiff through its iterations converges to."""
    return _entropic(a, b, M, reg, method, numItermax, stopThr, verbose, log, warn, warmstart, kwargs,
                     where="sinkhorn2", loss=True, methods=METHODS_LOSS)


def sinkhorn_knopp(a, b, M, reg, numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True, warmstart=None,
                   **kwargs):
    """POT's ``ot.bregman.sinkhorn_knopp``: :func:`sinkhorn` with ``method="sinkhorn"``."""
    return _entropic(a, b, M, reg, "sinkhorn", numItermax, stopThr, verbose, log, warn, warmstart, kwargs,
                     where="sinkhorn_knopp", loss=False)


def sinkhorn_log(a, b, M, reg, numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True, warmstart=None,
                 **kwargs):
    """POT's ``ot.bregman.sinkhorn_log``: :func:`sinkhorn` with ``method="sinkhorn_log"``."""
    return _entropic(a, b, M, reg, "sinkhorn_log", numItermax, stopThr, verbose, log, warn, warmstart, kwargs,
                     where="sinkhorn_log", loss=False)


def greenkhorn(a, b, M, reg, numItermax=10000, stopThr=1e-9, verbose=False, log=False, warn=True, warmstart=None):
    """POT's ``ot.bregman.greenkhorn`` (greedy coordinate updates in POT): the converged plan."""
    return _entropic(a, b, M, reg, "greenkhorn", numItermax, stopThr, verbose, log, warn, warmstart, {},
                     where="greenkhorn", loss=False)


def sinkhorn_stabilized(a, b, M, reg, numItermax=1000, tau=1e3, stopThr=1e-9, warmstart=None, verbose=False,
                        print_period=20, log=False, warn=True, **kwargs):
    """POT's ``ot.bregman.sinkhorn_stabilized`` (``tau``, ``print_period`` checked)."""
    return _entropic(a, b, M, reg, "sinkhorn_stabilized", numItermax, stopThr, verbose, log, warn, warmstart,
                     kwargs | {"tau": tau, "print_period": print_period}, where="sinkhorn_stabilized", loss=False)


def sinkhorn_epsilon_scaling(a, b, M, reg, numItermax=100, epsilon0=1e4, numInnerItermax=100, tau=1e3, stopThr=1e-9,
                             warmstart=None, verbose=False, print_period=10, log=False, warn=True, **kwargs):
    """POT's ``ot.bregman.sinkhorn_epsilon_scaling``: POT runs ``numItermax`` outer steps of at
    most ``numInnerItermax`` iterations; the solve here gets their product as its budget."""
    budget = _ot_checks.max_iter(numItermax, "numItermax") * _checks.count(numInnerItermax, "numInnerItermax", low=1)
    return _entropic(a, b, M, reg, "sinkhorn_epsilon_scaling", budget, stopThr, verbose, log, warn, warmstart,
                     kwargs | {"tau": tau, "print_period": print_period, "epsilon0": epsilon0,
                               "numInnerItermax": numInnerItermax}, where="sinkhorn_epsilon_scaling", loss=False)


# ---- point clouds -------------------------------------------------------------------------------


class LazyPlan:
    """POT's lazy plan: P_ij = exp(f_i + g_j - M_ij / reg), blocks computed when indexed
    (``plan[:]``, ``plan[i0:i1]``, ``plan[i0:i1, j0:j1]``) from the points and log-potentials."""

    def __init__(self, X_s, X_t, f, g, metric: str, reg: float, arrays: Arrays, dtype: torch.dtype):
        self._x, self._y, self._f, self._g = X_s, X_t, f, g
        self._metric, self._reg, self._arrays, self._dtype = metric, reg, arrays, dtype
        self.shape = (X_s.shape[0], X_t.shape[0])

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        x, y = self._x[rows], self._y[cols]
        x, y = (x[None] if x.dim() == 1 else x), (y[None] if y.dim() == 1 else y)
        M = _point_costs(x, y, self._metric)
        f, g = self._f[rows].reshape(-1), self._g[cols].reshape(-1)
        P = (f[:, None] + g[None, :] - M / self._reg).exp()
        P = P.reshape(torch.Size([*self._f[rows].shape, *self._g[cols].shape]))
        return self._arrays.out(P, self._dtype)


def _point_costs(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    M = _ot.cost_matrix(x.double(), y.double())
    return M.sqrt() if metric == "euclidean" else M


def _clouds(X_s, X_t, a, b, metric):
    arrays = Arrays(X_s=X_s, X_t=X_t, a=a, b=b)
    xs, xt = arrays.tensor(X_s, "X_s", (2,)), arrays.tensor(X_t, "X_t", (2,))
    if xs.shape[1] != xt.shape[1]:
        raise ValueError(f"X_s, X_t: expected samples of one dimension, got {tuple(xs.shape)} and {tuple(xt.shape)}")
    at = _core.weights(arrays, a, xs.shape[0], "a", xs)
    bt = _core.weights(arrays, b, xt.shape[0], "b", xt)
    return arrays, xs, xt, at, bt


def _lazy(X_s, X_t, reg, a, b, metric, numIterMax, stopThr, batchSize, warn, warmstart, verbose, kwargs, where):
    """isLazy: the costs are never stored: the points go to transferops' point-cloud solver
    (costs recomputed in tiles when large). POT's ``batchSize`` sets its own tiling; checked.
    Returns the arrays, the points, the log-potentials in the caller's kind, the lazy plan and
    POT's log dict."""
    _core.check_kwargs(kwargs, (), f"{where} (isLazy=True)")
    arrays, xs, xt, at, bt = _clouds(X_s, X_t, a, b, metric)
    _core.check_warmstart(warmstart, xs.shape[0], xt.shape[0], arrays)
    sizes = batchSize if isinstance(batchSize, tuple) else (batchSize,)
    if len(sizes) not in (1, 2):
        raise ValueError(f"batchSize: expected an integer or a pair of integers, got {batchSize!r}")
    for size in sizes:
        _checks.count(size, "batchSize", low=1)
    if metric not in ("sqeuclidean", "euclidean"):
        raise ValueError(f"metric: isLazy=True supports 'sqeuclidean' and 'euclidean', got {metric!r}")
    reg = _ot_checks.positive(_reg(reg), "reg")
    tol = _core.stop_threshold(stopThr, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if metric == "sqeuclidean":
            r = _ot.sinkhorn(xs.detach().double(), xt.detach().double(), at, bt, eps=reg, tol=tol, max_iter=numIterMax,
                             progress=False)
        else:
            r = _ot.sinkhorn_cost_matrix(_point_costs(xs.detach(), xt.detach(), metric), at, bt, eps=reg, tol=tol,
                                         max_iter=numIterMax)
    if not bool(r.converged) and warn:
        _core.not_converged(where)
    if verbose:
        _core.report(where, int(r.n_iter), float(r.marginal_error))
    f, g = at.log() + r.f / reg, bt.log() + r.g / reg
    plan = LazyPlan(xs.detach(), xt.detach(), f, g, metric, reg, arrays, xs.dtype)
    fo, go = arrays.out(f, xs.dtype), arrays.out(g, xs.dtype)
    logs = {"err": [float(r.marginal_error)], "niter": int(r.n_iter), "u": fo, "v": go, "lazy_plan": plan}
    return arrays, xs, xt, fo, go, plan, logs


def empirical_sinkhorn(X_s, X_t, reg, a=None, b=None, metric="sqeuclidean", numIterMax=10000, stopThr=1e-9,
                       isLazy=False, batchSize=100, verbose=False, log=False, warn=True, warmstart=None, **kwargs):
    """The entropic plan between point clouds (``ot.bregman.empirical_sinkhorn``), costs
    ``dist(X_s, X_t, metric)``. ``isLazy``: the log-potentials (f, g), P = exp(f + g - M / reg),
    without storing M (and with ``log`` a dict holding ``lazy_plan``)."""
    numIterMax = _ot_checks.max_iter(numIterMax, "numIterMax")
    if not isLazy:
        M = dist(X_s, X_t, metric=metric)
        return sinkhorn(_core.or_empty(a), _core.or_empty(b), M, reg, numItermax=numIterMax, stopThr=stopThr,
                        verbose=verbose, log=log, warn=warn, warmstart=warmstart, **kwargs)
    _, _, _, f, g, _, logs = _lazy(X_s, X_t, reg, a, b, metric, numIterMax, stopThr, batchSize, warn, warmstart,
                                   verbose, kwargs, "empirical_sinkhorn")
    return (f, g, logs) if log else (f, g)


def empirical_sinkhorn2(X_s, X_t, reg, a=None, b=None, metric="sqeuclidean", numIterMax=10000, stopThr=1e-9,
                        isLazy=False, batchSize=100, verbose=False, log=False, warn=True, warmstart=None, **kwargs):
    """<M, P> between point clouds (``ot.bregman.empirical_sinkhorn2``), differentiable in
    X_s, X_t, a and b on torch inputs (then the costs are stored, whatever ``isLazy``)."""
    numIterMax = _ot_checks.max_iter(numIterMax, "numIterMax")
    needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in (X_s, X_t, a, b))
    if not isLazy or needs_grad:
        M = dist(X_s, X_t, metric=metric)
        return sinkhorn2(_core.or_empty(a), _core.or_empty(b), M, reg, numItermax=numIterMax, stopThr=stopThr,
                         verbose=verbose, log=log, warn=warn, warmstart=warmstart, **kwargs)
    arrays, xs, xt, _, _, plan, logs = _lazy(X_s, X_t, reg, a, b, metric, numIterMax, stopThr, batchSize, warn,
                                             warmstart, verbose, kwargs, "empirical_sinkhorn2")
    loss = sum(float((plan_block * _point_costs(xs[i0:i1].detach(), xt.detach(), metric)).sum())
               for i0, i1, plan_block in _blocks(plan))
    out = _core.scalar(arrays.out(torch.tensor(loss, dtype=torch.float64, device=xs.device), xs.dtype))
    return (out, logs) if log else out


def _blocks(plan: LazyPlan):
    for i0, i1 in _ot._row_blocks(plan.shape[0], plan.shape[1]):
        block = plan[i0:i1]
        yield i0, i1, torch.as_tensor(block).double().to(plan._x.device)


def empirical_sinkhorn_divergence(X_s, X_t, reg, a=None, b=None, metric="sqeuclidean", numIterMax=10000,
                                  stopThr=1e-9, verbose=False, log=False, warn=True, warmstart=None, **kwargs):
    """POT's Sinkhorn divergence (``ot.bregman.empirical_sinkhorn_divergence``): with L the
    linear costs of :func:`empirical_sinkhorn2`, max(0, L(a, b) - (L(a, a) + L(b, b)) / 2)
    (POT's definition; :func:`transferops.sinkhorn_divergence` debiases the regularized values
    instead). ``warmstart``: a pair for the (a, b) problem, as POT takes it."""
    kw = dict(metric=metric, numIterMax=numIterMax, stopThr=stopThr, verbose=verbose, log=log, warn=warn, **kwargs)
    ab = empirical_sinkhorn2(X_s, X_t, reg, a, b, warmstart=warmstart, **kw)
    aa = empirical_sinkhorn2(X_s, X_s, reg, a, a, **kw)
    bb = empirical_sinkhorn2(X_t, X_t, reg, b, b, **kw)
    if log:
        (ab, log_ab), (aa, log_a), (bb, log_b) = ab, aa, bb
    div = ab - 0.5 * (aa + bb)
    div = div.clamp(min=0) if isinstance(div, torch.Tensor) else max(div, 0 * div)
    if not log:
        return div
    return div, {"sinkhorn_loss_ab": ab, "sinkhorn_loss_a": aa, "sinkhorn_loss_b": bb, "log_sinkhorn_ab": log_ab,
                 "log_sinkhorn_a": log_a, "log_sinkhorn_b": log_b}


# ---- barycenters ---------------------------------------------------------------------------------

BARYCENTER_METHODS = ("sinkhorn", "sinkhorn_stabilized", "sinkhorn_log")


def _barycenter(A, M, reg, weights, numItermax, stopThr, verbose, log, warn, debiased: bool, where: str,
                kwargs=None):
    """Entropic barycenter of the columns of A [n, k] for the costs M [n, n] (Benamou et al.
    2015, iterative Bregman projections; debiased: Janati et al. 2020, alg. 1), in the log
    domain, every histogram updated at once. Stops when the plans' column marginals agree
    with the barycenter within stopThr (L1)."""
    arrays, At, Mt, w = _core.histograms(A, M, weights, positive=False)
    n, k = At.shape
    reg = _ot_checks.positive(_reg(reg), "reg")
    if kwargs:
        _core.check_kwargs(kwargs, ("tau",), where)
        _ot_checks.positive(kwargs["tau"], "tau")
    numItermax = _ot_checks.max_iter(numItermax, "numItermax")
    tol = _core.stop_threshold(stopThr, torch.float64)
    K = -Mt.double() / reg
    logA = (At.double() + 1e-300).log().T  # [k, n]
    G = torch.zeros(k, n, dtype=torch.float64, device=At.device)
    c = torch.zeros(n, dtype=torch.float64, device=At.device)
    err, it = float("inf"), 0
    for it in range(1, numItermax + 1):
        F = logA - torch.logsumexp(K[None] + G[:, None, :], dim=-1)  # u updates [k, n]
        log_KU = torch.logsumexp(K[None] + F[:, :, None], dim=1)  # log K^T u [k, n]
        log_bar = (w[:, None] * log_KU).sum(0) + c
        if debiased:  # the debiasing potential's fixed point, a few averaged steps per iteration
            for _ in range(10):
                c = 0.5 * (c + log_bar - torch.logsumexp(K + c[:, None], dim=0))
        if it % 10 == 0 or it == numItermax:
            err = float((G + log_KU).exp().sub(log_bar.exp()).abs().sum(-1).max())
            if err <= tol:
                break
        G = log_bar[None] - log_KU
    converged = err <= tol
    if not converged and warn:
        _core.not_converged(where)
    if verbose:
        _core.report(where, it, err)
    bar = arrays.out(log_bar.exp(), At.dtype)
    return (bar, {"err": [err], "niter": it}) if log else bar


def barycenter(A, M, reg, weights=None, method="sinkhorn", numItermax=10000, stopThr=1e-4, verbose=False, log=False,
               warn=True, **kwargs):
    """The entropic Wasserstein barycenter of the histograms A [n, k] with ``weights`` [k]
    (``ot.bregman.barycenter``); every method is the same log-domain iteration."""
    method = _core.check_method(method, BARYCENTER_METHODS)
    if method != "sinkhorn_stabilized":
        _core.check_kwargs(kwargs, (), "barycenter")
    return _barycenter(A, M, reg, weights, numItermax, stopThr, verbose, log, warn, False, "barycenter", kwargs)


def barycenter_sinkhorn(A, M, reg, weights=None, numItermax=1000, stopThr=1e-4, verbose=False, log=False, warn=True):
    """:func:`barycenter` with ``method="sinkhorn"`` (``ot.bregman.barycenter_sinkhorn``)."""
    return _barycenter(A, M, reg, weights, numItermax, stopThr, verbose, log, warn, False, "barycenter_sinkhorn")


def barycenter_stabilized(A, M, reg, tau=1e10, weights=None, numItermax=1000, stopThr=1e-4, verbose=False, log=False,
                          warn=True):
    """:func:`barycenter` with ``method="sinkhorn_stabilized"`` (``tau`` checked; log-domain here)."""
    return _barycenter(A, M, reg, weights, numItermax, stopThr, verbose, log, warn, False, "barycenter_stabilized",
                       {"tau": tau})


def barycenter_debiased(A, M, reg, weights=None, method="sinkhorn", numItermax=10000, stopThr=1e-4, verbose=False,
                        log=False, warn=True, **kwargs):
    """The debiased entropic barycenter (Janati et al. 2020; ``ot.bregman.barycenter_debiased``)."""
    method = _core.check_method(method, ("sinkhorn", "sinkhorn_log"))
    _core.check_kwargs(kwargs, (), "barycenter_debiased")
    return _barycenter(A, M, reg, weights, numItermax, stopThr, verbose, log, warn, True, "barycenter_debiased")
