"""OTDD, the optimal transport dataset distance (Alvarez-Melis & Fusi, NeurIPS 2020), on the
Sinkhorn solver of transferops.ot (which re-exports :func:`dataset_distance`)."""
from __future__ import annotations

import torch

from . import _dist, _ot_checks
from .ot import (MATERIALIZE_BYTES, _points, _Points, _runs_on_triton, _solve, _solved_online, cost_matrix,
                 sinkhorn, sinkhorn_cost_matrix)

INNER = ("gaussian", "exact")


def _labeled(X, y, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features in float64, each label as its class's index among the distinct ids, and the ids."""
    X = _points(X, f"X{name}")
    if X.dim() != 2:
        raise ValueError(f"X{name}: expected features [n, d], got shape {tuple(X.shape)}")
    index, ids = _ot_checks.labels(y, X.shape[0], f"y{name}")
    return X.to(torch.float64), index if index.device == X.device else index.to(X.device), ids


def _class_fits(X, y, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's mean [K, d] and covariance [K, d, d] (over n - 1; 0 for one sample), classes
    0..K-1 all present; ``group``: over every rank's rows (sums all-reduced)."""
    classes = int(_dist.gather(y.max(), group).max()) + 1
    counts = _dist.all_sum(torch.bincount(y, minlength=classes).to(X.dtype), group)
    mus = _dist.all_sum(X.new_zeros(classes, X.shape[1]).index_add_(0, y, X), group) / counts[:, None]
    Z = X - mus[y]
    scatter = torch.stack([Z[y == c].T @ Z[y == c] for c in range(classes)])
    return mus, _dist.all_sum(scatter, group) / (counts - 1).clamp(min=1)[:, None, None]


def _gaussian_w2(Xs, ys, Xt, yt, source_group=None, target_group=None) -> torch.Tensor:
    """W_2^2 between the Gaussian fits of every source class and every target class (Bures):
    |mu - mu'|^2 + tr S + tr S' - 2 tr (S^1/2 S' S^1/2)^1/2; one batched eigensolve per source
    class over the target classes. Labels: class indices, all present; a dataset with a group
    is sharded across its ranks."""
    mu_s, S_s = _class_fits(Xs, ys, source_group)
    mu_t, S_t = _class_fits(Xt, yt, target_group)
    w, V = torch.linalg.eigh(S_s)
    halves = (V * w.clamp(min=0).sqrt()[:, None, :]) @ V.transpose(1, 2)
    traces_t = S_t.diagonal(dim1=1, dim2=2).sum(-1)
    W = torch.zeros(mu_s.shape[0], mu_t.shape[0], dtype=torch.float64, device=Xs.device)
    for k in range(mu_s.shape[0]):
        cross = torch.linalg.eigvalsh(halves[k] @ S_t @ halves[k]).clamp(min=0).sqrt().sum(-1)
        W[k] = ((mu_s[k] - mu_t) ** 2).sum(-1) + torch.trace(S_s[k]) + traces_t - 2 * cross
    return W.clamp(min=0)


def dataset_distance(Xs, ys, Xt, yt, *, eps: float, inner: str = "gaussian", inner_eps: float | None = None,
                     tol: float = 1e-4, max_iter: int = 10000, return_label_distances: bool = False,
                     backend: str = "auto", group=None, target_sharded: bool = False):
    """OTDD (Alvarez-Melis & Fusi, NeurIPS 2020, eq. 3): entropic OT between the labeled datasets
    (Xs, ys) and (Xt, yt) under the ground cost |x - x'|^2 + W_2^2(P_y, P'_y'), where P_y is the
    distribution of the features of class y. ``inner="gaussian"``: W_2 between the classes'
    Gaussian fits (closed form); ``"exact"``: the entropic transport cost between the classes'
    samples at ``inner_eps`` (default ``eps``). Costs are not rescaled: ``eps`` is absolute.
    There is no sample limit: outer costs above ``MATERIALIZE_BYTES`` in float64 are never
    stored: the native backend recomputes them in tiles (in float64, with progress on stderr), as
    :func:`sinkhorn` does for large clouds. Class ids: a 1-D tensor of any integer dtype, bool,
    or floats holding integers, >= 0; memory follows the classes present, not the ids' size.

    Returns the outer :class:`SinkhornResult` (its ``transport_cost`` is the distance), and with
    ``return_label_distances`` also W_2^2 [source classes, target classes] (rows and columns of
    absent classes are 0; a table of at most ``_ot_checks.LABEL_TABLE_ENTRIES`` entries).

    ``group``: (Xs, ys) are this rank's rows of the source, (Xt, yt) the whole target or, with
    ``target_sharded``, this rank's rows of it; as :func:`sinkhorn` with ``group`` (the class
    fits from all-reduced moments; ``inner="gaussian"`` only)."""
    if group is not None:
        from . import _ot_sharded

        return _ot_sharded.dataset_distance(Xs, ys, Xt, yt, eps=eps, inner=inner, tol=tol, max_iter=max_iter,
                                            return_label_distances=return_label_distances, backend=backend,
                                            group=group, target_sharded=target_sharded)
    if target_sharded:
        raise ValueError("target_sharded: blocks of the target are for sharded problems: pass group= too")
    if inner not in INNER:
        raise ValueError(f"inner: expected one of {list(INNER)}, got {inner!r}")
    Xs, ys, source_ids = _labeled(Xs, ys, "s")
    Xt, yt, target_ids = _labeled(Xt, yt, "t")
    eps = _ot_checks.positive(eps, "eps")
    if Xs.shape[1] != Xt.shape[1] or Xs.device != Xt.device:
        raise ValueError(f"Xs, Xt: expected features of one width on one device, got {tuple(Xs.shape)} on "
                         f"{Xs.device} and {tuple(Xt.shape)} on {Xt.device}")
    if inner == "gaussian":
        W = _gaussian_w2(Xs, ys, Xt, yt)
    else:
        inner_eps = eps if inner_eps is None else _ot_checks.positive(inner_eps, "inner_eps")
        W = torch.zeros(int(ys.max()) + 1, int(yt.max()) + 1, dtype=torch.float64, device=Xs.device)
        for c in torch.unique(ys):
            for c2 in torch.unique(yt):
                W[c, c2] = sinkhorn(Xs[ys == c], Xt[yt == c2], eps=inner_eps, tol=tol, max_iter=max_iter,
                                    backend=backend).transport_cost
    online = _solved_online(1, Xs.shape[0], Xt.shape[0], torch.float64)
    if online or (_runs_on_triton(backend, Xs.device, torch.float64) and not (Xs.requires_grad or Xt.requires_grad)):
        if Xs.requires_grad or Xt.requires_grad:
            raise NotImplementedError(f"dataset_distance: gradients of datasets whose outer costs exceed "
                                      f"{MATERIALIZE_BYTES >> 20} MiB (solved online) are not implemented")
        C = _Points(Xs[None], Xt[None], 1.0, (ys, yt, W))
        result = _solve(C, None, None, dtype=torch.float64, eps=eps, tol=tol, max_iter=max_iter, eps_scaling=None,
                        reach=None, batched=False, backend=backend, log_plan_of=C.rows, progress=online)
    else:
        result = sinkhorn_cost_matrix(cost_matrix(Xs, Xt) + W[ys][:, yt], eps=eps, tol=tol, max_iter=max_iter,
                                      backend=backend)
    return (result, _ot_checks.label_table(W, source_ids, target_ids)) if return_label_distances else result
