"""Exact top-k of |x| per task: the trims of the fused merging pass.

A trim keeps |x| >= lo before flat index ``cut`` and |x| >= hi (the next float above lo) from
it on: exactly the k largest magnitudes, ties at the k-th kept lowest flat (row-major) index
first, or all of them (``keep_ties``). A ``select(k, keep_ties)`` returns one (lo, hi, cut) per
task; :func:`trims` combines two, the kept set less the dropped one.

On the CPU the native select (csrc/cpu/topk.h) runs every pass: a sample brackets each task's
k-th key, one counting pass finds it inside, and a radix select over the bits of |x| takes the
tasks a bracket misses. Data held in memory go to it in one call; data streamed in chunks
(checkpoints on disk, a model-wide threshold) are fed to it pass after pass. On a device (the
Triton path) the radix select runs here, one histogram kernel per digit, over data in memory or
streamed alike, and its thresholds never leave the device.
"""
from __future__ import annotations

import math

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
    if numel is None:
        clamp = lambda c: c  # noqa: E731
    else:  # a cut found on a device is a 0-d tensor there
        clamp = lambda c: c.clamp(0, numel) if isinstance(c, torch.Tensor) else min(max(c, 0), numel)  # noqa: E731
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


# ---- on a device: the radix select driven from here -------------------------------------------------

_KEY_BITS = {torch.float32: 31, torch.float64: 63, torch.bfloat16: 15, torch.float16: 15}
_KEY_INTS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def device(chunks, numel: int, tasks: int, key_dtype: torch.dtype, on: torch.device):
    """The select over ``tasks`` tensors of ``numel`` elements on device ``on`` (a GPU, or the
    CPU under the Triton interpreter): ``chunks()`` returns a fresh iterable of (the tasks' 2-D
    views, the base's view or None, the chunk's first flat index) covering the tensors in flat
    order. x = view - base in ``key_dtype`` (the accumulation dtype) where a base is given, else
    the view itself (``key_dtype`` its dtype). A Triton histogram per digit of the keys' bits for
    all tasks at once; the digit picked, and the tie cut, with torch on the device. The
    thresholds stay there: each (lo, hi, cut) is three 0-d tensors (numbers where k keeps all or
    nothing)."""
    return lambda k, keep_ties: _device_select(chunks, numel, tasks, key_dtype, on, k, keep_ties)


def _device_select(chunks, numel: int, tasks: int, key_dtype: torch.dtype, on: torch.device, k: int,
                   keep_ties: bool) -> list:
    from .kernels import merging as kernels

    if k <= 0:
        return [NOTHING] * tasks
    if k >= numel:
        return [(0.0, 0.0, numel)] * tasks
    nbits, known, digit = _KEY_BITS[key_dtype], 0, kernels.digit_bits(numel)
    prefix = torch.zeros(tasks, dtype=torch.int64, device=on)  # each task's key bits found so far
    rank = torch.full((tasks,), k, dtype=torch.int64, device=on)  # of the k-th key among those with the prefix
    while known < nbits:
        dbits = min(digit, nbits - known)
        hist = torch.zeros(tasks, 1 << dbits, dtype=torch.int64, device=on)
        for rows, base, _ in chunks():
            kernels.abs_digit_histograms(rows, base, prefix, nbits - known - dbits, dbits, nbits, hist)
        digits, rank, ties = _rth_largest_bins(hist, rank)
        prefix = (prefix << dbits) | digits
        known += dbits
    acc = torch.float64 if key_dtype == torch.float64 else torch.float32
    lo = prefix.to(_KEY_INTS[key_dtype]).view(key_dtype).to(acc)
    hi = torch.nextafter(lo, torch.full_like(lo, math.inf))
    cut = torch.full_like(prefix, numel)
    partial = rank < ties  # the tasks that keep only some of the entries equal to their k-th
    if not keep_ties and bool(partial.any()):  # the select's one sync
        _tie_cuts(chunks, key_dtype, prefix, rank, partial, cut)
    lo, hi = lo.double(), hi.double()
    return [(lo[t], hi[t], cut[t]) for t in range(tasks)]


def _rth_largest_bins(hist: torch.Tensor, rank: torch.Tensor):
    """Per task (row of ascending bin counts ``hist``): the bin holding its rank-th largest
    element, that element's rank within the bin, and the bin's count."""
    above = hist.flip(1).cumsum(1)  # above[:, j]: elements in the top j + 1 bins
    j = torch.searchsorted(above, rank.unsqueeze(1))  # the first top-(j + 1) holding >= rank elements
    before = torch.where(j > 0, above.gather(1, (j - 1).clamp(min=0)), 0)
    bins = hist.shape[1] - 1 - j
    return bins.squeeze(1), (rank.unsqueeze(1) - before).squeeze(1), hist.gather(1, bins).squeeze(1)


def _tie_cuts(chunks, key_dtype, key: torch.Tensor, rank: torch.Tensor, partial: torch.Tensor,
              cut: torch.Tensor) -> None:
    """Sets cut[t], for the ``partial`` tasks, to the flat position just after the rank[t]-th
    element whose key is key[t]: one pass over the chunks, counting the ties seen so far."""
    mask = (1 << _KEY_BITS[key_dtype]) - 1
    seen = torch.zeros_like(rank)
    for rows, base, offset in chunks():
        for t, row in enumerate(rows):
            x = row if base is None else row.to(key_dtype) - base.to(key_dtype)
            keys = x.contiguous().view(_KEY_INTS[key_dtype]).flatten().to(torch.int64) & mask
            tied = keys == key[t]
            hit = tied & (tied.cumsum(0) + seen[t] == rank[t])
            found = partial[t] & hit.any()
            cut[t] = torch.where(found, offset + 1 + hit.to(torch.uint8).argmax(), cut[t])
            seen[t] += tied.sum()
