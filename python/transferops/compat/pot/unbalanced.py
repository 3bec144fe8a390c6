"""POT's unbalanced entropic OT (``ot.unbalanced``) with POT's signatures, on transferops'
solver: min <M, P> + reg KL(P | c) + reg_m1 KL(P 1 | a) + reg_m2 KL(P^T 1 | b).

``reg_type="kl"`` takes c = a b^T (or the given ``c``), ``"entropy"`` c = 1 (POT warns that it
overrides ``c``; so does this). ``reg_m``: a number, or one per marginal; inf makes that marginal
exact. Every ``method`` ("sinkhorn", "sinkhorn_stabilized", "sinkhorn_translation_invariant",
"sinkhorn_reg_scaling") converges to the same plan, which is returned. Several b at once
(b [m, k]) solve k problems with the reference each ``reg_type`` names (POT falls back to c = 1
for all of them).
"""
from __future__ import annotations

import warnings

import torch

from ... import _ot_checks
from . import _core
from ._core import Arrays

__all__ = ["sinkhorn_unbalanced", "sinkhorn_unbalanced2", "sinkhorn_knopp_unbalanced",
           "sinkhorn_stabilized_unbalanced", "sinkhorn_unbalanced_translation_invariant", "barycenter_unbalanced",
           "barycenter_unbalanced_sinkhorn", "barycenter_unbalanced_stabilized"]

METHODS = ("sinkhorn", "sinkhorn_stabilized", "sinkhorn_translation_invariant", "sinkhorn_reg_scaling")
# Keywords of POT's methods: checked; they tune POT's iterations, not the converged plan.
METHOD_KWARGS = {"sinkhorn_stabilized": ("tau",), "sinkhorn_reg_scaling": ("reg_init", "tau")}


def _solve(a, b, M, reg, reg_m, method, reg_type, c, warmstart, numItermax, stopThr, verbose, kwargs, where):
    method = _core.check_method(method, METHODS)
    # warn: POT's unbalanced solvers take it through **kwargs (and never warn); here it silences
    # the non-convergence warning, as it does for the balanced ones.
    warn = kwargs.pop("warn", True)
    if not isinstance(warn, bool):
        raise TypeError(f"warn: expected a bool, got {warn!r}")
    accepted = METHOD_KWARGS.get(method, ())
    _core.check_kwargs(kwargs, accepted, f"{where} (method={method!r})")
    for key, value in kwargs.items():
        _ot_checks.positive(value, key)
    if not isinstance(reg_type, str) or reg_type.lower() not in ("kl", "entropy"):
        raise ValueError(f"reg_type: expected 'kl' or 'entropy', got {reg_type!r}")
    entropy = reg_type.lower() == "entropy"
    arrays = Arrays(a=a, b=b, M=M, c=c)
    Mt = arrays.tensor(M, "M", (2,))
    if not bool(torch.isfinite(Mt).all()):
        raise ValueError("M: expected finite costs, found NaN or Inf")
    n, m = Mt.shape
    at = _core.weights(arrays, a, n, "a", Mt)
    bt = _core.weights(arrays, b, m, "b", Mt, hists=True)
    ct = None
    if entropy:
        warnings.warn("reg_type='entropy': the reference measure c is the matrix of ones (any c given is not used)",
                      UserWarning, stacklevel=4)
    elif c is not None:
        ct = arrays.tensor(c, "c", (2,))
        if ct.shape != Mt.shape or bool((ct <= 0).any()) or not bool(torch.isfinite(ct).all()):
            raise ValueError(f"c: expected a positive finite reference measure of M's shape {tuple(Mt.shape)}")
    _core.check_warmstart(warmstart, n, m, arrays)
    reg = _core.number(reg, "reg")
    pair = _core.parameter_pair(reg_m, "reg_m")
    hists = bt.dim() == 2
    if hists and not entropy:
        warnings.warn("b [m, k] with reg_type='kl': as POT, the k problems take the reference measure of ones "
                      "(reg_type='entropy'), not a b_k^T", UserWarning, stacklevel=4)
        entropy, ct = True, None
    a_solve = at
    if pair == (None, None):
        # POT's iterations end on the column update, whose plan is that of a scaled to b's mass
        # (to rounding too: the gradient follows the same convention).
        ratio = (bt.detach().sum(0) / at.detach().sum()).reshape(-1, 1)  # [k, 1]
        if bool(((ratio - 1).abs() > 1e-6).any()):
            warnings.warn(f"reg_m=inf (exact marginals) with masses {float(at.sum()):g} (a) and "
                          f"{bt.sum(0).tolist()} (b): solving with a scaled to b's mass, where POT's iterations end",
                          UserWarning, stacklevel=4)
        a_solve = at * ratio if hists else at * ratio[0]
    sol = _core.solve(Mt, a_solve, bt, reg, pair, c=ct, entropy=entropy, row_last=False,
                      numItermax=numItermax, tol=_core.stop_threshold(stopThr, torch.float64))
    if not sol.converged and warn:
        _core.not_converged(where)
    if verbose:
        _core.report(where, sol.n_iter, sol.error)
    return arrays, Mt, at, bt, ct, entropy, pair, _ot_checks.positive(reg, "reg"), sol


