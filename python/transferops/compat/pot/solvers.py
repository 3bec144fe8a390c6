"""POT's unified solvers ``ot.solve`` (a cost matrix) and ``ot.solve_sample`` (two point
clouds), returning an :class:`OTResult` with POT's attributes.

Provided, as in POT 0.9.7: exact OT (``reg`` None or 0: :func:`ot.lp.emd2`),
balanced entropic OT (``reg_type`` "KL" or "entropy": :func:`ot.sinkhorn`, the plan POT's
``sinkhorn_log`` converges to) and entropic unbalanced OT with KL marginals (``unbalanced``:
:func:`ot.unbalanced.sinkhorn_unbalanced`); with ``lazy=True`` the exact and balanced entropic
solves of :func:`solve_sample`. Everything else POT offers raises NotImplementedError naming the
argument: exact unbalanced OT, ``reg_type`` "L2" or a (f, df) pair, ``unbalanced_type`` "L2" or
"TV", ``method`` "mm" / "lbfgsb" and the sample methods ("1d", "gaussian", "lowrank",
"nystroem", "factored", "sliced", "geomloss", "bsp", ...), ``debias="split"``, ``scaler``, and
a reference ``c`` for balanced entropic OT (POT ignores it there).

``grad`` (balanced entropic OT, as in POT): "autodiff" differentiates the plan and values in
M, a and b (implicitly at the converged plan, which POT's unrolled iterations converge to),
"envelope" only the value (d/dM = P, d/da, d/db the centred potentials times reg), "last_step"
one Sinkhorn step from the converged potentials, "detach" nothing; "detach" also detaches the
exact and unbalanced results (POT leaves them differentiable).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import scipy.sparse
import torch

from ... import _checks, _ot_checks
from ._core import Arrays
from . import _core
from .lp import check_number_threads, with_gradients
from .utils import dist

__all__ = ["OTResult", "solve", "solve_sample"]

METHODS = ("sinkhorn", "sinkhorn_log", "mm", "lbfgsb")  # POT's methods of solve
SAMPLE_METHODS = ("1d", "gaussian", "gaussian_hd", "lowrank", "nystroem", "factored", "geomloss", "geomloss_auto",
                  "geomloss_tensorized", "geomloss_online", "geomloss_multiscale", "sliced", "max_sliced", "bsp")
GRADS = ("autodiff", "envelope", "last_step", "detach")


class OTResult:
    """POT's ``OTResult``: ``value`` (the objective), ``value_linear`` (<M, P>), ``plan``,
    ``potentials`` (``potential_a``, ``potential_b``), ``marginals`` (``marginal_a``,
    ``marginal_b``: the plan's sums), ``sparse_plan``, ``lazy_plan``, ``status``, ``log``;
    None where the solver gives none. ``value_quad`` is None (no Gromov-Wasserstein here)."""

    def __init__(self, potentials=None, value=None, value_linear=None, value_quad=None, plan=None, log=None,
                 sparse_plan=None, lazy_plan=None, status=None, batch_size=100):
        self._potentials, self._value, self._value_linear, self._value_quad = potentials, value, value_linear, value_quad
        self._plan, self._log, self._sparse_plan, self._lazy_plan = plan, log, sparse_plan, lazy_plan
        self._status, self._batch_size = status, batch_size
        # POT's results name their array backend here, and code written against POT (its own
        # test helpers) reads it; None: the arrays are numpy or torch as the inputs were.
        self._backend = None

    def __repr__(self):
        parts = [f"{k}={v}" for k, v in (("value", self._value), ("value_linear", self._value_linear)) if v is not None]
        parts += [f"{k}={type(v).__name__}(shape={tuple(v.shape)})" for k, v in (("plan", self._plan),
                                                                                ("lazy_plan", self._lazy_plan))
                  if v is not None]
        return f"OTResult({','.join(parts)})"

    potentials = property(lambda self: self._potentials, doc="The dual potentials (a's, b's) or None.")
    potential_a = property(lambda self: None if self._potentials is None else self._potentials[0])
    potential_b = property(lambda self: None if self._potentials is None else self._potentials[1])
    value = property(lambda self: self._value, doc="The objective, regularization included.")
    value_linear = property(lambda self: self._value_linear, doc="<M, P>.")
    value_quad = property(lambda self: self._value_quad)
    lazy_plan = property(lambda self: self._lazy_plan)
    status = property(lambda self: self._status)
    log = property(lambda self: self._log)

    @property
    def plan(self):
        """The plan, dense (a lazy plan stays in ``lazy_plan``)."""
        return self._plan

    @property
    def sparse_plan(self):
        """The plan in scipy's CSR for numpy results; tensors stay dense, as POT's torch backend
        returns them."""
        if self._plan is None or isinstance(self._plan, torch.Tensor):
            return self._plan
        return scipy.sparse.csr_matrix(self._plan)

    @property
    def marginals(self):
        return None if self._plan is None else (self.marginal_a, self.marginal_b)

    def _marginal(self, axis: int):
        if self._plan is not None:
            return self._plan.sum(axis)
        if self._lazy_plan is None:
            return None
        # A lazy plan is summed in blocks of batch_size rows, never formed whole.
        n = self._lazy_plan.shape[0]
        blocks = [self._lazy_plan[i:i + self._batch_size] for i in range(0, n, self._batch_size)]
        if axis == 1:
            sums = [blk.sum(1) for blk in blocks]
            return torch.cat(sums) if isinstance(sums[0], torch.Tensor) else np.concatenate(sums)
        return sum(blk.sum(0) for blk in blocks)

    marginal_a = property(lambda self: self._marginal(1), doc="P 1 (or None).")
    marginal_b = property(lambda self: self._marginal(0), doc="P^T 1 (or None).")

    @property
    def a_to_b(self):
        raise NotImplementedError("a_to_b: not provided (nor by POT)")

    @property
    def b_to_a(self):
        raise NotImplementedError("b_to_a: not provided (nor by POT)")


def _number(value, name: str, default):
    value = _core.number(value, name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0 or None, got {value!r}")
    return float(value)


def _lower(value, name: str) -> str:
    if isinstance(value, tuple):
        raise NotImplementedError(f"{name}: a (function, gradient) pair (POT's generic conditional-gradient solver) "
                                  "is not provided")
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {value!r}")
    return value.lower()


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def solve(M, a=None, b=None, reg=None, c=None, reg_type="KL", unbalanced=None, unbalanced_type="KL", method=None,
          n_threads=1, max_iter=None, plan_init=None, potentials_init=None, tol=None, verbose=False,
          grad="autodiff"):
    """The OT problem of costs M [n, m] and weights a [n], b [m] (None: uniform): exact, entropic
    (``reg`` > 0, ``reg_type``) and/or unbalanced (``unbalanced``: KL weights, a number or one per
    marginal), as an :class:`OTResult` (see the module docstring for what is provided).
    ``c``: the regularization's reference measure [n, m] (entropic unbalanced OT; unused, as
    everywhere in POT, when ``reg`` is 0). ``max_iter``, ``tol``: POT's defaults per solver (exact: 1e6 simplex iterations; entropic:
    1000 iterations, 1e-9). ``n_threads``: :func:`ot.emd2`'s ``numThreads``. ``potentials_init``:
    the exact solve's ``potentials_init`` or the unbalanced solve's ``warmstart`` (checked; the
    solvers converge from their own start). ``plan_init`` [n, m]: checked; POT uses it only in
    the solvers not provided here."""
    if method is not None and method not in METHODS:
        raise ValueError(f"method: unknown method {method!r} for solve; expected one of {list(METHODS)}")
    if method in ("mm", "lbfgsb"):
        raise NotImplementedError(f"method: {method!r} (POT's unbalanced {method} solver) is not provided; leave "
                                  "method=None")
    if grad not in GRADS:
        raise ValueError(f"grad: expected one of {list(GRADS)}, got {grad!r}")
    arrays = Arrays(M=M, a=a, b=b, c=c, plan_init=plan_init)
    Mt = arrays.tensor(M, "M", (2,))
    if plan_init is not None and tuple(arrays.tensor(plan_init, "plan_init", (2,)).shape) != tuple(Mt.shape):
        raise ValueError(f"plan_init: expected a plan of M's shape {tuple(Mt.shape)}")
    if c is not None and tuple(arrays.tensor(c, "c", (2,)).shape) != tuple(Mt.shape):
        raise ValueError(f"c: expected a reference measure of M's shape {tuple(Mt.shape)}")
    check_number_threads(n_threads, "n_threads")
    reg = _number(reg, "reg", 0.0)
    # Checked here under solve's names; the solvers below check them again under theirs.
    if max_iter is not None:
        _checks.count(max_iter, "max_iter", high=_ot_checks.MAX_ITER)
    _number(tol, "tol", None)
    if reg == 0:
        if unbalanced is not None:
            raise NotImplementedError("unbalanced: exact unbalanced OT (reg None or 0; POT's mm_unbalanced and "
                                      "lbfgsb_unbalanced) is not provided; pass reg > 0 for entropic unbalanced OT")
        res = _exact(M, a, b, n_threads, max_iter, potentials_init)
    elif unbalanced is None:
        res = _entropic(arrays, Mt, M, a, b, reg, c, _lower(reg_type, "reg_type"), max_iter, tol, verbose, grad,
                        potentials_init)
    else:
        kinds = (_lower(reg_type, "reg_type"), _lower(unbalanced_type, "unbalanced_type"))
        if kinds != ("kl", "kl"):
            raise NotImplementedError(f"reg_type, unbalanced_type: {reg_type!r} with {unbalanced_type!r} (POT's "
                                      "L-BFGS-B unbalanced solver) is not provided; entropic unbalanced OT takes "
                                      "reg_type='KL' and unbalanced_type='KL'")
        res = _unbalanced(M, a, b, reg, unbalanced, c, potentials_init, max_iter, tol, verbose)
    if grad == "detach":
        res = OTResult(potentials=None if res.potentials is None else tuple(map(_detach, res.potentials)),
                       value=_detach(res.value), value_linear=_detach(res.value_linear), plan=_detach(res.plan),
                       status=res.status)
    return res


def _exact(M, a, b, n_threads, max_iter, potentials_init) -> OTResult:
    from .lp import emd2
    value, log = emd2(a, b, M, numItermax=1000000 if max_iter is None else max_iter, log=True, return_matrix=True,
                      numThreads=n_threads, potentials_init=potentials_init)
    return OTResult(potentials=(log["u"], log["v"]), value=value, value_linear=value, plan=log["G"],
                    status=log["warning"] or "Converged")


def _entropic(arrays, Mt, M, a, b, reg, c, reg_type, max_iter, tol, verbose, grad, potentials_init) -> OTResult:
    """Balanced entropic OT, as POT's solve runs ``sinkhorn_log`` and reports its values."""
    from .bregman import sinkhorn
    if reg_type not in ("kl", "entropy"):
        raise NotImplementedError(f"reg_type: {reg_type!r} is not provided (POT: 'L2' by its smooth dual solver); "
                                  "expected 'KL' or 'entropy'")
    if c is not None:
        raise NotImplementedError("c: balanced entropic OT takes the reference a b^T here (POT ignores c there); "
                                  "pass c=None, or unbalanced=... for the solve that uses c")
    max_iter = 1000 if max_iter is None else _checks.count(max_iter, "max_iter")
    if grad == "last_step" and max_iter == 0:
        raise ValueError("max_iter: grad='last_step' needs max_iter >= 1 (its last iteration is the differentiated "
                         "step)")
    n, m = Mt.shape
    at, bt = _core.weights(arrays, a, n, "a", Mt), _core.weights(arrays, b, m, "b", Mt)
    Ms, as_, bs = (Mt, at, bt) if grad == "autodiff" else (Mt.detach(), at.detach(), bt.detach())
    conv = (lambda t: t) if arrays.torch else (lambda t: t.numpy())
    # POT iterates max_iter times (max_iter - 1 before last_step's step); this solver needs 1 at least.
    P, log = sinkhorn(conv(as_), conv(bs), conv(Ms), reg, method="sinkhorn_log",
                      numItermax=max(max_iter - (grad == "last_step"), 1), stopThr=1e-9 if tol is None else tol,
                      verbose=verbose, log=True, warmstart=potentials_init)
    P, lu, lv = (arrays.tensor(x, name) for x, name in ((P, "plan"), (log["log_u"], "log_u"), (log["log_v"], "log_v")))
    if grad == "last_step":  # one step of each update, from the other's converged potential, on the inputs
        lv_new = bt.log() - torch.logsumexp(-Mt / reg + lu[:, None], 0)
        lu = at.log() - torch.logsumexp(-Mt / reg + lv[None, :], 1)
        lv = lv_new
        P = (-Mt / reg + lu[:, None] + lv[None, :]).exp()
    linear = (Ms * P).sum()
    if reg_type == "entropy":
        value = linear + reg * (P * (P + 1e-16).log()).sum()
    else:  # POT's KL, with its offsets that keep zero weights finite
        ref = as_[:, None] * bs[None, :] + 1e-15
        value = linear + reg * (P * (P / ref + 1e-16).log()).sum()
    if grad == "envelope":
        value = with_gradients(value.detach(), [(M, P.detach()), (a, reg * (lu - lu.mean()).detach()),
                                                (b, reg * (lv - lv.mean()).detach())])
    out = (lambda t: _core.scalar(arrays.out(t, Mt.dtype)))
    return OTResult(potentials=(out(lu), out(lv)), value=out(value), value_linear=out(linear), plan=out(P))


