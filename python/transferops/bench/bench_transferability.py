"""Transferability scores against the official LogME algorithm.

- logme: ours (native: per model one syrk Gram matrix, its tridiagonal reduction and
  eigenvalues, the targets projected through the reflectors, the fixed point of all classes
  at once in C++; reference: a full eigendecomposition) against the official algorithm as thuml/LogME runs it: float64 numpy, a
  full SVD of F^T F (N > D) or a thin SVD of F (N <= D), the left singular vectors formed,
  then a Python loop over classes. It is re-implemented here from that description (the
  official package is not on PyPI); scores must agree.
- floor (each logme case's %floor): the float64 Gram matrix of the float32 features as given
  (widened to float64, then BLAS syrk, the faster of syrk and torch's GEMM here) plus an
  eigenvalues-only symmetric solve of it (torch eigvalsh), measured in the same run.
- logme M=8: eight models in one call against eight calls.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from transferops.transferability import logme

from .harness import Case

SEED = 0


def _official_algorithm(F: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """LogME as the official code computes it (its published algorithm, with its rank defect)."""
    F = F.astype(np.float64)
    N, D = F.shape
    if N > D:
        v, s2, vh = np.linalg.svd(F.T @ F)
        s = np.sqrt(s2)
        k = int((s > 1e-10).sum())
        s, vh = s[:k], vh[:k]
        u = (F @ vh.T) / s
    else:
        u, s, vh = np.linalg.svd(F, full_matrices=False)
    sigma = s**2
    evidences = []
    for c in range(int(y.max()) + 1):
        target = (y == c).astype(np.float64)
        x = u.T @ target
        x2 = x**2
        res_x2 = (target**2).sum() - x2.sum()
        alpha = beta = 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / (t + sigma) ** 2).sum()
            res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
            alpha, beta = gamma / (m2 + 1e-5), (N - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidences.append((D / 2 * math.log(alpha) + N / 2 * math.log(beta) - 0.5 * np.log(alpha + beta * sigma).sum()
                          - beta / 2 * res2 - alpha / 2 * m2 - N / 2 * math.log(2 * math.pi)) / N)
    return torch.tensor(float(np.mean(evidences)), dtype=torch.float64)


def _floor(F: torch.Tensor) -> torch.Tensor:
    """From the features as logme gets them. On the CPU syrk is the faster Gram (half a GEMM's
    flops)."""
    F = F.double()
    gram_of_features = F.shape[0] > F.shape[1]
    if F.is_cuda:
        return torch.linalg.eigvalsh(F.T @ F if gram_of_features else F @ F.T)
    from scipy.linalg import blas

    G = blas.dsyrk(1.0, F.numpy().T, trans=0 if gram_of_features else 1, lower=1)
    return torch.linalg.eigvalsh(torch.from_numpy(G), UPLO="L")


def _features(N: int, D: int, K: int, device: str, g: torch.Generator):
    """Class-dependent features of a plausible extractor: class means plus correlated noise."""
    y = torch.randint(0, K, (N,), generator=g)
    means = torch.randn(K, D, generator=g)
    mix = torch.randn(D, D, generator=g) / math.sqrt(D)
    F = (means[y] + torch.randn(N, D, generator=g) @ mix).float()
    return F.to(device), y.to(device)


def _sizes(quick: bool) -> list[tuple[int, int, int]]:
    if quick:
        return [(4000, 512, 20), (500, 1024, 10)]
    return [(10000, 1024, 100), (10000, 2048, 100), (1000, 2048, 20)]


def cases(quick: bool, device: str):
    g = torch.Generator().manual_seed(SEED)
    fast = "native" if torch.device(device).type == "cpu" else "reference"
    for N, D, K in _sizes(quick):
        F, y = _features(N, D, K, device, g)
        size = f"N={N} D={D} K={K}"
        nbytes = N * D * F.element_size()
        gram_flops = 2 * N * D * min(N, D)
        yield Case(op="logme", size=size, dtype=torch.float64, bytes=nbytes, flops=gram_flops,
                   ours={"reference": functools.partial(logme, F, y, compat="official"),
                         fast: functools.partial(logme, F, y, compat="official", backend=fast)},
                   peers={"peer:official-algorithm": functools.partial(_official_algorithm, F.cpu().numpy(),
                                                                        y.cpu().numpy())},
                   floor=("floor:gram+eigvalsh", functools.partial(_floor, F)))
        del F
    N, D, K, M = (2000, 256, 10, 8) if quick else (4000, 512, 20, 8)
    models = [_features(N, D, K, device, torch.Generator().manual_seed(SEED))[0] * (m + 1) for m in range(M)]
    y = _features(N, D, K, device, torch.Generator().manual_seed(SEED))[1]
    yield Case(op=f"logme M={M}", size=f"N={N} D={D} K={K}", dtype=torch.float64, bytes=M * N * D * 4,
               flops=M * 2 * N * D * min(N, D),
               ours={fast: functools.partial(logme, models, y, backend=fast)}, expected=fast,
               peers={"peer:one-call-per-model": lambda: torch.stack([logme(f, y, backend=fast) for f in models])})
