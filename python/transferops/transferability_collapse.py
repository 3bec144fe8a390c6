"""Transferability from neural collapse (NCTI) and from energy (ETran's energy score).

Both take features as the scores of :mod:`transferops.transferability` do (one [N, D] tensor,
an [M, N, D] batch or a list of [N, D_m]) and return float64 scores, 0-d for one model, [M] for
several, higher is better. NCTI normalizes its three terms across the candidate models, so a
model's NCTI depends on the set it is ranked in; ``return_terms=True`` gives the raw terms.
"""
from __future__ import annotations

import math

import torch

from . import _checks
from .transferability import (_class_labels, _feature_list, _noise_variance, _on_device, _rows_by_class, _shrunk,
                              torch_backend)

NCTI_PCA_DIM = 64  # the authors' PCA dimension
_NCTI_SHRINK_COMPONENTS = 32  # their shrinkage reads the variance of the 32 leading components
_NCTI_MIN_SHRINKAGE = 1e-10  # their floor on it; at the floor they fit without shrinkage
ETRAN_FRACTION = 0.005  # the authors' code averages the lowest 0.5% of the samples' energy scores


# ---- NCTI -------------------------------------------------------------------------------------


def _ncti_fit(counts: torch.Tensor, sums: torch.Tensor, scatter: torch.Tensor, pca_dim: int, what: str,
              noise: float):
    """NCTI's PCA and LDA from first-pass statistics: class counts [C], class sums of the
    features [C, D] and their centered total scatter sum_i (x_i - m)(x_i - m)^T [D, D].

    Returns (weights [D, C], intercept [C], S_seli): the LDA logits of a sample x are
    (x - m) @ weights + intercept, m = sums.sum(0) / N, and softmax of them its posteriors.
    Class means enter only as differences from m, so sums of rows shifted by any x0 serve too.

    As the authors' code: PCA fit on all N samples to d = min(pca_dim, D, N - C) components
    (fewer where the rest hold only the features' rounding, variance ``noise``: see
    transferops.transferability._noise_variance)
    (their variances lam_k with 1/(N-1)); shrinkage s = max(exp(-sum_{k<32} lam_k), 1e-10).
    Above the floor, scikit-learn's eigen solver: the covariances (1/N, class-prior weighted
    within) shrunk towards tr/d I, Fisher directions the generalized eigenvectors of
    (S_t, S_w). At the floor, its svd solver: no shrinkage, the within covariance with
    1/(N - C), as scikit-learn did before 1.9 (1.9 divides by N there). Either way the top
    min(C-1, d) directions W, normalized to W^T S_w W = I with the S_w used, give
    S_seli = ||H W||_* = sum_j sqrt(eig_j(W^T (N S_t) W)), H the centered PCA scores."""
    N, C, D = int(counts.sum()), counts.numel(), scatter.shape[0]
    if N <= C:
        raise ValueError(f"labels: ncti needs more samples than classes, got {N} samples in {C} classes")
    lam, vecs = torch.linalg.eigh(scatter)  # ascending
    # Components at the noise level of the features (``dtype``) are not kept either: a null
    # direction (LayerNorm outputs sum to a constant) would get LDA weights of amplified noise.
    signal = int((lam > max(N * noise, float(lam[-1]) * max(N, D) * torch.finfo(torch.float64).eps)).sum())
    d = min(pca_dim, D, N - C, signal)
    if d < 1:
        raise ValueError(f"{what}: ncti needs features that vary above their rounding; these do not")
    basis = vecs[:, -d:].flip(1)  # [D, d], leading principal axes first
    St = torch.diag(lam[-d:].flip(0).clamp(min=0)) / N  # total covariance of the PCA scores
    shrinkage = max(math.exp(-float(St.diagonal()[:_NCTI_SHRINK_COMPONENTS].sum()) * N / (N - 1)),
                    _NCTI_MIN_SHRINKAGE)
    mean = sums.sum(0) / N
    means = (sums / counts[:, None] - mean) @ basis  # [C, d] class means of the PCA scores
    priors = counts.to(torch.float64) / N
    Sw = St - (means.T * priors) @ means  # within = total - between, both with 1/N
    if shrinkage > _NCTI_MIN_SHRINKAGE:
        cov, total = _shrunk(Sw, shrinkage), _shrunk(St, shrinkage)
    else:
        cov, total = Sw * (N / (N - C)), St
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError(f"{what}: ncti needs features that vary within the classes after PCA; the within-class "
                         f"covariance is singular")
    # Generalized eigenvectors of (total, cov) through L: those of (total - cov, cov) too, the
    # between scatter of both solvers, so the same Fisher directions, normalized to W^T cov W = I.
    Linv = torch.linalg.solve_triangular(L, torch.eye(d, dtype=L.dtype, device=L.device), upper=False)
    _, U = torch.linalg.eigh(Linv @ total @ Linv.T)
    W = Linv.T @ U[:, -min(C - 1, d):]
    seli = torch.linalg.eigvalsh(W.T @ (N * St) @ W).clamp(min=0).sqrt().sum()
    coef = torch.cholesky_solve(means.T, L).T  # [C, d]: means cov^-1
    intercept = -0.5 * (means * coef).sum(1) + torch.log(priors)
    return basis @ coef.T, intercept, seli