def _unbalanced(M, a, b, reg, unbalanced, c, potentials_init, max_iter, tol, verbose) -> OTResult:
    from .unbalanced import sinkhorn_unbalanced
    P, log = sinkhorn_unbalanced([] if a is None else a, [] if b is None else b, M, reg, unbalanced, reg_type="kl",
                                 c=c, warmstart=potentials_init, numItermax=1000 if max_iter is None else max_iter,
                                 stopThr=1e-9 if tol is None else tol, verbose=verbose, log=True)
    return OTResult(potentials=(log["logu"], log["logv"]), value=_core.scalar(log["total_cost"]),
                    value_linear=_core.scalar(log["cost"]), plan=P)


def _method_only(**named) -> None:
    """Parameters of POT's sample methods (none provided here): only their defaults pass."""
    defaults = {"rank": 100, "scaling": 0.95, "X_init": None, "random_state": None, "n_projections": 50,
                "projections": None, "scaler": None}
    for name, value in named.items():
        if value is not defaults[name] and not (isinstance(value, numbers.Number) and value == defaults[name]):
            raise NotImplementedError(f"{name}: used by POT's sample methods ('lowrank', 'nystroem', 'factored', "
                                      "'gaussian_hd', 'sliced', ...) or its data scaling, which are not provided")


