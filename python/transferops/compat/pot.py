"""POT's Sinkhorn entry points (``ot.sinkhorn``, ``ot.sinkhorn2``, ``ot.sinkhorn_unbalanced``,
``ot.sinkhorn_unbalanced2``, ``ot.bregman.empirical_sinkhorn2``) with POT's signatures, run by
:mod:`transferops.ot`. Switch with one import: ``from transferops.compat import pot as ot``.

Same semantics as POT 0.9 for one histogram pair: empty ``a``/``b`` mean uniform weights, ``M``
is the cost matrix, ``reg`` is eps, the entropy is KL(P | a x b), ``reg_m`` relaxes the
marginals with KL terms (POT's ``reg_type="kl"``; ``inf``: balanced), ``warn=False`` silences
the warnings, numbers are checked under POT's names, numpy in gives numpy out and torch in gives
torch out. Every ``method`` ("sinkhorn", "sinkhorn_log", "sinkhorn_stabilized", ...) runs the
same log-stable solver, which returns the answer every one of them converges to. Differences:
``stopThr`` bounds the L1 error of the marginals relative to the mass (POT: the L2 norm of the
error, a looser test); several target histograms at once (``b`` of shape [M, k]) are not
supported (solve a batch with :func:`transferops.sinkhorn_cost_matrix` instead).
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from .. import _ot_checks
from .. import ot as _ot


def _tensor(x, name: str):
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x), True
    if isinstance(x, (list, tuple)):
        return torch.tensor(x, dtype=torch.float64), True
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _weights(w, n: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """float64 weights [n]; None or empty (POT's ``[]``) mean uniform."""
    w, _ = _tensor([] if w is None else w, name)
    if w.numel() == 0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=like.device)
    if w.dim() != 1:
        raise ValueError(f"{name}: expected one histogram [{n}] (several at once are not supported), "
                         f"got shape {tuple(w.shape)}")
    return w.to(device=like.device, dtype=torch.float64)


def _reach(reg_m) -> float | None:
    """POT's reg_m: one value, or one per marginal (equal here); inf is balanced OT."""
    if isinstance(reg_m, np.ndarray):
        reg_m = reg_m.tolist()  # a 0-d array gives its number, a 1-d one a list
    values = list(reg_m) if isinstance(reg_m, (list, tuple)) else [reg_m]
    if len(values) not in (1, 2):
        raise ValueError(f"reg_m: expected a number or one per marginal, got {len(values)} values")
    out = [None if isinstance(v, numbers.Real) and v == math.inf else _ot_checks.positive(v, "reg_m") for v in values]
    if out[0] != out[-1]:
        raise ValueError(f"reg_m: a different relaxation per marginal is not supported, got {values}")
    return out[0]


def _run(solve, reg, iterations, iterations_name: str, stopThr, dtype: torch.dtype, warn: bool, stacklevel: int):
    """solve(eps=, tol=, max_iter=) with POT's settings checked under POT's names; ``warn``
    (POT's flag) False silences the warnings (stopThr floored, not converged)."""
    reg = _ot_checks.positive(reg, "reg")
    iterations = _ot_checks.max_iter(iterations, iterations_name)
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", RuntimeWarning)
        tol = _ot_checks.tol(stopThr, dtype, "stopThr", stacklevel=stacklevel)
        return solve(eps=reg, tol=tol, max_iter=iterations)


def _solve(a, b, M, reg, reach, numItermax, stopThr, warn):
    C, numpy_in = _tensor(M, "M")
    if C.dim() != 2 or not C.is_floating_point():
        raise ValueError(f"M: expected a float cost matrix [n, m], got {C.dtype} of shape {tuple(C.shape)}")
    a, b = _weights(a, C.shape[0], "a", C), _weights(b, C.shape[1], "b", C)
    result = _run(lambda **kw: _ot.sinkhorn_cost_matrix(C, a, b, reach=reach, **kw), reg, numItermax, "numItermax",
                  stopThr, _ot._working_dtype(C.dtype), warn, stacklevel=6)
    return result, C, numpy_in, a, b


