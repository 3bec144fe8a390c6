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
streamed alike, and its thresholds never leave the device. Over chunks spread across processes
(a model-wide threshold merged by several ranks) the same radix select runs on sums: each
process counts its own chunks' digits (in torch on the CPU) and the histograms, and the tie
counts, are summed across them.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

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


# ---- the radix select driven from here: on a device, or over chunks spread across processes ---------

_KEY_BITS = {torch.float32: 31, torch.float64: 63, torch.bfloat16: 15, torch.float16: 15}
_KEY_INTS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


class Shared(NamedTuple):
    """A select whose chunks are spread over processes, each feeding its own: ``starts`` holds
    the first flat index of every chunk of the scope, all processes' (ascending), and
    ``total(t)`` sums a tensor over the processes in place, every one getting the sum. Every
    decision of the select is taken on such sums, so all processes call ``total`` alike and
    find the same thresholds, those of the whole scope."""
    starts: list
    total: Callable


def device(chunks, numel: int, tasks: int, key_dtype: torch.dtype, on: torch.device, shared: Shared | None = None):
    """The select over ``tasks`` tensors of ``numel`` elements on device ``on`` (a GPU, or the
    CPU under the Triton interpreter): ``chunks()`` returns a fresh iterable of (the chunk's
    first flat index, ``load``) covering the tensors in flat order (with ``shared``: this
    process's chunks), ``load()`` giving the tasks' 2-D views and the base's view or None. x =
    view - base in ``key_dtype`` (the accumulation dtype) where a base is given, else the view
    itself (``key_dtype`` its dtype). A Triton histogram per digit of the keys' bits for all
    tasks at once; the digit picked, and the tie cut, with torch on the device. The thresholds
    stay there: each (lo, hi, cut) is three 0-d tensors (numbers where k keeps all or
    nothing)."""
    from .kernels import merging as kernels

    return radix(chunks, numel, tasks, key_dtype, on, Passes(kernels.abs_digit_histograms), kernels.digit_bits(numel),
                 shared)


def spread(chunks, numel: int, tasks: int, key_dtype: torch.dtype, shared: Shared):
    """The select on the CPU over chunks of 1-row views spread across processes (as
    :func:`device` takes them), whose every pass runs natively (:data:`NATIVE`): (lo, hi, cut)
    numbers per task, as the native select gives them. Over a large scope, a sample of every
    process's keys, summed into one, first guesses the top bits of each k-th key (those its
    sample bracket shares, transferops._native.abs_sample_brackets), so that the first digit
    pass counts only the keys that carry them (a wrong guess costs that pass)."""
    sample = []  # gathered once, for every select of the scope

    def guess(k: int):
        if numel < _SAMPLE_MIN:
            return None
        if not sample:
            sample.append(_gathered_sample(chunks, numel, tasks, shared))
        nbits = _KEY_BITS[key_dtype]
        brackets = native_module().abs_sample_brackets(sample[0], k / numel, numel, nbits)
        # the bits every bracket shares, less those a full digit pass then finds (a pass must run)
        known = min(nbits - _DIGIT, *(nbits - (lo ^ hi).bit_length() for lo, hi, *_ in brackets))
        return (known, torch.tensor([lo >> (nbits - known) for lo, *_ in brackets])) if known > 0 else None

    select = radix(chunks, numel, tasks, key_dtype, torch.device("cpu"), NATIVE._replace(guess=guess), _DIGIT, shared)
    return lambda k, keep_ties: [(float(lo), float(hi), int(cut)) for lo, hi, cut in select(k, keep_ties)]


# The guess's sample: runs of consecutive keys (csrc/cpu/topk.h's kSampleRun of them) spread
# over the scope, each chunk taking its share; scopes smaller than _SAMPLE_MIN take none.
_SAMPLE_RUN, _SAMPLE_RUNS, _SAMPLE_MIN = 16, 4096, 1 << 20
_DIGIT = 16  # bits per digit of the select across processes: 2 passes for float32 keys


def _gathered_sample(chunks, numel: int, tasks: int, shared: Shared):
    """Keys sampled from every process's chunks, in one [T, runs, run] array (uint64) that
    every process gets: each writes its chunks' runs where they go and the arrays are summed."""
    from ._backend import native_buffer

    sizes = np.diff(shared.starts + [numel])
    runs = _SAMPLE_RUNS * sizes // numel
    where = dict(zip(shared.starts, zip((np.cumsum(runs) - runs).tolist(), runs.tolist())))
    keys = torch.zeros(tasks, int(runs.sum()), _SAMPLE_RUN, dtype=torch.int64)
    for offset, load in chunks():
        first, n = where[offset]
        if n:
            rows, base = load()
            got = native_module().abs_sample_keys([native_buffer(r) for r in rows],
                                                  None if base is None else native_buffer(base), n, offset)
            keys[:, first:first + n] = torch.from_numpy(np.asarray(got).view(np.int64))
    return shared.total(keys).numpy().view(np.uint64)


