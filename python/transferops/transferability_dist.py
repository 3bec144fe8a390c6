"""The streamed scores across processes: each rank of a torch.distributed group feeds its own
shard of the target data into :class:`~transferops.transferability.LogMEStream` or
:func:`~transferops.transferability_models.rank_models`, and the statistics, all sums over
samples, are summed over the ranks before the scores are taken from them.

Each score call makes one all-reduce of the float64 sums (the Gram matrices and the like) and
gathers small metadata as Python objects: every rank's sample count, class ids, shifts and the
shapes it saw. A rank whose shard is empty never saw a model's layers, so the shapes come from
the ranks that did. Checks that could fail on one rank only are decided on the gathered
metadata, the same on every rank, or go through :func:`transferops._dist.agree`: no rank is
left waiting in a collective that a failed peer will never join.

Scores are taken on one rank per model (split by :func:`transferops._dist.split_balanced`,
or in turn) and shared, so every rank returns the same numbers, bit for bit.
"""
from __future__ import annotations

import torch

from . import _dist
from . import transferability_stats as ts


def _device(where: torch.device | None, kind: str) -> torch.device:
    """Where a rank's sums go into the all-reduce: where they are, or, on a rank that has none,
    the device kind (``kind``, "cpu" or "cuda") of the ranks that do."""
    if where is not None:
        return where
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


# ---- LogMEStream ------------------------------------------------------------------------------------


def stream_totals(stream) -> tuple:
    """A :class:`~transferops.transferability.LogMEStream`'s sums over every rank of its group:
    (samples, several models?, backend, Gram matrices, F^T Y [D, K], |y|^2 [K]), with the
    classes' columns in the order of their ids (every rank's class ids united)."""
    group = stream.group
    me = dict(rank=torch.distributed.get_rank(), samples=stream.samples, many=stream.many, chosen=stream.chosen,
              widths=[H.shape[0] for H in stream.grams], kind=None if stream.device is None else stream.device.type,
              ids=None if stream.regression or not stream.samples else stream.classes.cpu(),
              K=0 if stream.y2 is None else stream.y2.numel())
    meta = _dist.gather_objects(me, group)
    fed = [m for m in meta if m["samples"]]
    if not fed:
        raise ValueError("LogMEStream: expected at least 2 samples over the group's ranks, got 0")
    first = fed[0]
    for m in fed[1:]:
        for key, what in (("many", "several models (a list)"), ("widths", "models of widths"),
                          ("chosen", "features for the backend"), ("K", "regression targets per row")):
            if m[key] != first[key] and (key != "K" or stream.regression):
                raise ValueError(f"group: rank {m['rank']} fed {what} {m[key]}, rank {first['rank']} "
                                 f"{first[key]}: every rank must feed the same models")
    if stream.regression:
        ids, K = None, first["K"]
    else:
        ids = torch.unique(torch.cat([m["ids"] for m in fed]))  # sorted: the columns logme() has
        K = ids.numel()
    device = _device(stream.device, first["kind"])
    f64 = dict(dtype=torch.float64, device=device)
    # This rank's columns among the K: classes in the order it met them, or the targets.
    if stream.samples:
        columns = (torch.arange(K, device=device) if ids is None
                   else torch.searchsorted(ids.to(device), stream.classes.to(device)))
    lower = [torch.tril_indices(D, D, device=device) for D in first["widths"]]
    parts = []
    for i, D in enumerate(first["widths"]):  # the Gram matrices' lower triangles: all the solvers read
        B = torch.zeros(D, K, **f64)
        if stream.samples:
            parts.append(stream.grams[i].to(device)[lower[i][0], lower[i][1]])
            B[:, columns] = stream.projected[i].to(device)
        else:
            parts.append(torch.zeros(lower[i].shape[1], **f64))
        parts.append(B)
    y2 = torch.zeros(K, **f64)
    if stream.samples:
        y2[columns] = stream.y2.to(device)
    *summed, y2 = _dist.all_sum_each(parts + [y2], group)
    grams, projections = [], []
    for i, D in enumerate(first["widths"]):
        H = torch.zeros(D, D, **f64)
        H[lower[i][0], lower[i][1]] = summed[2 * i]
        grams.append(H + H.tril(-1).mT)
        projections.append(summed[2 * i + 1].view(D, K))
    return sum(m["samples"] for m in meta), first["many"], first["chosen"], grams, projections, y2


def owned(sizes, group) -> list[int]:
    """The indices of the items (of these costs) that this rank computes."""
    owner = _dist.split_balanced(sizes, _dist.world(group))
    return [i for i, r in enumerate(owner) if r == _dist.rank(group)]


def share(mine: dict, group) -> dict:
    """{index: value} of every rank, from each rank's own (picklable values, on the CPU)."""
    out = {}
    for part in _dist.gather_objects(mine, group):
        out.update(part)
    return out