def solve_sample(X_a, X_b, a=None, b=None, metric="sqeuclidean", reg=None, c=None, reg_type="KL", unbalanced=None,
                 unbalanced_type="KL", lazy=False, batch_size=None, method=None, n_threads=1, max_iter=None,
                 plan_init=None, rank=100, scaling=0.95, potentials_init=None, X_init=None, tol=None, verbose=False,
                 grad="autodiff", random_state=None, debias=False, n_projections=50, projections=None, scaler=None):
    """:func:`solve` on the costs ``dist(X_a, X_b, metric)`` between samples X_a [n, d] and
    X_b [m, d]. ``lazy=True``: exact OT as :func:`solve` (POT's lazy network simplex keeps M
    implicit; ours stores it), balanced entropic OT without storing M (``lazy_plan`` holds the
    plan as blocks computed on demand; ``value`` None and no gradients, as POT). ``debias=True``:
    the values of (X_a, X_b) minus half those of (X_a, X_a) and (X_b, X_b), with the (X_a, X_b)
    plan and potentials, and the three results in ``log`` (POT's ``res_ab``, ``res_aa``,
    ``res_bb``). ``batch_size``: the lazy solve's tile rows (default 100). POT's sample-method
    parameters (``rank``, ``scaling``, ``X_init``, ``random_state``, ``n_projections``,
    ``projections``) and ``scaler`` are accepted at their defaults only."""
    if method is not None and (not isinstance(method, str) or method.lower() not in METHODS + SAMPLE_METHODS):
        raise ValueError(f"method: unknown method {method!r} for solve_sample; expected one of "
                         f"{list(METHODS + SAMPLE_METHODS)}")
    if method is not None and method.lower() in SAMPLE_METHODS:
        raise NotImplementedError(f"method: {method!r} (POT's large-scale sample solver) is not provided; "
                                  "method=None solves the exact or entropic problem")
    _method_only(rank=rank, scaling=scaling, X_init=X_init, random_state=random_state, n_projections=n_projections,
                 projections=projections, scaler=scaler)
    if batch_size is not None:
        _checks.count(batch_size, "batch_size", low=1)
    if not isinstance(lazy, bool):
        raise ValueError(f"lazy: expected a bool, got {lazy!r}")
    kw = dict(metric=metric, reg=reg, c=c, reg_type=reg_type, unbalanced=unbalanced, unbalanced_type=unbalanced_type,
              lazy=lazy, batch_size=batch_size, method=method, n_threads=n_threads, max_iter=max_iter,
              plan_init=plan_init, potentials_init=potentials_init, tol=tol, verbose=verbose, grad=grad)
    if debias is True:
        ab = solve_sample(X_a, X_b, a, b, **kw)
        aa = solve_sample(X_a, X_a, a, a, **kw)
        bb = solve_sample(X_b, X_b, b, b, **kw)
        value = None if ab.value is None else ab.value - 0.5 * (aa.value + bb.value)
        linear = ab.value_linear - 0.5 * (aa.value_linear + bb.value_linear)
        return OTResult(potentials=ab.potentials, value=value, value_linear=linear, plan=ab.plan,
                        lazy_plan=ab.lazy_plan, status=ab.status, log={"res_aa": aa, "res_bb": bb, "res_ab": ab})
    if debias == "split":
        raise NotImplementedError("debias: 'split' (POT's minibatch debiasing on random halves) is not provided; "
                                  "debias=True debiases on the whole samples")
    if debias is not False:
        raise ValueError(f"debias: expected True, False or 'split', got {debias!r}")
    if lazy and reg not in (None, 0):
        if unbalanced is not None:
            raise NotImplementedError("unbalanced: lazy=True solves balanced OT only (as POT); pass lazy=False")
        return _lazy_entropic(X_a, X_b, a, b, metric, reg, c, reg_type, batch_size, max_iter, tol, verbose, grad,
                              plan_init, potentials_init)
    if lazy and unbalanced is not None:
        raise NotImplementedError("unbalanced: lazy=True solves balanced OT only (as POT); pass lazy=False")
    return solve(dist(X_a, X_b, metric=metric), a, b, reg, c, reg_type, unbalanced, unbalanced_type, method,
                 n_threads, max_iter, plan_init, potentials_init, tol, verbose, grad)