def radix(chunks, numel: int, tasks: int, key_dtype: torch.dtype, on: torch.device, passes: Passes, digit: int,
          shared: Shared | None = None):
    """The radix select of :func:`device` with ``passes`` over the chunks, ``digit`` bits per
    digit."""
    return lambda k, keep_ties: _radix_select(chunks, numel, tasks, key_dtype, on, passes, digit, shared, k,
                                              keep_ties)


def _key_dtype(dtype: torch.dtype, base) -> torch.dtype:
    """The dtype of x: the views' own, or with a base the accumulation dtype x is formed in."""
    return dtype if base is None else torch.float64 if dtype == torch.float64 else torch.float32


def _keys(row: torch.Tensor, base: torch.Tensor | None, key_dtype: torch.dtype) -> torch.Tensor:
    """The keys of |x| (its bits less the sign, as integers), flat: x = row - base in
    ``key_dtype`` where a base is given, else the row itself."""
    x = row if base is None else row.to(key_dtype) - base.to(key_dtype)
    return x.contiguous().view(_KEY_INTS[key_dtype]).flatten() & ((1 << _KEY_BITS[key_dtype]) - 1)


def _torch_ties(rows, base, key: torch.Tensor) -> torch.Tensor:
    key_dtype = _key_dtype(rows[0].dtype, base)
    return torch.stack([(_keys(row, base, key_dtype) == key[t]).sum() for t, row in enumerate(rows)])


def _torch_tie_position(row, base, key, r):
    tied = _keys(row, base, _key_dtype(row.dtype, base)) == key
    return (tied & (tied.cumsum(0) == r)).to(torch.uint8).argmax()


# Elements per native bracket pass over a 1-row view: what it keeps (12 bytes per key) stays
# within a few MB per task whatever the chunk.
_SLICE = 1 << 20


def _bracket_slices(task_rows, base, lo: list, hi: list, capacity: int):
    """The native bracket pass (abs_bracket: per task the keys above hi[t], and those in
    [lo[t], hi[t]], kept up to ``capacity`` with their positions) over 1-row views, slice by
    slice: (the slice's first element, its result)."""
    from ._backend import native_buffer

    for s in range(0, task_rows[0].shape[1], _SLICE):
        views = [native_buffer(r[:, s:s + _SLICE]) for r in task_rows]
        yield s, native_module().abs_bracket(views, None if base is None else native_buffer(base[:, s:s + _SLICE]),
                                             lo, hi, [[]] * len(views), capacity)


def _native_histograms(task_rows, base, prefixes: torch.Tensor, shift: int, dbits: int, key_bits: int,
                       hist: torch.Tensor) -> torch.Tensor:
    # The keys carrying each task's prefix are a range: the bracket pass keeps them, and counts
    # those above it; torch counts the digits.
    top = shift + dbits
    lo = [p << top for p in prefixes.tolist()]
    hi = [low + (1 << top) - 1 for low in lo]
    above = torch.zeros(len(task_rows), dtype=torch.int64)
    for _, found in _bracket_slices(task_rows, base, lo, hi, _SLICE):
        for t, (over, _, keys, _, _) in enumerate(found):
            digits = (torch.from_numpy(keys.view(np.int64)) >> shift) & ((1 << dbits) - 1)
            hist[t] += torch.bincount(digits, minlength=1 << dbits)
            above[t] += over
    return above


def _native_ties(rows, base, key: torch.Tensor) -> torch.Tensor:
    keys, counts = key.tolist(), torch.zeros(len(rows), dtype=torch.int64)
    for _, found in _bracket_slices(rows, base, keys, keys, 0):
        counts += torch.tensor([inside for _, inside, *_ in found])
    return counts


def _native_tie_position(row, base, key, r) -> int:
    key, r = int(key), int(r)
    for s, found in _bracket_slices([row], base, [key], [key], _SLICE):
        _, inside, _, positions, _ = found[0]
        if r <= inside:  # positions come in no order (one part per thread)
            return s + int(np.partition(positions, r - 1)[r - 1])
        r -= inside
    raise RuntimeError("top-k select: fewer ties than counted")


class Passes(NamedTuple):
    """How the radix select reads the chunks: ``histograms`` adds a chunk's digit counts (the
    arguments of transferops.kernels.merging.abs_digit_histograms); over chunks spread across
    processes, ``ties(rows, base, key)`` counts each task's entries of key key[t] in a chunk
    ([T] int64), and ``position(row, base, key, r)`` is the flat position of the r-th (from 1)
    of them in one task's chunk. ``histograms`` may return, per task, the count of keys above
    those carrying its prefix, which a ``guess`` of the k-th keys' top bits is checked by."""
    histograms: Callable
    ties: Callable = _torch_ties
    position: Callable = _torch_tie_position
    guess: Callable | None = None  # k -> (bits known, each task's key's top bits) or None


# On the CPU, by the native bracket pass: about 1 ns per key, against some 30 in torch.
NATIVE = Passes(_native_histograms, _native_ties, _native_tie_position)


