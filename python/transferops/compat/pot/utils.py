"""POT's ``ot.utils.dist`` and ``ot.utils.unif``."""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import cdist

from ... import ot as _ot
from ._core import Arrays

__all__ = ["dist", "unif", "dist0"]

# Metrics computed in torch for every input kind (with gradients); the others are scipy's cdist,
# numpy only, as in POT.
TORCH_METRICS = ("sqeuclidean", "euclidean", "cityblock", "minkowski", "cosine", "correlation")


def unif(n: int, type_as=None):
    """Uniform weights 1/n [n] (float64 numpy; a tensor like ``type_as`` when given one)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    if isinstance(type_as, torch.Tensor):
        return torch.full((int(n),), 1.0 / n, dtype=type_as.dtype, device=type_as.device)
    out = np.ones(int(n)) / n
    return out if type_as is None else out.astype(np.asarray(type_as).dtype)


def dist0(n: int, method: str = "lin_square"):
    """POT's cost between the bins 0..n-1 of a 1-D histogram: (i - j)^2."""
    if method != "lin_square":
        raise ValueError(f"method: only 'lin_square' exists, got {method!r}")
    x = np.arange(n, dtype=np.float64)[:, None]
    return dist(x, x)


def dist(x1, x2=None, metric="sqeuclidean", p=2, w=None, backend="auto", nx=None, use_tensor=False):
    """Pairwise costs [n1, n2] between the rows of x1 and x2 (x1 when None) (``ot.dist``):
    'sqeuclidean' (default), 'euclidean', 'cityblock', 'minkowski' (``p``, weights ``w``),
    'cosine', 'correlation' for numpy and torch; other scipy ``cdist`` metrics (and callables)
    for numpy, or anywhere with ``backend="scipy"`` (no gradients). ``nx`` (a POT backend) is
    accepted and must match the inputs; ``use_tensor`` changes POT's memory use, not the values."""
    if backend not in ("auto", "scipy"):
        raise ValueError(f"backend: expected 'auto' or 'scipy', got {backend!r}")
    arrays = Arrays(x1=x1, x2=x2)
    if nx is not None and (nx.__name__ == "torch") != arrays.torch:
        raise ValueError(f"nx: the {nx.__name__} backend does not match the inputs")
    X1 = arrays.tensor(x1, "x1", (2,))
    X2 = X1 if x2 is None else arrays.tensor(x2, "x2", (2,))
    if X1.shape[1] != X2.shape[1]:
        raise ValueError(f"x1, x2: expected samples of one dimension, got {tuple(X1.shape)} and {tuple(X2.shape)}")
    if w is not None and not (isinstance(metric, str) and metric.endswith("minkowski")):
        raise ValueError(f"w: weights apply to the minkowski metrics only, got metric={metric!r}")
    dtype = torch.promote_types(X1.dtype, X2.dtype)
    if backend == "scipy" or not (isinstance(metric, str) and metric in TORCH_METRICS):
        if arrays.torch and backend != "scipy":
            raise NotImplementedError(f"metric: {metric!r} is computed by scipy's cdist, numpy inputs only "
                                      f"(torch ones: {list(TORCH_METRICS)}, or backend='scipy' without gradients)")
        extra = {"p": p} if isinstance(metric, str) and metric.endswith("minkowski") else {}
        if w is not None:
            extra["w"] = np.asarray(w.detach().cpu() if isinstance(w, torch.Tensor) else w)
        out = torch.from_numpy(cdist(X1.detach().cpu().numpy(), X2.detach().cpu().numpy(), metric=metric, **extra))
        return arrays.out(out.to(X1.device), dtype)
    X1, X2 = X1.to(dtype), X2.to(dtype)
    if metric in ("sqeuclidean", "euclidean"):
        M = _ot.cost_matrix(X1, X2, dtype=dtype)
        if x2 is None or x2 is x1:  # exact zeros where the expansion leaves rounding, as POT
            M = M * (1 - torch.eye(M.shape[0], dtype=dtype, device=M.device))
        M = M.sqrt() if metric == "euclidean" else M
    elif metric in ("cityblock", "minkowski"):  # w: minkowski only (checked above)
        q = 1.0 if metric == "cityblock" else float(p)
        diff = (X1[:, None, :] - X2[None, :, :]).abs() ** q
        if w is not None:
            diff = diff * arrays.tensor(w, "w", (1,)).to(dtype)
        M = diff.sum(-1) ** (1 / q)
    else:
        if metric == "correlation":
            X1, X2 = X1 - X1.mean(1, keepdim=True), X2 - X2.mean(1, keepdim=True)
        M = 1.0 - (X1 @ X2.T) / X1.norm(dim=1)[:, None] / X2.norm(dim=1)[None, :]
    return arrays.out(M, dtype)