def _logs(arrays, Mt, sol, reg, hists: bool, linear, total) -> dict:
    """POT's unbalanced log: ``logu``, ``logv`` with P = exp(logu + logv - M / reg) * c, ``err``,
    and for one b ``cost`` and ``total_cost``."""
    logu, logv = sol.f / reg, sol.g / reg
    logu, logv = (logu.T, logv.T) if hists else (logu[0], logv[0])
    logs = arrays.outs({"logu": logu, "logv": logv}, Mt.dtype) | {"err": [sol.error], "niter": sol.n_iter}
    if not hists:
        logs |= {k: _core.scalar(v) for k, v in arrays.outs({"cost": linear[0], "total_cost": total[0]},
                                                             Mt.dtype).items()}
    return logs


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """POT's kl_div as its unbalanced total cost uses it: sum p log(p / q + 1e-16), no mass terms."""
    return (p * (p / q + 1e-16).log()).sum((-1, -2) if p.dim() == 3 else -1)


def _costs(Mt, at, bt, ct, entropy, pair, reg, sol):
    """Per problem: <M, P> and POT's total cost <M, P> + reg KL(P | c) + reg_m KL terms."""
    P = sol.P
    linear = (P * Mt.double()).sum((-1, -2))
    B = bt[:, None] if bt.dim() == 1 else bt
    if entropy:
        ref = torch.ones_like(P)
    elif ct is not None:
        ref = ct.double().expand_as(P)
    else:
        ref = at.double()[None, :, None] * B.double().T[:, None, :]
    total = linear + reg * _kl(P, ref)
    if pair[0] is not None:
        total = total + pair[0] * _kl(P.sum(-1), at.double()[None])
    if pair[1] is not None:
        total = total + pair[1] * _kl(P.sum(-2), B.double().T)
    return linear, total


def sinkhorn_unbalanced(a, b, M, reg, reg_m, method="sinkhorn", reg_type="kl", c=None, warmstart=None,
                        numItermax=1000, stopThr=1e-6, verbose=False, log=False, **kwargs):
    """The unbalanced entropic plan (``ot.unbalanced.sinkhorn_unbalanced``); b [m, k]: the k
    linear costs <M, P_k>, as POT. ``log``: ``logu``, ``logv`` (P = exp(logu + logv - M / reg)
    * c), ``err``, and for one b ``cost`` and ``total_cost`` as POT computes them."""
    arrays, Mt, at, bt, ct, entropy, pair, reg, sol = _solve(a, b, M, reg, reg_m, method, reg_type, c, warmstart,
                                                             numItermax, stopThr, verbose, kwargs,
                                                             "sinkhorn_unbalanced")
    hists = bt.dim() == 2
    linear, total = _costs(Mt, at, bt, ct, entropy, pair, reg, sol)
    out = arrays.out(linear if hists else sol.P[0], Mt.dtype)
    if not log:
        return out
    return out, _logs(arrays, Mt, sol, reg, hists, linear, total)


def sinkhorn_unbalanced2(a, b, M, reg, reg_m, method="sinkhorn", reg_type="kl", c=None, warmstart=None,
                         returnCost="linear", numItermax=1000, stopThr=1e-6, verbose=False, log=False, **kwargs):
    """The unbalanced cost (``ot.unbalanced.sinkhorn_unbalanced2``): ``returnCost="linear"``
    <M, P>, ``"total"`` the whole objective as POT computes it (its KL terms without the mass
    terms); [k] for b [m, k]. Differentiable in M, a and b on torch inputs (implicit
    differentiation of the converged plan)."""
    if returnCost not in ("linear", "total"):
        raise ValueError(f"returnCost: expected 'linear' or 'total', got {returnCost!r}")
    arrays, Mt, at, bt, ct, entropy, pair, reg, sol = _solve(a, b, M, reg, reg_m, method, reg_type, c, warmstart,
                                                             numItermax, stopThr, verbose, kwargs,
                                                             "sinkhorn_unbalanced2")
    linear, total = _costs(Mt, at, bt, ct, entropy, pair, reg, sol)
    value = linear if returnCost == "linear" else total
    out = _core.scalar(arrays.out(value if bt.dim() == 2 else value[0], Mt.dtype))
    return (out, _logs(arrays, Mt, sol, reg, bt.dim() == 2, linear, total)) if log else out


def sinkhorn_knopp_unbalanced(a, b, M, reg, reg_m, reg_type="kl", c=None, warmstart=None, numItermax=1000,
                              stopThr=1e-6, verbose=False, log=False, **kwargs):
    """POT's ``ot.unbalanced.sinkhorn_knopp_unbalanced``: :func:`sinkhorn_unbalanced` with
    ``method="sinkhorn"``."""
    return sinkhorn_unbalanced(a, b, M, reg, reg_m, "sinkhorn", reg_type, c, warmstart, numItermax, stopThr, verbose,
                               log, **kwargs)