def _radix_select(chunks, numel: int, tasks: int, key_dtype: torch.dtype, on: torch.device, passes: Passes,
                  digit: int, shared: Shared | None, k: int, keep_ties: bool) -> list:
    if k <= 0:
        return [NOTHING] * tasks
    if k >= numel:
        return [(0.0, 0.0, numel)] * tasks
    nbits = _KEY_BITS[key_dtype]
    guess = None if passes.guess is None else passes.guess(k)
    found = None if guess is None else _digits(chunks, tasks, on, passes, digit, shared, nbits, k, guess)
    if found is None:  # no guess, or a wrong one
        found = _digits(chunks, tasks, on, passes, digit, shared, nbits, k)
    prefix, rank, ties = found
    acc = torch.float64 if key_dtype == torch.float64 else torch.float32
    lo = prefix.to(_KEY_INTS[key_dtype]).view(key_dtype).to(acc)
    hi = torch.nextafter(lo, torch.full_like(lo, math.inf))
    cut = torch.full_like(prefix, numel)
    partial = rank < ties  # the tasks that keep only some of the entries equal to their k-th
    if not keep_ties and bool(partial.any()):  # the select's one sync
        if shared is None:
            _tie_cuts(chunks, key_dtype, prefix, rank, partial, cut)
        else:
            _shared_tie_cuts(chunks, prefix, rank, partial, cut, shared, passes)
    lo, hi = lo.double(), hi.double()
    return [(lo[t], hi[t], cut[t]) for t in range(tasks)]


def _digits(chunks, tasks: int, on: torch.device, passes: Passes, digit: int, shared: Shared | None, nbits: int,
            k: int, guess=None):
    """The radix select's digit passes: per task its k-th key, that key's rank among the keys
    equal to it, and their count. ``guess``: (bits known, each task's top bits), checked in
    the first pass by the counts above and inside each task's range (None where it is wrong)."""
    # each task's key bits found so far (a guess's are on the CPU, where guesses are made)
    known, prefix = guess if guess is not None else (0, torch.zeros(tasks, dtype=torch.int64, device=on))
    rank = torch.full((tasks,), k, dtype=torch.int64, device=on)  # of the k-th key among those with the prefix
    while known < nbits:
        dbits = min(digit, nbits - known)
        hist = torch.zeros(tasks, 1 << dbits, dtype=torch.int64, device=on)
        above = torch.zeros(tasks, dtype=torch.int64, device=on)
        for _, load in chunks():
            counted = passes.histograms(*load(), prefix, nbits - known - dbits, dbits, nbits, hist)
            if guess is not None:
                above += counted
        if shared is not None:  # one collective for both
            both = shared.total(torch.cat([hist, above[:, None]], 1))
            hist, above = both[:, :-1], both[:, -1]
        if guess is not None:
            rank = rank - above
            if bool(((rank < 1) | (rank > hist.sum(1))).any()):
                return None
            guess = None
        digits, rank, ties = _rth_largest_bins(hist, rank)
        prefix = (prefix << dbits) | digits
        known += dbits
    return prefix, rank, ties


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
    seen = torch.zeros_like(rank)
    for offset, load in chunks():
        rows, base = load()
        for t, row in enumerate(rows):
            tied = _keys(row, base, key_dtype) == key[t]
            hit = tied & (tied.cumsum(0) + seen[t] == rank[t])
            found = partial[t] & hit.any()
            cut[t] = torch.where(found, offset + 1 + hit.to(torch.uint8).argmax(), cut[t])
            seen[t] += tied.sum()


def _shared_tie_cuts(chunks, key: torch.Tensor, rank: torch.Tensor, partial: torch.Tensor, cut: torch.Tensor,
                     shared: Shared, passes: Passes) -> None:
    """:func:`_tie_cuts` over chunks spread across processes: the ties of every chunk counted
    where it is fed and summed, so that each process knows the chunk holding each task's
    rank-th tie; the process feeding it finds the position in a second pass over that chunk
    alone, and the positions are summed (the others adding 0)."""
    at = {start: i for i, start in enumerate(shared.starts)}
    counts = torch.zeros(len(shared.starts), len(rank), dtype=torch.int64, device=key.device)
    for offset, load in chunks():
        counts[at[offset]] = passes.ties(*load(), key)
    shared.total(counts)
    before = counts.cumsum(0) - counts  # each task's ties in the chunks before each chunk
    holds = partial & (before < rank) & (rank <= before + counts)  # [chunk, task]: its rank-th tie is there
    found = torch.zeros_like(cut)
    for offset, load in chunks():
        i = at[offset]
        if not bool(holds[i].any()):
            continue
        rows, base = load()
        for t in holds[i].nonzero().flatten().tolist():
            found[t] = offset + 1 + passes.position(rows[t], base, key[t], rank[t] - before[i, t])
    shared.total(found)
    cut.copy_(torch.where(partial, found, cut))