def shared_solutions(mine: list[int], scores, params: list, count: int, with_params: bool, device, group):
    """Every model's (scores [count], params) on every rank, from the ``scores`` and ``params``
    this rank computed for the models ``mine`` (None and [] for none)."""
    results = share({i: (float(scores[j]), {k: v.cpu() for k, v in params[j].items()} if with_params else None)
                     for j, i in enumerate(mine)}, group)
    scores = torch.tensor([results[i][0] for i in range(count)], dtype=torch.float64, device=device)
    params = [{k: v.to(device) for k, v in results[i][1].items()} for i in range(count)] if with_params else []
    return scores, params


# ---- rank_models --------------------------------------------------------------------------------------


def shard_classes(ids: torch.Tensor, y: torch.Tensor, N: int, group) -> tuple[torch.Tensor, int, int]:
    """(this shard's class indices among every rank's classes [N], the number of classes, the
    total sample count), from its distinct ids and its indices among them (y)."""
    meta = _dist.gather_objects((N, ids.cpu()), group)
    total = sum(n for n, _ in meta)
    union = torch.unique(torch.cat([i for _, i in meta]))
    if total < 2:
        raise ValueError(f"data: expected at least 2 samples over the group's ranks, got {total}")
    if union.numel() < 2:
        raise ValueError(f"labels: expected at least two classes over the group's ranks, got {union.tolist()}")
    return torch.searchsorted(union.to(y.device), ids.to(y.device))[y], union.numel(), total


@torch.inference_mode()  # as the pass that made the statistics: they are added to in place
def summed_stats(stats: dict, group, classes: int, wanted: set, lowest: int) -> dict:
    """{layer: FeatureStats} of one model summed over the group's ranks, from this rank's
    (empty where its shard is). Every rank's statistics move to the shift of the first rank
    with samples (see FeatureStats.move_shift), then one all-reduce adds them; ETran's lowest
    energies are the lowest of every rank's."""
    if _dist.world(group) == 1:
        return stats
    mine = {layer: dict(dim=st.dim, dtype=st.dtype, n=st.n, shift=st.shift.cpu(),
                        energy=None if st.energy is None else st.energy.cpu()) for layer, st in stats.items()}
    me = dict(rank=torch.distributed.get_rank(), layers=mine, kind=None)
    if stats:
        me["kind"] = next(iter(stats.values())).counts.device.type
    meta = _dist.gather_objects(me, group)
    fed = [m for m in meta if m["layers"]]
    first = fed[0]  # shard_classes saw at least 2 samples
    shapes = {layer: v["dim"] for layer, v in first["layers"].items()}
    for m in fed[1:]:
        if {layer: v["dim"] for layer, v in m["layers"].items()} != shapes:
            raise ValueError(f"group: rank {m['rank']} got layers (index: width) "
                             f"{ {k: v['dim'] for k, v in m['layers'].items()} }, rank {first['rank']} {shapes}: "
                             "every rank must run the same models")
    device = _device(None if not stats else next(iter(stats.values())).counts.device, first["kind"])
    out = {}
    for layer, D in shapes.items():
        st = stats.get(layer) or ts.FeatureStats(D, classes, wanted, device, lowest=lowest)
        st.move_shift(first["layers"][layer]["shift"])
        st.dtype, st.n = first["layers"][layer]["dtype"], sum(m["layers"][layer]["n"] for m in fed)
        if st.energy is not None:
            energies = torch.cat([m["layers"][layer]["energy"] for m in fed]).to(st.energy.device)
            st.energy = energies.topk(min(lowest, energies.numel()), largest=False).values
        out[layer] = st
    sums = [t for st in out.values() for t in st.sums()]
    for t, total in zip(sums, _dist.all_sum_each([t.to(device) for t in sums], group)):
        t.copy_(total.view_as(t))
    return out


def summed_posteriors(post: dict, group) -> None:
    """NCTI's second-pass sums (ts.Posteriors per layer), over the group's ranks, in place: the
    posteriors of the true class add up, and each class's R factor is that of every rank's
    stacked (R^T R adds up, and a QR of the stack keeps its singular values to rounding)."""
    if _dist.world(group) == 1:
        return
    mine = {layer: (p.ncc.cpu(), p.n, [R.cpu() for R in p.R]) for layer, p in post.items()}
    parts = _dist.gather_objects(mine, group)
    for layer, p in post.items():
        p.ncc = sum(part[layer][0] for part in parts).to(p.ncc.device)
        p.n = sum(part[layer][1] for part in parts)
        for c in range(len(p.R)):
            stacked = torch.cat([part[layer][2][c] for part in parts]).to(p.ncc.device)
            p.R[c] = torch.linalg.qr(stacked, mode="r").R