def _lazy_entropic(X_a, X_b, a, b, metric, reg, c, reg_type, batch_size, max_iter, tol, verbose, grad, plan_init,
                   potentials_init) -> OTResult:
    """POT's lazy entropic solve_sample: <M, P>, the log-potentials and the lazy plan, M never
    stored; the samples are detached (POT computes this branch in numpy)."""
    from .bregman import empirical_sinkhorn2
    if _lower(reg_type, "reg_type") not in ("kl", "entropy") or c is not None:
        raise NotImplementedError("reg_type, c: lazy=True solves entropic OT with the reference a b^T only")
    for name, value in (("plan_init", plan_init), ("potentials_init", potentials_init)):
        if value is not None:
            raise NotImplementedError(f"{name}: not taken by the lazy entropic solve (nor by POT's)")
    if grad not in GRADS:
        raise ValueError(f"grad: expected one of {list(GRADS)}, got {grad!r}")
    value, log = empirical_sinkhorn2(_detach(X_a), _detach(X_b), reg, _detach(a), _detach(b), metric=metric,
                                     numIterMax=1000 if max_iter is None else max_iter,
                                     stopThr=1e-9 if tol is None else tol, isLazy=True,
                                     batchSize=100 if batch_size is None else batch_size, verbose=verbose, log=True)
    return OTResult(potentials=(log["u"], log["v"]), value_linear=value, lazy_plan=log["lazy_plan"],
                    batch_size=100 if batch_size is None else batch_size, log=log)
