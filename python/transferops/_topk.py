"""Exact top-k of |x| per task: the trims of the fused merging pass.

A trim keeps |x| >= lo before flat index ``cut`` and |x| >= hi (the next float above lo) from
it on: exactly the k largest magnitudes, ties at the k-th kept lowest flat (row-major) index
first, or all of them (``keep_ties``). A ``select(k, keep_ties)`` returns one (lo, hi, cut) per
task; :func:`trims` combines two, the kept set less the dropped one.

On the CPU the native select (csrc/cpu/topk.h) runs every pass: a sample brackets each task's
k-th key, one counting pass finds it inside, and a radix select over the bits of |x| takes the
tasks a bracket misses. Data held in memory go to it in one call; data streamed in chunks
(checkpoints on disk, a model-wide threshold) are fed to it pass after pass. The Triton path
runs the radix select here, one histogram kernel per digit.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._backend import native_module

NOTHING = (math.inf, math.inf, 0)  # a trim that keeps nothing (and drops nothing: no drop set)


def trims(select, numel: int, spec) -> list:
    """Per task (lo, hi, cut, drop_lo, drop_hi, drop_cut) of a tensor of ``numel`` elements: the
    fused pass keeps |v| >= lo before flat index ``cut`` and |v| >= hi from it on, and drops
    what the drop_* trim (breadcrumbs' top outliers, else nothing) would keep. ``spec`` (a
    MergeSpec) gives task t's counts, keep_count(numel, t) + drop_count(numel, t) and
    drop_count(numel, t)."""
    if spec.tasks is None:  # the same counts for every task
        k, g = spec.keep_count(numel), spec.drop_count(numel)
        keep = select(k + g, spec.keep_ties)
        drop = select(g, False) if g else [NOTHING] * len(keep)
    else:
        drops = [spec.drop_count(numel, t) for t in range(spec.tasks)]
        keep = _per_task(select, [spec.keep_count(numel, t) + g for t, g in enumerate(drops)], spec.keep_ties)
        drop = _per_task(select, drops, False)
    return [a + b for a, b in zip(keep, drop)]


def _per_task(select, counts: list, keep_ties: bool) -> list:
    """Task t's row of ``select(counts[t], keep_ties)``: one select per distinct count (none for 0,
    which keeps nothing)."""
    found = {k: select(k, keep_ties) for k in sorted(set(counts)) if k}
    return [found[k][t] if k else NOTHING for t, k in enumerate(counts)]


def shift(trims, offset: int, numel: int | None = None) -> tuple:
    """Whole-scope trims seen from a piece starting at flat ``offset`` (cuts clamped to the
    piece's ``numel`` when given)."""
    clamp = (lambda c: c) if numel is None else (lambda c: min(max(c, 0), numel))
    return tuple((lo, hi, clamp(cut - offset), dlo, dhi, clamp(dcut - offset))
                 for lo, hi, cut, dlo, dhi, dcut in trims)


def in_memory(bufs, base):
    """The native select over tasks held whole in native buffers (``base`` None, or a buffer:
    then x = buffer - base, formed in the accumulation dtype): one call runs every pass."""
    return lambda k, keep_ties: native_module().abs_topk(bufs, base, k, keep_ties)


def streamed(passes, numel: int, tasks: int, chunk: int):
    """The native select over ``tasks`` tensors of ``numel`` elements streamed in chunks:
    ``passes(which)`` returns a fresh iterable of (native buffers of the tasks ``which``, base
    buffer or None) covering the tensors in flat order, the same chunks every time, ``chunk``
    the largest one's size. Each pass reads every task it names once (a base once), so the data
    may come from disk."""
    return lambda k, keep_ties: drive(native_module().TopkSelect(k, numel, tasks, chunk, keep_ties), passes)


def drive(select, passes) -> list:
    """Feed a native ``TopkSelect`` the passes it asks for; returns its (lo, hi, cut) per task."""
    while which := select.next_pass():
        for bufs, base in passes(which):
            if not select.feed(bufs, base):
                break
    return select.thresholds()


# ---- Triton: the radix select driven from here ---------------------------------------------------

_KEY_BITS = {torch.float32: 31, torch.float64: 63, torch.bfloat16: 15, torch.float16: 15}
_KEY_INTS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def triton(rows: list[torch.Tensor]):
    """The select over 2-D device tensors (task vectors, no base): a Triton histogram per digit
    of the keys' bits for all tasks at once, the tie cut with torch on the device."""
    return lambda k, keep_ties: _triton_topk(rows, k, keep_ties)


def _triton_topk(rows: list[torch.Tensor], k: int, keep_ties: bool) -> list:
    from .kernels import merging as kernels

    numel, dtype = rows[0].numel(), rows[0].dtype
    if k <= 0:
        return [NOTHING] * len(rows)
    if k >= numel:
        return [(0.0, 0.0, numel)] * len(rows)
    nbits, known, digit = _KEY_BITS[dtype], 0, kernels.digit_bits(numel)
    prefix, rank, ties = [0] * len(rows), [k] * len(rows), [0] * len(rows)
    while known < nbits:
        dbits = min(digit, nbits - known)
        hist = kernels.abs_digit_histograms(rows, prefix, nbits - known - dbits, dbits, nbits).cpu().numpy()
        for t in range(len(rows)):
            d, rank[t] = _rth_largest_bin(hist[t], rank[t])
            prefix[t], ties[t] = (prefix[t] << dbits) | d, int(hist[t, d])
        known += dbits
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    found = []
    for t, row in enumerate(rows):
        cut = numel if keep_ties or rank[t] >= ties[t] else _tie_cut(row, prefix[t], rank[t])
        lo = torch.tensor([prefix[t]], dtype=torch.int64).to(_KEY_INTS[dtype]).view(dtype).to(acc)
        hi = torch.nextafter(lo, torch.tensor([math.inf], dtype=acc))
        found.append((lo.item(), hi.item(), cut))
    return found


def _rth_largest_bin(counts: np.ndarray, r: int) -> tuple[int, int]:
    """(the bin of ascending ``counts`` holding the r-th largest element, its rank in that bin)."""
    above = np.cumsum(counts[::-1])  # above[j]: elements in the top j + 1 bins
    j = int(np.searchsorted(above, r))  # the first top-(j + 1) holding >= r elements
    return counts.size - 1 - j, r - (int(above[j - 1]) if j else 0)


def _tie_cut(row: torch.Tensor, key: int, rank: int) -> int:
    """The flat position just after the rank-th element of ``row`` whose key is ``key``."""
    dtype = row.dtype
    keys = row.contiguous().view(_KEY_INTS[dtype]).flatten().to(torch.int64) & ((1 << _KEY_BITS[dtype]) - 1)
    return int(torch.nonzero(keys == key).flatten()[rank - 1]) + 1