def _out(t: torch.Tensor, numpy_in: bool, like: torch.Tensor):
    t = t.to(like.dtype)
    return t.numpy() if numpy_in else t


def _log(result, a: torch.Tensor, b: torch.Tensor, reg: float, numpy_in: bool) -> dict:
    """POT's log dict: ``niter``, ``err``, and ``log_u``, ``log_v`` with P = diag(e^log_u)
    exp(-M / reg) diag(e^log_v), i.e. log_u = log a + f / reg (up to the constant the two share)."""
    logs = {"niter": int(result.n_iter), "err": [float(result.marginal_error)],
            "log_u": a.log() + result.f / reg, "log_v": b.log() + result.g / reg}
    return {k: (v.numpy() if numpy_in and isinstance(v, torch.Tensor) else v) for k, v in logs.items()}


def _entry(a, b, M, reg, reach, numItermax, stopThr, log, plan: bool, warn: bool = True):
    """The plan or <M, P>, with POT's log dict on request."""
    result, C, numpy_in, a, b = _solve(a, b, M, reg, reach, numItermax, stopThr, warn)
    out = _out(result.plan() if plan else result.transport_cost, numpy_in, C)
    return (out, _log(result, a, b, reg, numpy_in)) if log else out


def _kl_only(reg_type) -> None:
    if reg_type != "kl":
        raise ValueError(f"reg_type: only 'kl' (POT's default) is supported, got {reg_type!r}")


def sinkhorn(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
             **kwargs):
    """The entropic plan P [n, m] (``ot.sinkhorn``); with ``log`` also a dict (``niter``,
    ``err``, and the potentials f, g under ``log_u``/``log_v`` as P = a_i b_j exp((f_i + g_j -
    M_ij) / reg))."""
    return _entry(a, b, M, reg, None, numItermax, stopThr, log, plan=True, warn=warn)


def sinkhorn2(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
              **kwargs):
    """<M, P> of the entropic plan (``ot.sinkhorn2``); with ``log`` also the dict of :func:`sinkhorn`."""
    return _entry(a, b, M, reg, None, numItermax, stopThr, log, plan=False, warn=warn)


def sinkhorn_unbalanced(a, b, M, reg, reg_m, method="sinkhorn", reg_type="kl", numItermax=1000, stopThr=1e-6,
                        verbose=False, log=False, **kwargs):
    """The unbalanced plan (``ot.sinkhorn_unbalanced`` with KL marginal penalties ``reg_m``)."""
    _kl_only(reg_type)
    return _entry(a, b, M, reg, _reach(reg_m), numItermax, stopThr, log, plan=True)


def sinkhorn_unbalanced2(a, b, M, reg, reg_m, method="sinkhorn", reg_type="kl", numItermax=1000, stopThr=1e-6,
                         verbose=False, log=False, **kwargs):
    """<M, P> of the unbalanced plan (``ot.sinkhorn_unbalanced2``, POT's default ``returnCost="linear"``)."""
    _kl_only(reg_type)
    return _entry(a, b, M, reg, _reach(reg_m), numItermax, stopThr, log, plan=False)


def empirical_sinkhorn2(X_s, X_t, reg, a=None, b=None, metric="sqeuclidean", numIterMax=10000, stopThr=1e-9,
                        verbose=False, log=False, warn=True, **kwargs):
    """<C, P> between point clouds (``ot.bregman.empirical_sinkhorn2``), costs |x - y|^2."""
    if metric != "sqeuclidean":
        raise ValueError(f"metric: only 'sqeuclidean' is supported, got {metric!r}")
    x, numpy_in = _tensor(X_s, "X_s")
    y, _ = _tensor(X_t, "X_t")
    a, b = _weights(a, x.shape[0], "a", x), _weights(b, y.shape[0], "b", y)
    result = _run(lambda **kw: _ot.sinkhorn(x, y, a, b, **kw), reg, numIterMax, "numIterMax", stopThr,
                  _ot._working_dtype(x.dtype, y.dtype), warn, stacklevel=4)
    value = _out(result.transport_cost, numpy_in, x)
    return (value, _log(result, a, b, reg, numpy_in)) if log else value
