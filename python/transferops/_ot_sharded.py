"""Sinkhorn with the rows of x sharded across the ranks of a torch.distributed group: the
arguments of ``sinkhorn(..., group=)`` checked on every rank at once, y's blocks gathered, the
weights' defaults taken over all ranks; the iterations are transferops._ot_sweeps'.

Every rank must reach the same collectives: an argument that one rank rejects is reported to
all (each raises RankFailure naming that rank and its error) instead of leaving the others
waiting in an all-gather.
"""
from __future__ import annotations

import dataclasses

import torch

from . import _dist, _otdd, ot

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def same_everywhere(group, what: str, values: list[int], device) -> None:
    """Raises on every rank (the same error) unless ``values`` are equal on all of them."""
    seen = _dist.gather(torch.tensor(values, dtype=torch.int64, device=device), group)
    if not bool((seen == seen[0]).all()):
        raise ValueError(f"{what}: expected the same on every rank, got {seen.tolist()} (rank by rank)")


class _Blocks(torch.autograd.Function):
    """Every rank's block of t along ``dim`` (sizes ``sizes``), in rank order. The gradient of the
    whole is the same on every rank (its sums are all-reduced): each rank keeps its block's."""

    @staticmethod
    def forward(ctx, t, dim, sizes, group):
        ctx.dim, ctx.start, ctx.size = dim, sum(sizes[:_dist.rank(group)]), t.shape[dim]
        pad = list(t.shape)
        pad[dim] = max(sizes) - t.shape[dim]
        whole = _dist.gather(torch.cat([t, t.new_zeros(pad)], dim), group)
        return torch.cat([whole[r].narrow(dim, 0, n) for r, n in enumerate(sizes)], dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.start, ctx.size), None, None, None


def gather_blocks(t: torch.Tensor, dim: int, group) -> tuple[torch.Tensor, int]:
    """(every rank's t concatenated along ``dim`` in rank order, where this rank's block starts);
    differentiable, see :class:`_Blocks`."""
    sizes = _dist.gather(torch.tensor(t.shape[dim], device=t.device), group).tolist()
    return _Blocks.apply(t, dim, sizes, group), sum(sizes[:_dist.rank(group)])


def _local(x, y, a, b, cost):
    """The arguments as one process checks them, on this rank's share."""
    xb, yb, batched = ot._clouds(x, y, cost)
    B = xb.shape[0]
    a = None if a is None else ot._weights(a, (B, xb.shape[1]), xb, "a", local=True)
    b = None if b is None else ot._weights(b, (B, yb.shape[1]), yb, "b", local=True)
    return xb, yb, a, b, batched


def sinkhorn(x, y, a, b, *, eps, cost, tol, max_iter, eps_scaling, reach, progress, backend, group, y_sharded):
    """transferops.ot.sinkhorn with ``group`` (see its docstring)."""
    group = _dist.group_of(group)
    xb, yb, a, b, batched = _dist.agreed(group, lambda: _local(x, y, a, b, cost))
    B, n, m, d = xb.shape[0], xb.shape[1], yb.shape[1], xb.shape[2]
    same_everywhere(group, "x, y, a, b (batch, width, dtypes, weights given, y's points unless y_sharded)",
                    [B, d, _DTYPES.index(xb.dtype), _DTYPES.index(yb.dtype), a is None, b is None,
                     -1 if y_sharded else m], xb.device)
    rows = int(_dist.all_sum(torch.tensor(n, device=xb.device), group))
    a = torch.full((B, n), 1.0 / rows, dtype=torch.float64, device=xb.device) if a is None else a
    if y_sharded:
        yb, start = gather_blocks(yb, 1, group)
        b = None if b is None else gather_blocks(b, 1, group)[0]
    dtype = ot._working_dtype(xb.dtype, yb.dtype)
    C = ot._online_points(xb, yb, dtype, ot._runs_on_triton(backend, xb.device, dtype), cost)
    large = ot._solved_online(B, rows, yb.shape[1], dtype)
    result = ot._solve(C, a, b, dtype=dtype, eps=eps, tol=tol, max_iter=max_iter, eps_scaling=eps_scaling,
                       reach=reach, batched=batched, backend=backend, log_plan_of=C.rows,
                       progress=large if progress is None else progress, group=group, rows=rows)
    return dataclasses.replace(result, g=result.g[..., start:start + m]) if y_sharded else result


def dataset_distance(Xs, ys, Xt, yt, *, eps, inner, tol, max_iter, return_label_distances, backend, group,
                     target_sharded):
    """transferops.ot.dataset_distance with ``group`` (see its docstring)."""
    group = _dist.group_of(group)

    def local():
        if inner != "gaussian":
            raise ValueError(f"inner: across ranks (group=) the class distances are Gaussian fits' (inner="
                             f"'gaussian'), got {inner!r}")
        s, t = _otdd._labeled(Xs, ys, "s"), _otdd._labeled(Xt, yt, "t")
        if s[0].shape[1] != t[0].shape[1] or s[0].device != t[0].device:
            raise ValueError(f"Xs, Xt: expected features of one width on one device, got {tuple(s[0].shape)} on "
                             f"{s[0].device} and {tuple(t[0].shape)} on {t[0].device}")
        if Xs.requires_grad or Xt.requires_grad:
            raise NotImplementedError("dataset_distance: gradients across ranks (group=) are not implemented")
        return s, t
    (Xs, ys, ids_s), (Xt, yt, ids_t) = _dist.agreed(group, local)
    same_everywhere(group, "Xs, Xt (width, Xt's rows unless target_sharded)",
                    [Xs.shape[1], -1 if target_sharded else Xt.shape[0]], Xs.device)
    ys, ids_s = _global_classes(ys, ids_s, group)
    if target_sharded:
        yt, ids_t = _global_classes(yt, ids_t, group)
    W = _otdd._gaussian_w2(Xs, ys, Xt, yt, group, group if target_sharded else None)
    n = Xt.shape[0]
    if target_sharded:
        Xt, start = gather_blocks(Xt, 0, group)
        yt = gather_blocks(yt, 0, group)[0]
    rows = int(_dist.all_sum(torch.tensor(Xs.shape[0], device=Xs.device), group))
    a = torch.full((1, Xs.shape[0]), 1.0 / rows, dtype=torch.float64, device=Xs.device)
    C = ot._Points(Xs[None], Xt[None], 1.0, (ys, yt, W))
    result = ot._solve(C, a, None, dtype=torch.float64, eps=eps, tol=tol, max_iter=max_iter, eps_scaling=None,
                       reach=None, batched=False, backend=backend, log_plan_of=C.rows,
                       progress=ot._solved_online(1, rows, Xt.shape[0], torch.float64), group=group, rows=rows)
    if target_sharded:
        result = dataclasses.replace(result, g=result.g[start:start + n])
    return (result, ot._ot_checks.label_table(W, ids_s, ids_t)) if return_label_distances else result


def _global_classes(index: torch.Tensor, ids: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's labels as indices into the distinct class ids of all ranks, and those ids."""
    every = torch.unique(gather_blocks(ids, 0, group)[0])
    return torch.searchsorted(every, ids)[index], every
