"""LogME's solvers, on inputs that :mod:`transferops.transferability` has checked: the reference
backend (one symmetric eigendecomposition per model), the triton one (every model's
eigendecomposition batched, every fixed point in one kernel launch) and the native one (CPU,
no eigenvector), and :func:`logme_from_grams`, which finishes from accumulated Gram matrices
(:class:`~transferops.transferability.LogMEStream`, rank_models) on any of them.

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

The reference backend takes one Gram matrix (the smaller of F^T F and F F^T) and a full
symmetric eigendecomposition per model, then runs the fixed point of every target at once.
The triton backend (CUDA) forms the same Gram matrices, stacks those of one width and takes
their eigendecompositions in one batched call, then runs the fixed points of every model and
target in one Triton kernel (kernels/logme.py), all in float64: rounding of the Gram matrix
and of the eigenvalues near the rank cut decides which directions count, and the evidence sums
N log terms. The native backend (CPU) reduces the float64 Gram matrix (BLAS syrk) to
tridiagonal form, takes its eigenvalues and projects the targets through the Householder
reflectors (LAPACK sytrd, sterf, ormqr from scipy, called from C++); each fixed-point update
of each target is then an O(D) tridiagonal solve. Its cost is the Gram matrix plus an
eigenvalues-only solve.
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


def _rank_rule(eigenvalues: torch.Tensor, N: int, D: int, compat: str, of_features: bool):
    """Which eigenvalues of the Gram matrices (F^T F if ``of_features``, else F F^T; float64
    [..., n], batched over the leading dimensions) enter gamma and the log-determinant:
    (s, keep, extra) with s the singular values of F they stand for, ``keep`` a mask of them,
    and ``extra`` [...] the log(alpha) terms the log-determinant gets besides (each zero
    eigenvalue's log(alpha + beta 0)).

    Corrected: s below max(N, D) * eps * the largest (numpy's matrix_rank) are zeros, and all
    D - k of them count. Official, N <= D: nothing dropped, no extra term (the defect). Official,
    N > D: the code takes the SVD of F^T F, whose singular values are the eigenvalues'
    magnitudes, and drops s = sqrt(|lambda|) <= 1e-10. A null direction's eigenvalue is rounding
    (~1e-16 |F|^2, either sign), so its s ~ 1e-8 |F| clears that cut: such directions stay in,
    each adding log(alpha) as in the corrected mode, and only features of scale ~1e-5 or less
    lose any. LAPACK's SVD returns such rounding values even for zero columns, where a symmetric
    eigensolver can return an exact 0: those count as kept zeros too."""
    if compat == "official" and of_features:
        s = eigenvalues.abs().sqrt()
        return s, s > _OFFICIAL_RANK_CUT, (s == 0).sum(-1)
    s = eigenvalues.clamp(min=0).sqrt()
    if compat == "official":
        return s, s >= 0, torch.zeros_like(s[..., 0], dtype=torch.int64)
    keep = s > s.amax(-1, keepdim=True) * (max(N, D) * torch.finfo(torch.float64).eps)
    return s, keep, D - keep.sum(-1)


def _gram(f: torch.Tensor, Y: torch.Tensor):
    """(H, targets, D, of_features) of features f [N, D] and targets Y [N, K]: the smaller Gram
    matrix in float64, H = F^T F with F^T Y (N > D) or F F^T with Y."""
    F = f.to(torch.float64)
    N, D = F.shape
    if N > D:
        return F.mT @ F, F.mT @ Y, D, True
    return F @ F.mT, Y, D, False


def _spectrum(H: torch.Tensor, targets: torch.Tensor, N: int, D: int, of_features: bool, compat: str):
    """One symmetric eigensolve of Gram matrices H [..., n, n] (batched over the leading
    dimensions; see :func:`_gram`) and their targets [..., n, K]: (sigma [..., n], X [..., n, K],
    Q [..., n, n], scale [..., n], extra [...]). sigma are the eigenvalues of F^T F that
    :func:`_rank_rule` keeps and X the targets projected on the matching left singular vectors
    of F; an eigenvalue it drops stays in its slot as sigma = 0 with x = 0, which adds nothing to
    gamma, |m|^2 or the residual but log(alpha) to the log-determinant, so ``extra`` counts
    the log(alpha) terms besides the n slots' (negative where the official rule drops a
    nonzero eigenvalue). The posterior mean weights of a target, with t = alpha / beta, are
    m = Q (scale x / (t + sigma)) (N > D), or F^T times that (N <= D)."""
    eigenvalues, Q = torch.linalg.eigh(H)
    s, keep, extra = _rank_rule(eigenvalues, N, D, compat, of_features)
    projected = Q.mT @ targets
    if of_features:  # x = V^T F^T y / s
        X = torch.where(keep[..., None], projected / s[..., None], 0.0)
        scale = torch.where(keep, s, 0.0)
    else:  # x = U^T y
        X = projected * keep[..., None]
        scale = torch.ones_like(s)
    return torch.where(keep, s * s, 0.0), X, Q, scale, extra - (keep.shape[-1] - keep.sum(-1))


def _fixed_point(sigma: torch.Tensor, X: torch.Tensor, y2: torch.Tensor, N: int):
    """The fixed-point iterations of every target (column of X [n, K]) at once, sigma [n], y2
    the targets' |y|^2 [K], each target frozen once it converges as the official per-class loop
    breaks. Returns (alpha, beta, t, |m|^2, |y - F m|^2) per target: alpha, beta the last
    update's, t = alpha/beta at its start (what the official m uses), the last two what that
    update computed. kernels/logme.py runs the same iteration for many models at once."""
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
    return alpha, beta, t_used, m2_used, res2_used


def _evidence(alpha, beta, logdet, m2, res2, N: int, D):
    """The evidence per sample at the final alpha, beta with the last update's residual and
    |m|^2 (as the official code), ``logdet`` = sum_i log(alpha + beta sigma_i) over all D
    eigenvalues; D an int or a tensor broadcasting with the others."""
    return (D / 2 * torch.log(alpha) + N / 2 * torch.log(beta) - 0.5 * logdet - beta / 2 * res2
            - alpha / 2 * m2 - N / 2 * math.log(2 * math.pi)) / N


def _weights(Q, scale, X, sigma, t):
    """Q (scale x / (t + sigma)) [..., n, K] (see :func:`_spectrum`), t [..., K]."""
    return Q @ (scale[..., None] * X / (t[..., None, :] + sigma[..., None]))


def _params(alpha, beta, evidence, W) -> dict:
    """The return_params dict of one model; W [D, K] the posterior mean weights per target."""
    return {"alpha": alpha, "beta": beta, "m": W.mT, "evidence": evidence}


def _solve(H, targets, y2, N: int, D: int, of_features: bool, compat: str, with_params: bool):
    """The reference solve of one model from its Gram matrix: (evidence [K], alpha, beta, the
    weights of :func:`_weights` or None)."""
    sigma, X, Q, scale, extra = _spectrum(H, targets, N, D, of_features, compat)
    alpha, beta, t, m2, res2 = _fixed_point(sigma, X, y2, N)
    logdet = torch.log(alpha + beta * sigma[:, None]).sum(0) + extra * torch.log(alpha)
    evidence = _evidence(alpha, beta, logdet, m2, res2, N, D)
    return evidence, alpha, beta, (_weights(Q, scale, X, sigma, t) if with_params else None)


def _scipy_reason(*_) -> str | None:
    return None if _import("scipy.linalg")[0] is not None else \
        "native logme calls LAPACK through scipy, which is not installed (pip install scipy)"


logme_op = Op("logme", order=("triton", "native", "reference"))


@logme_op.register("reference", dtypes=(torch.float64,))
def _logme_reference(feats: list[torch.Tensor], Y: torch.Tensor, classes, compat: str, with_params: bool):
    y2 = (Y * Y).sum(0)
    scores, params = [], []
    N = Y.shape[0]
    for f in feats:
        H, targets, D, of_features = _gram(f, Y)
        evidence, alpha, beta, W = _solve(H, targets, y2, N, D, of_features, compat, with_params)
        scores.append(evidence.mean())
        if with_params:
            params.append(_params(alpha, beta, evidence, W if of_features else f.to(torch.float64).mT @ W))
    return torch.stack(scores), params


def _solve_batched(systems: list[tuple], y2: torch.Tensor, N: int, compat: str, with_params: bool):
    """The triton solve of M models from their Gram matrices, ``systems`` one (H, targets, D,
    of_features) per model (see :func:`_gram`): those of one width stacked into one batched
    eigendecomposition, then the fixed points of all M models and K targets in one kernel
    launch, their spectra packed one after the other. Returns (evidence [M, K], alpha, beta,
    per model the weights of :func:`_weights` or None), in the order of ``systems``."""
    from .kernels.logme import fixed_point

    groups: dict[tuple, list[int]] = {}
    for i, (H, _, D, of_features) in enumerate(systems):
        groups.setdefault((H.shape[-1], D, of_features), []).append(i)
    order, spectra = [], []
    for (n, D, of_features), members in groups.items():
        H = torch.stack([systems[i][0] for i in members])
        # F^T Y per model; Y itself is every F F^T model's target and broadcasts.
        targets = torch.stack([systems[i][1] for i in members]) if of_features else systems[members[0]][1]
        spectra.append(_spectrum(H, targets, N, D, of_features, compat))
        order += members
    K, device = y2.shape[0], y2.device
    out = fixed_point(torch.cat([s[0].reshape(-1) for s in spectra]), torch.cat([s[1].reshape(-1, K) for s in spectra]),
                      [systems[i][0].shape[-1] for i in order], y2, N, _OFFICIAL_ITERATIONS, _OFFICIAL_TOL,
                      _OFFICIAL_DAMP)
    alpha, beta, t, m2, res2, logdet = out  # [M, K] each, models in ``order``
    extra = torch.cat([s[4] for s in spectra])[:, None]
    widths = torch.tensor([systems[i][2] for i in order], dtype=torch.float64, device=device)[:, None]
    evidence = _evidence(alpha, beta, logdet + extra * torch.log(alpha), m2, res2, N, widths)
    position = {model: row for row, model in enumerate(order)}
    back = torch.tensor([position[i] for i in range(len(systems))], dtype=torch.int64, device=device)
    weights = [None] * len(systems)
    if with_params:
        row = 0
        for (sigma, X, Q, scale, _), members in zip(spectra, groups.values()):
            W = _weights(Q, scale, X, sigma, t[row:row + len(members)])
            for j, i in enumerate(members):
                weights[i] = W[j]
            row += len(members)
    return evidence[back], alpha[back], beta[back], weights


@logme_op.register("triton", dtypes=(torch.float64,))
def _logme_triton(feats: list[torch.Tensor], Y: torch.Tensor, classes, compat: str, with_params: bool):
    """Every Gram matrix first (one GEMM each, in float64), then :func:`_solve_batched`: no
    loop per class or per iteration, and no copy to the host."""
    systems = [_gram(f, Y) for f in feats]
    evidence, alpha, beta, weights = _solve_batched(systems, (Y * Y).sum(0), Y.shape[0], compat, with_params)
    params = [_params(alpha[i], beta[i], evidence[i], W if systems[i][3] else feats[i].to(torch.float64).mT @ W)
              for i, W in enumerate(weights)] if with_params else []
    return evidence.mean(1), params


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
    s, keep, extra = (t.numpy() for t in _rank_rule(torch.from_numpy(red.eigenvalues), N, D, compat, of_features))
    sigma = np.sort(np.where(keep, s * s, 0.0))  # the kept ones last: [first, n)
    first = s.size - int(keep.sum())
    evidence, alpha, beta, _, z = native_module().logme_fixed_point(
        red.diag, red.off, sigma, first, int(extra), N, D, of_features, np.ascontiguousarray(red.projected.T), y2,
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


def add_rows(H: torch.Tensor, f: torch.Tensor, Y: torch.Tensor, classes: torch.Tensor | None,
             native: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + F^T F, F^T Y) for a chunk of rows f [n, D] with targets Y [n, K] (``classes``: the
    class ids behind a one-hot Y, or None), on f's device. ``native``: H is the CPU layout the
    native solver takes, the lower triangle in column order, added to by BLAS syrk (half a
    GEMM's flops); otherwise the full matrix, by a GEMM where the rows are."""
    F64 = f.to(torch.float64)
    if not native:
        return H.addmm_(F64.mT, F64), F64.mT @ Y
    F64 = F64.contiguous()
    blas = _import("scipy.linalg")[0].blas
    # F.T is F's memory in Fortran order; H's own numpy view, once column ordered, is added to in place.
    H = blas.dsyrk(1.0, F64.numpy().T, beta=1.0, c=H.numpy(), trans=0, lower=1, overwrite_c=1)
    return torch.from_numpy(H), torch.from_numpy(_features_times_targets(F64, Y, classes))


def logme_from_grams(backend: str, grams: list[torch.Tensor], projections: list[torch.Tensor], y2: torch.Tensor,
                     N: int, compat: str, with_params: bool):
    """LogME of M models from their accumulated float64 F^T F [D, D] (see :func:`add_rows`),
    F^T Y [D, K] and the targets' |y|^2 [K] over N rows, on ``backend`` (chosen by
    logme_op.select for their device): (scores [M], params) as the backends return them."""
    if backend == "native":
        reds = _reduce([np.array(H.numpy(), order="F") for H in grams], [B.numpy() for B in projections])
        scores, params = [], []
        for H, red in zip(grams, reds):
            evidence, p = _logme_evidence(red, y2.numpy(), N, H.shape[0], True, compat, with_params)
            scores.append(float(evidence.mean()))
            if with_params:
                params.append(_params_tensors(p, p["Qz"].T))
        return torch.tensor(scores, dtype=torch.float64), params
    if backend == "triton":
        evidence, alpha, beta, weights = _solve_batched([(H, B, H.shape[0], True) for H, B in zip(grams, projections)],
                                                        y2, N, compat, with_params)
        params = [_params(alpha[i], beta[i], evidence[i], W) for i, W in enumerate(weights)] if with_params else []
        return evidence.mean(1), params
    scores, params = [], []
    for H, B in zip(grams, projections):
        evidence, alpha, beta, W = _solve(H, B, y2, N, H.shape[0], True, compat, with_params)
        scores.append(evidence.mean())
        if with_params:
            params.append(_params(alpha, beta, evidence, W))
    return torch.stack(scores), params