def _ncti_terms(X: torch.Tensor, y: torch.Tensor, pca_dim: int, what: str, dtype: torch.dtype) -> torch.Tensor:
    """(S_ncc, S_seli, log sum_c ||P_c||_*) of float64 features X [N, D] (of ``dtype`` as
    given), classes y (0..C-1)."""
    counts = torch.bincount(y)
    sums = torch.zeros(counts.numel(), X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, y, X)
    Xc = X - sums.sum(0) / X.shape[0]
    weights, intercept, seli = _ncti_fit(counts, sums, Xc.T @ Xc, pca_dim, what,
                                         _noise_variance(dtype, float((X * X).mean())))
    P = torch.softmax(Xc @ weights + intercept, dim=1)  # the second pass: posteriors [N, C]
    ncc = P[torch.arange(X.shape[0], device=X.device), y].mean()
    vc = torch.log(sum(torch.linalg.svdvals(Pc).sum() for Pc in _rows_by_class(P, y)))
    return torch.stack([ncc, seli, vc])


def ncti(features, labels, *, pca_dim: int = NCTI_PCA_DIM, return_terms: bool = False, backend: str = "auto"):
    """NCTI (Wang et al., ICCV 2023, sec. 3: S_vc, S_seli, S_ncc and their normalized sum), higher is better.

    Per model, on its features reduced by PCA (to ``pca_dim`` = 64 components, fit on all the
    samples) and an LDA fit on them (see _ncti_fit), with posteriors p_i = softmax of the LDA
    logits (Gaussian classes with a shared covariance and priors n_c/N):
      S_ncc = 1/N sum_i p_i[y_i], how well the nearest-centre (LDA) classifier fits;
      S_seli = ||H W||_*, the nuclear norm of the centered features on the C - 1 Fisher
      directions (the distance to the simplex encoded label interpolation geometry);
      S_vc = log sum_c ||P_c||_*, P_c the posteriors of class c's samples [n_c, C] (the
      within-class variability; the paper writes -sum_c ||P_c||_*, the authors' code the log).
    Each term is min-max normalized over the M models, n(s) = (s - min) / (max - min), and
    NCTI = n(S_ncc) + n(S_seli) - n(S_vc), as the authors' code combines them.

    Deviations: a term equal for every model (always so for one model) normalizes to 0, not
    0/0; d = min(pca_dim, D, N - C) (scikit-learn's PCA refuses D or N below 64, and past
    N - C components the within-class covariance is singular); the PCA is exact (theirs is
    randomized on large inputs).

    ``features`` as :func:`transferops.transferability.logme`; ``labels`` class ids [N].
    ``return_terms=True`` also returns the raw terms (S_ncc, S_seli, S_vc), float64 [3] or
    [M, 3]. Returns float64 scores, 0-d or [M]."""
    torch_backend(backend, "ncti")
    pca_dim = _checks.count(pca_dim, "pca_dim", low=1)
    if not isinstance(return_terms, bool):
        raise TypeError(f"return_terms: expected a bool, got {type(return_terms).__name__} {return_terms!r}")
    feats, many = _feature_list(features)
    _, y = _class_labels(labels, feats[0].shape[0])
    y = _on_device(y, feats[0].device)
    terms = torch.stack([_ncti_terms(f.to(torch.float64), y, pca_dim,
                                     f"features[{i}]" if many else "features", f.dtype) for i, f in enumerate(feats)])
    scores = ncti_combine(terms)
    if not many:
        scores, terms = scores[0], terms[0]
    return (scores, terms) if return_terms else scores


def ncti_combine(terms: torch.Tensor) -> torch.Tensor:
    """NCTI [M] from the raw terms [M, 3] (S_ncc, S_seli, S_vc) of M candidates."""
    low, span = terms.amin(0), terms.amax(0) - terms.amin(0)
    normalized = torch.where(span > 0, (terms - low) / torch.where(span > 0, span, 1), 0)
    return normalized[:, 0] + normalized[:, 1] - normalized[:, 2]


# ---- ETran ------------------------------------------------------------------------------------


def etran_count(N: int, fraction: float = ETRAN_FRACTION) -> int:
    """How many of N samples' energies S_en averages: floor(fraction N), at least 1."""
    return max(1, math.floor(fraction * N + 1e-9))  # + 1e-9: 0.29 * 100 is 28.999... in float64


def etran(features, *, temperature: float = 1.0, fraction: float = ETRAN_FRACTION, backend: str = "auto"):
    """ETran's energy score S_en (Gholami et al., ICCV 2023): the mean -E(x) of the lowest samples.

    Each sample's features f(x) are read as logits (the authors' code passes the penultimate
    features, not a classifier's outputs) and score -E(x) = T logsumexp_j(f_j(x) / T), the
    negative free energy, high for inputs the model holds in distribution. S_en is the mean
    of the k = floor(fraction N) lowest of these, at least 1; the authors' code keeps the
    lowest 0.5% (``fraction`` = 0.005, their empty mean when N < 200 becomes the lowest one
    here) with T = 1. ``fraction=1`` gives the plain mean over all samples. No labels: the energy
    score needs none.

    ``features`` as :func:`transferops.transferability.logme`. Returns float64 scores, 0-d or [M]."""
    torch_backend(backend, "etran")
    T = _checks.positive(temperature, "temperature")
    fraction = _checks.fraction(fraction, "fraction")
    if fraction == 0:
        raise ValueError("fraction: expected a number in (0, 1], got 0")
    feats, many = _feature_list(features, min_samples=1)
    N = feats[0].shape[0]
    k = etran_count(N, fraction)
    scores = torch.stack([(T * torch.logsumexp(f.to(torch.float64) / T, dim=1)).topk(k, largest=False).values.mean()
                          for f in feats])
    return scores if many else scores[0]
