"""LogME's solvers, on inputs that :mod:`transferops.transferability` has checked: the reference
backend (one symmetric eigendecomposition per model) and the native one (no eigenvector), and
the pieces :class:`~transferops.transferability.LogMEStream` finishes with.

LogME (You et al., ICML 2021; the fixed-point solver of You et al., JMLR 2022, Alg. 2): the
log marginal evidence per sample of Bayesian linear regression y = F w + noise with prior
w ~ N(0, 1/alpha), noise ~ N(0, 1/beta), maximized over alpha and beta, averaged over the
one-hot class indicators (or regression targets). With F^T F = V diag(sigma) V^T of rank k and
x = the projection of y on F's left singular vectors, the evidence is (eq. 2 of the ICML paper)

    L = D/2 log(alpha) + N/2 log(beta) - 1/2 sum_i log(alpha + beta sigma_i)
        - beta/2 |y - F m|^2 - alpha/2 |m|^2 - N/2 log(2 pi),

the sum running over all D eigenvalues (sigma_i = 0 past the rank). The fixed point iterates
t = alpha / beta: gamma = sum sigma/(sigma + t), alpha = gamma / |m|^2, beta = (N - gamma) /
|y - F m|^2.

The reference backend takes one Gram matrix and a full symmetric eigendecomposition per model,
then runs the fixed point of every target at once. The native backend (CPU) reduces the float64
Gram matrix (BLAS syrk) to tridiagonal form, takes its eigenvalues and projects the targets
through the Householder reflectors (LAPACK sytrd, sterf, ormqr from scipy, called from C++);
each fixed-point update of each target is then an O(D) tridiagonal solve. Its cost is the Gram
matrix plus an eigenvalues-only solve.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ._backend import Op, _import, native_module, single_threaded_blas

# The official fixed point: alpha = beta = 1, at most 11 updates, stop when t moved by <= 1e-3
# relative; 1e-5 is added to the update denominators.
_OFFICIAL_ITERATIONS = 11
_OFFICIAL_TOL = 1e-3
_OFFICIAL_DAMP = 1e-5
_OFFICIAL_RANK_CUT = 1e-10  # singular values of F at or below this are dropped (N > D only)


def _rank_rule(eigenvalues, N: int, D: int, compat: str, of_features: bool):
    """Which eigenvalues of the Gram matrix (F^T F if ``of_features``, else F F^T; a torch or
    numpy vector) enter gamma and the log-determinant: (s, keep, extra) with s the singular
    values of F they stand for, ``keep`` a mask of them, and ``extra`` the log(alpha) terms the
    log-determinant gets besides (each zero eigenvalue's log(alpha + beta 0)).

    Corrected: s below max(N, D) * eps * the largest (numpy's matrix_rank) are zeros, and all
    D - k of them count. Official, N <= D: nothing dropped, no extra term (the defect). Official,
    N > D: the code takes the SVD of F^T F, whose singular values are the eigenvalues'
    magnitudes, and drops s = sqrt(|lambda|) <= 1e-10. A null direction's eigenvalue is rounding
    (~1e-16 |F|^2, either sign), so its s ~ 1e-8 |F| clears that cut: such directions stay in,
    each adding log(alpha) as in the corrected mode, and only features of scale ~1e-5 or less
    lose any. LAPACK's SVD returns such rounding values even for zero columns, where a symmetric
    eigensolver can return an exact 0: those count as kept zeros too."""
    if compat == "official" and of_features:
        s = abs(eigenvalues) ** 0.5
        keep = s > _OFFICIAL_RANK_CUT
        return s, keep, int((s == 0).sum())
    s = eigenvalues.clip(0, None) ** 0.5
    if compat == "official":
        return s, s >= 0, 0
    keep = s > float(s.max()) * max(N, D) * np.finfo(np.float64).eps
    return s, keep, D - int(keep.sum())


def _spectrum(F: torch.Tensor, Y: torch.Tensor, compat: str):
    """(sigma [k], X [k, K], basis, scale, extra) from one symmetric eigensolve of the smaller
    Gram matrix: sigma the eigenvalues of F^T F that :func:`_rank_rule` keeps, X the targets
    projected on the matching left singular vectors of F, extra that rule's count of log(alpha)
    terms; the posterior mean weights of a target are m = basis @ (scale * x / (t + sigma))."""
    N, D = F.shape
    if N > D:
        return _gram_spectrum(F.T @ F, F.T @ Y, N, D, compat)
    eigenvalues, U = torch.linalg.eigh(F @ F.T)
    s, keep, extra = _rank_rule(eigenvalues, N, D, compat, False)
    U = U[:, keep]
    return s[keep] ** 2, U.T @ Y, F.T @ U, torch.ones_like(s[keep]), extra


def _gram_spectrum(G: torch.Tensor, B: torch.Tensor, N: int, D: int, compat: str):
    """:func:`_spectrum` of N > D features from their Gram matrix G = F^T F and B = F^T Y."""
    eigenvalues, V = torch.linalg.eigh(G)
    s, keep, extra = _rank_rule(eigenvalues, N, D, compat, True)
    s, V = s[keep], V[:, keep]
    return s * s, (V.T @ B) / s[:, None], V, s, extra


def _fixed_point(sigma: torch.Tensor, X: torch.Tensor, y2: torch.Tensor, N: int, D: int, extra: int):
    """The fixed-point iterations of every target (column of X) at once, ``extra`` zero
    eigenvalues besides sigma in the log-determinant (see _rank_rule), each frozen once it
    converges as the official per-class loop breaks. Returns (evidence / N, alpha, beta, t)
    per target, t = alpha/beta at the start of the last update (what the official m uses), and
    the evidence with the new alpha, beta but the last update's residual and |m|^2 terms."""
    sig = sigma[:, None]
    x2 = X * X
    res_x2 = y2 - x2.sum(0)
    K = X.shape[1]
    alpha = torch.ones(K, dtype=torch.float64, device=X.device)
    beta = torch.ones_like(alpha)
    t_used, m2_used, res2_used = torch.ones_like(alpha), torch.zeros_like(alpha), torch.zeros_like(alpha)
    active = torch.ones(K, dtype=torch.bool, device=X.device)
    for _ in range(_OFFICIAL_ITERATIONS):
        t = alpha / beta
        gamma = (sig / (sig + t)).sum(0)
        m2 = (sig * x2 / (t + sig) ** 2).sum(0)
        res2 = (x2 / (1 + sig / t) ** 2).sum(0) + res_x2
        new_alpha = gamma / (m2 + _OFFICIAL_DAMP)
        new_beta = (N - gamma) / (res2 + _OFFICIAL_DAMP)
        alpha, beta = torch.where(active, new_alpha, alpha), torch.where(active, new_beta, beta)
        t_used, m2_used, res2_used = (torch.where(active, t, t_used), torch.where(active, m2, m2_used),
                                      torch.where(active, res2, res2_used))
        active = active & ((new_alpha / new_beta - t).abs() / t > _OFFICIAL_TOL)
        if not bool(active.any()):
            break
    logdet = torch.log(alpha + beta * sig).sum(0) + extra * torch.log(alpha)
    evidence = (D / 2 * torch.log(alpha) + N / 2 * torch.log(beta) - 0.5 * logdet - beta / 2 * res2_used
                - alpha / 2 * m2_used - N / 2 * math.log(2 * math.pi))
    return evidence / N, alpha, beta, t_used


def _scipy_reason(*_) -> str | None:
    return None if _import("scipy.linalg")[0] is not None else \
        "native logme calls LAPACK through scipy, which is not installed (pip install scipy)"


logme_op = Op("logme", order=("native", "reference"))


@logme_op.register("reference", dtypes=(torch.float64,))
def _logme_reference(feats: list[torch.Tensor], Y: torch.Tensor, classes, compat: str, with_params: bool):
    scores, params = [], []
    for f in feats:
        F = f.to(torch.float64)
        N, D = F.shape
        sigma, X, basis, scale, extra = _spectrum(F, Y, compat)
        evidence, alpha, beta, t = _fixed_point(sigma, X, (Y * Y).sum(0), N, D, extra)
        scores.append(evidence.mean())
        if with_params:
            m = (basis @ (scale[:, None] * X / (t + sigma[:, None]))).T  # [K, D]
            params.append({"alpha": alpha, "beta": beta, "m": m, "evidence": evidence})
    return torch.stack(scores), params


@functools.lru_cache(maxsize=None)
def _lapack() -> dict:
    """scipy's LAPACK routines as capsules (scipy.linalg.cython_lapack) for the native module,
    which links no LAPACK of its own."""
    from scipy.linalg import cython_lapack

    return {name: cython_lapack.__pyx_capi__[name] for name in ("dsytrd", "dsterf", "dormqr")}


@dataclass
class _Reduced:
    """A float64 Gram matrix H reduced in place to tridiagonal T = Q^T H Q (LAPACK sytrd, Q kept
    as reflectors in ``gram``), T's eigenvalues (sterf, ascending; rounding can make some of a
    null space negative) and the targets multiplied by Q^T: an eigenvalues-only solve that
    still projects, with no eigenvector formed."""
    gram: np.ndarray
    diag: np.ndarray
    off: np.ndarray
    tau: np.ndarray
    eigenvalues: np.ndarray
    projected: np.ndarray  # Q^T (targets) [n, K]

    def apply_q(self, X: np.ndarray) -> np.ndarray:
        """Q X for X [n, K]."""
        out = np.array(X, dtype=np.float64, order="F")
        native_module().tridiagonal_apply_q(_lapack(), self.gram, self.tau, out, False)
        return out


# Up to this size one thread reduces a Gram matrix faster than two (measured on a 2-core EPYC).
_SINGLE_THREAD_SYTRD = 1024


def _reduce(grams: list[np.ndarray], targets: list[np.ndarray]) -> list[_Reduced]:
    """Reduce Gram matrices (column-major, lower triangle; overwritten) and project their targets
    ([n, K] each). Several run on the OpenMP threads, one model each, with single-threaded
    LAPACK: sytrd is half matrix-vector products, memory-bound work that two threads of one
    call share badly; so does one small matrix."""
    projected = [np.array(t, dtype=np.float64, order="F") for t in targets]
    across_models = len(grams) > 1
    if across_models or grams[0].shape[0] <= _SINGLE_THREAD_SYTRD:
        limit = single_threaded_blas()
    else:
        limit = contextlib.nullcontext()
    with limit:
        out = native_module().tridiagonalize(_lapack(), grams, projected, across_models)
    return [_Reduced(g, d, e, tau, sigma, p)
            for g, p, (d, e, tau, sigma) in zip(grams, projected, out)]


def _logme_evidence(red: _Reduced, y2: np.ndarray, N: int, D: int, of_features: bool, compat: str,
                    with_params: bool):
    """Evidence per target from a reduced Gram matrix H = F^T F (``of_features``, targets F^T Y)
    or F F^T (targets Y), as :func:`_fixed_point` but with O(n) tridiagonal solves per update
    instead of eigenvectors (see cpu::LogmeSpectrum), with the eigenvalues :func:`_rank_rule`
    keeps in gamma and the log-determinant and its log(alpha) terms besides. With
    ``with_params`` also alpha, beta and Q z, from which the posterior mean weights are m = Q z
    (F^T F) or F^T Q z (F F^T)."""
    s, keep, extra = _rank_rule(red.eigenvalues, N, D, compat, of_features)
    sigma = np.sort(np.where(keep, s * s, 0.0))  # the kept ones last: [first, n)
    first = s.size - int(keep.sum())
    evidence, alpha, beta, _, z = native_module().logme_fixed_point(
        red.diag, red.off, sigma, first, extra, N, D, of_features, np.ascontiguousarray(red.projected.T), y2,
        _OFFICIAL_ITERATIONS, _OFFICIAL_TOL, _OFFICIAL_DAMP, with_params)
    params = {"alpha": alpha, "beta": beta, "evidence": evidence, "Qz": red.apply_q(z.T)} if with_params else None
    return evidence, params


def _params_tensors(p: dict, m: np.ndarray) -> dict:
    return {"alpha": torch.from_numpy(p["alpha"]), "beta": torch.from_numpy(p["beta"]),
            "m": torch.from_numpy(np.ascontiguousarray(m)), "evidence": torch.from_numpy(p["evidence"])}


def _features_times_targets(F64: torch.Tensor, Y: torch.Tensor, classes: torch.Tensor | None) -> np.ndarray:
    """F^T Y [D, K] for float64 CPU tensors F [N, D] and Y [N, K]: of a one-hot Y (``classes``
    its ids) the class sums of F's rows, which read F once and skip the zeros' products; else a
    GEMM through scipy's BLAS, not numpy's, so that one OpenBLAS thread pool runs (see the
    package's OPENBLAS_THREAD_TIMEOUT)."""
    if classes is not None:
        return torch.zeros(Y.shape[1], F64.shape[1], dtype=torch.float64).index_add_(0, classes, F64).numpy().T
    return _import("scipy.linalg")[0].blas.dgemm(1.0, F64.numpy().T, Y.numpy())


@logme_op.register("native", dtypes=(torch.float64,), limit=_scipy_reason)
def _logme_native(feats: list[torch.Tensor], Y: torch.Tensor, classes: torch.Tensor | None, compat: str,
                  with_params: bool):
    """``classes``: the class ids behind one-hot ``Y`` (None for regression targets). Models go
    in groups of one per OpenMP thread: the Gram matrices one after the other (syrk uses every
    core well), then the group's reductions side by side (see :func:`_reduce`)."""
    blas = _import("scipy.linalg")[0].blas
    Yn = Y.numpy()
    y2 = (Yn * Yn).sum(0)
    group = native_module().omp_max_threads() if len(feats) > 1 else 1
    scores, params = [], []
    for start in range(0, len(feats), group):
        models, grams, targets = [], [], []
        for f in feats[start:start + group]:
            F64 = f.to(torch.float64).contiguous()
            N, D = F64.shape
            of_features = N > D
            # syrk fills one triangle: half the GEMM's flops. F.T is F's memory in Fortran order.
            grams.append(blas.dsyrk(1.0, F64.numpy().T, trans=0 if of_features else 1, lower=1))
            targets.append(_features_times_targets(F64, Y, classes) if of_features else Yn)
            models.append((F64 if with_params and not of_features else None, N, D, of_features))
        for (F64, N, D, of_features), red in zip(models, _reduce(grams, targets)):
            evidence, p = _logme_evidence(red, y2, N, D, of_features, compat, with_params)
            scores.append(float(evidence.mean()))
            if with_params:
                params.append(_params_tensors(p, (p["Qz"] if of_features else blas.dgemm(1.0, F64.numpy().T, p["Qz"])).T))
    return torch.tensor(scores, dtype=torch.float64), params