def sinkhorn_stabilized_unbalanced(a, b, M, reg, reg_m, reg_type="kl", c=None, warmstart=None, tau=1e5,
                                   numItermax=1000, stopThr=1e-6, verbose=False, log=False, **kwargs):
    """POT's ``ot.unbalanced.sinkhorn_stabilized_unbalanced`` (``tau`` checked)."""
    return sinkhorn_unbalanced(a, b, M, reg, reg_m, "sinkhorn_stabilized", reg_type, c, warmstart, numItermax,
                               stopThr, verbose, log, tau=tau, **kwargs)


def sinkhorn_unbalanced_translation_invariant(a, b, M, reg, reg_m, reg_type="kl", c=None, warmstart=None,
                                              numItermax=1000, stopThr=1e-6, verbose=False, log=False, **kwargs):
    """POT's ``ot.unbalanced.sinkhorn_unbalanced_translation_invariant`` (Séjourné et al. 2022
    there): the same converged plan."""
    return sinkhorn_unbalanced(a, b, M, reg, reg_m, "sinkhorn_translation_invariant", reg_type, c, warmstart,
                               numItermax, stopThr, verbose, log, **kwargs)


def barycenter_unbalanced(A, M, reg, reg_m, method="sinkhorn", weights=None, numItermax=1000, stopThr=1e-6,
                          verbose=False, log=False, **kwargs):
    """The unbalanced entropic barycenter of the histograms A [n, k] (Chizat et al. 2018,
    alg. 2; ``ot.unbalanced.barycenter_unbalanced``), in the log domain for every method:
    u = (A / K v)^fi, q = (sum_k w_k (K^T u_k)^(1 - fi))^(1 / (1 - fi)), v = (q / K^T u)^fi,
    fi = reg_m / (reg_m + reg). Stops when log u and log v move by less than stopThr."""
    method = _core.check_method(method, METHODS)
    if method in ("sinkhorn_reg_scaling", "sinkhorn_translation_invariant"):
        warnings.warn(f"method={method!r} is not implemented for barycenters (as in POT): the Sinkhorn iteration "
                      "runs, to the same barycenter", UserWarning, stacklevel=2)
    _core.check_kwargs(kwargs, ("tau",) if method == "sinkhorn_stabilized" else (), "barycenter_unbalanced")
    for key, value in kwargs.items():
        _ot_checks.positive(value, key)
    arrays, At, Mt, w = _core.histograms(A, M, weights, positive=True)  # log w below
    n, k = At.shape
    reg = _ot_checks.positive(_core.number(reg, "reg"), "reg")
    rho = _ot_checks.positive(_core.number(reg_m, "reg_m"), "reg_m")
    fi = rho / (rho + reg)
    numItermax = _ot_checks.max_iter(numItermax, "numItermax")
    tol = _core.stop_threshold(stopThr, torch.float64)
    K = -Mt.double() / reg
    logA = (At.double().T + 1e-300).log()  # [k, n]
    log_v = torch.zeros(k, n, dtype=torch.float64, device=At.device)
    log_u = log_q = torch.zeros(n, dtype=torch.float64, device=At.device)
    err, it = float("inf"), 0
    for it in range(1, numItermax + 1):
        previous = (log_u, log_v) if it > 1 else None
        log_u = fi * (logA - torch.logsumexp(K[None] + log_v[:, None, :], dim=-1))
        log_Ktu = torch.logsumexp(K[None] + log_u[:, :, None], dim=1)  # [k, n]
        log_q = torch.logsumexp((1 - fi) * log_Ktu + w.log()[:, None], dim=0) / (1 - fi)
        log_v = fi * (log_q[None] - log_Ktu)
        if previous is not None:
            err = max(float((log_u - previous[0]).abs().max()), float((log_v - previous[1]).abs().max()))
        if err <= tol:
            break
    if err > tol:
        _core.not_converged("barycenter_unbalanced")
    if verbose:
        print(f"barycenter_unbalanced: {it} iterations, error {err:.3e}")
    q = arrays.out(log_q.exp(), At.dtype)
    return (q, {"err": [err], "niter": it, "logu": arrays.out(log_u.T, At.dtype),
                "logv": arrays.out(log_v.T, At.dtype)}) if log else q


def barycenter_unbalanced_sinkhorn(A, M, reg, reg_m, weights=None, numItermax=1000, stopThr=1e-6, verbose=False,
                                   log=False):
    """:func:`barycenter_unbalanced` with ``method="sinkhorn"``."""
    return barycenter_unbalanced(A, M, reg, reg_m, weights=weights, numItermax=numItermax, stopThr=stopThr,
                                 verbose=verbose, log=log)


def barycenter_unbalanced_stabilized(A, M, reg, reg_m, weights=None, tau=1e3, numItermax=1000, stopThr=1e-6,
                                     verbose=False, log=False):
    """:func:`barycenter_unbalanced` with ``method="sinkhorn_stabilized"`` (``tau`` checked)."""
    return barycenter_unbalanced(A, M, reg, reg_m, method="sinkhorn_stabilized", weights=weights,
                                 numItermax=numItermax, stopThr=stopThr, verbose=verbose, log=log, tau=tau)
