import math
from pathlib import Path

import numpy as np
import pytest
import torch

from transferops import BackendUnavailable, use_backend
from transferops._backend import native_buffer, native_module
from transferops._philox import draws, philox4
from transferops._topk import drive
from transferops.merging import (MergeSpec, _dare_keep, _della_keep_probability, breadcrumbs, breadcrumbs_ties,
                                 della, della_linear, fisher_average, _fnv1a32, _topk_keep, dare_linear, dare_ties,
                                 disjoint_merge, magnitude_prune, merge_op, task_arithmetic, ties)

from _kit import (DTYPES, assert_close, backend_cases, assert_matches_reference, golden_file, guarded_empty, native_isa,
                  load_folder, noncontiguous, outputs_per_isa, peer, randn, require_backend, require_thp, thp_eligible)

FAST = ["native", "triton", "cuda"]
SHAPES = [(1,), (7,), (37, 301), (3, 5, 129)]
# The Triton interpreter's shapes (no GPU; see _kit.backend_cases): fewer rows, still several.
INTERPRETED_SHAPES = [(1,), (7,), (5, 301), (2, 3, 129)]


def _cases(backends, *, pairwise=False):
    return backend_cases(backends, SHAPES, INTERPRETED_SHAPES, pairwise=pairwise)


def _task_vectors(gen, T, shape, dtype, device, layout):
    tvs = [randn(shape, dtype, gen, device=device, zeros=0.5, noncontig=layout == "strided") for _ in range(T)]
    if layout == "stacked":
        return torch.stack(tvs)
    return tvs


@pytest.mark.interpreter_quick(dtype=torch.float32, shape=INTERPRETED_SHAPES[-1])
@pytest.mark.parametrize("backend,dtype,shape", _cases(FAST))
@pytest.mark.parametrize("layout", ["contiguous", "strided", "stacked"])
@pytest.mark.parametrize("sign,weighted", [("sum", False), ("count", True)])
def test_disjoint_merge_matches_reference(gen, backend, dtype, shape, layout, sign, weighted):
    device = require_backend(backend)
    T = int(torch.randint(1, 7, (), generator=gen))
    tvs = _task_vectors(gen, T, shape, dtype, device, layout)
    weights = torch.rand(T, generator=gen, dtype=torch.float64).add(0.1).tolist() if weighted else None
    assert_matches_reference(disjoint_merge, (tvs,), dict(sign=sign, weights=weights), backend=backend, dtype=dtype)


def _tied(shape, dtype, gen, device, layout):
    """Multiples of 1/4 in [-1, 1]: exact in every dtype, many ties at any top-k threshold."""
    x = (torch.randint(-4, 5, shape, generator=gen) / 4).to(dtype)
    return (noncontiguous(x) if layout == "strided" else x).to(device)


METHODS = {
    "task_arithmetic": lambda tvs, w, **kw: task_arithmetic(tvs, weights=w, **kw),
    "magnitude_prune": lambda tvs, w, **kw: magnitude_prune(tvs, density=0.3, weights=w, **kw),
    "ties_peft_sum": lambda tvs, w, **kw: ties(tvs, density=0.3, weights=w, **kw),
    "ties_peft_count": lambda tvs, w, **kw: ties(tvs, density=0.45, weights=w, sign="count", **kw),
    "ties_mergekit_sum": lambda tvs, w, **kw: ties(tvs, density=0.2, weights=w, semantics="mergekit", **kw),
    "ties_mergekit_count": lambda tvs, w, **kw: ties(tvs, density=0.7, weights=w, sign="count",
                                                     semantics="mergekit", **kw),
    "ties_paper_sum": lambda tvs, w, **kw: ties(tvs, density=0.3, weights=w, semantics="paper", **kw),
    "ties_paper_count": lambda tvs, w, **kw: ties(tvs, density=0.5, weights=w, sign="count", semantics="paper", **kw),
    "breadcrumbs": lambda tvs, w, **kw: breadcrumbs(tvs, density=0.4, gamma=0.1, weights=w, **kw),
    "breadcrumbs_ties": lambda tvs, w, **kw: breadcrumbs_ties(tvs, density=0.3, gamma=0.05, weights=w,
                                                              semantics="mergekit", **kw),
    "dare_linear": lambda tvs, w, **kw: dare_linear(tvs, density=0.4, seed=2**40 + 3, weights=w, name="x", **kw),
    "dare_ties_count": lambda tvs, w, **kw: dare_ties(tvs, density=0.6, seed=11, weights=w, sign="count", **kw),
}


@pytest.mark.parametrize("backend", ["native"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fisher_average_matches_reference(gen, backend, dtype, shape):
    """Fishers with exact zeros (floored), on contiguous and strided views, weighted."""
    require_backend(backend)
    T = int(torch.randint(1, 5, (), generator=gen))
    models = [randn(shape, dtype, gen, noncontig=t % 2 == 1) for t in range(T)]
    fishers = [randn(shape, dtype, gen, zeros=0.3).abs() for _ in range(T)]
    weights = (torch.rand(T, generator=gen, dtype=torch.float64) + 0.1).tolist()
    assert_matches_reference(lambda m, f, **kw: fisher_average(m, f, weights=weights, eps=1e-3, **kw),
                             (models, fishers), {}, backend=backend, dtype=dtype)


def test_fisher_average_by_hand():
    """(2*1*1 + 1*3*4) / (2*1 + 1*3) = 14/5; an entry both Fishers know nothing of (floored)
    gets the weighted mean (2*1 + 1*4) / 3 = 2."""
    models = [torch.tensor([1.0, 1.0]), torch.tensor([4.0, 4.0])]
    fishers = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]
    for backend in ("reference", "native"):
        require_backend(backend)
        got = fisher_average(models, fishers, weights=[2.0, 1.0], eps=1e-12, backend=backend)
        torch.testing.assert_close(got, torch.tensor([14 / 5, 2.0]))
    sd = fisher_average([{"w": models[0], "step": torch.tensor(3)}, {"w": models[1], "step": torch.tensor(5)}],
                        [{"w": fishers[0]}, {"w": fishers[1]}], weights=[2.0, 1.0], eps=1e-12)
    torch.testing.assert_close(sd["w"], torch.tensor([14 / 5, 2.0]))
    assert sd["step"].item() == 3


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("call,match", [
    (lambda b: fisher_average([torch.ones(3)], [-torch.ones(3)], backend=b), "fishers: 3 positions hold a negative"),
    (lambda b: fisher_average([torch.tensor([1.0, float("nan")])], [torch.ones(2)], backend=b), "models/fishers"),
    (lambda b: fisher_average([torch.ones(3)], [torch.ones(3)], eps=0.0, backend=b), "eps: expected a positive"),
    (lambda b: fisher_average([torch.ones(3)], [torch.ones(4)], backend=b), "fishers: expected 1 tensors"),
    (lambda b: fisher_average([torch.ones(3)] * 2, [torch.ones(3)] * 2, weights=[1.0, 0.0], backend=b),
     "weights: Fisher merging needs positive"),
])
def test_fisher_average_bad_input(backend, call, match):
    require_backend(backend)
    with pytest.raises(ValueError, match=match):
        call(backend)


def test_della_keep_probabilities_by_hand():
    """Per row: magnitude ranks 0, 2, 1 map to density - eps, + eps, and the middle; equal
    magnitudes rank by index; a one-entry row gets density - eps."""
    p = _della_keep_probability(torch.tensor([[0.1, -3.0, 2.0], [1.0, -1.0, 0.5]]), 0.5, 0.2)
    torch.testing.assert_close(p, torch.tensor([[0.3, 0.7, 0.5], [0.5, 0.7, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(_della_keep_probability(torch.tensor([4.0]), 0.5, 0.2),
                               torch.tensor([0.3], dtype=torch.float64))


def test_della_keeps_by_rank_and_is_unbiased(gen):
    """Over a large row the smallest decile survives at about density - 0.9 eps and the largest
    at about density + 0.9 eps; survivors divided by their probability keep the sum unbiased;
    masks are a function of (seed, name) only."""
    x = torch.randn(1, 200_000, generator=gen, dtype=torch.float64)
    out = della_linear([x], density=0.4, epsilon=0.2, seed=5, name="w")
    order = x.abs().argsort(dim=1)[0]
    kept = (out[0, order] != 0).double()
    tenth = x.shape[1] // 10
    assert abs(kept[:tenth].mean() - (0.4 - 0.18)) < 0.01 and abs(kept[-tenth:].mean() - (0.4 + 0.18)) < 0.01
    assert abs(float((out - x).sum())) < 5 * float(x.abs().sum()) / x.numel() ** 0.5
    assert torch.equal(out, della_linear([x], density=0.4, epsilon=0.2, seed=5, name="w"))
    assert not torch.equal(out, della_linear([x], density=0.4, epsilon=0.2, seed=5, name="v"))


def test_della_elects_like_ties_after_magprune(gen):
    """della = MagPrune (same draws as della_linear) + PEFT's election and disjoint mean."""
    tvs = [torch.randn(9, 40, generator=gen, dtype=torch.float64) for _ in range(3)]
    from transferops.merging import _draws

    spec = MergeSpec(None, False, seed=2, stream=_fnv1a32("a"))
    pruned = []
    for t, x in enumerate(tvs):
        p = _della_keep_probability(x, 0.5, 0.1)
        u = _draws(x.shape, spec, t) / 2.0**32
        pruned.append(torch.where(u < p, x / p, 0.0))
    want = disjoint_merge(pruned, backend="reference")
    torch.testing.assert_close(della(tvs, density=0.5, epsilon=0.1, seed=2, name="a"), want, rtol=0, atol=0)


def test_della_names_its_missing_backends():
    with pytest.raises(BackendUnavailable, match="native does not implement della"):
        della([torch.ones(4)], density=0.5, epsilon=0.1, seed=0, backend="native")
    with pytest.raises(ValueError, match="epsilon: method 'della' needs 0 <= epsilon < density"):
        della([torch.ones(4)], density=0.5, epsilon=0.6, seed=0)


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (all four output words), and the draw
    of element i as word i mod 4 at counter i div 4, from any offset."""
    M = 0xFFFFFFFF
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        assert tuple(int(w) for w in philox4(*(torch.tensor([c]) for c in ctr), *key)) == want
    seed, task, stream = 0x1234_5678_9ABC, 3, 7
    q = torch.arange(2, 5)
    words = torch.stack(philox4(q, q * 0, q * 0 + task, q * 0 + stream, seed & M, seed >> 32), 1).flatten()
    assert torch.equal(draws(9, seed=seed, stream=stream, task=task, offset=9), words[1:10])


def test_dare_keep_rate_and_independence():
    """Each mask keeps ~density of the entries (binomial, 6 sigma), and masks of different
    tasks, names and seeds are different draws."""
    n, d = 200_000, 0.3
    base = MergeSpec(None, False, dare=d, seed=5, stream=0)
    keep = _dare_keep((n,), base, 0)
    assert abs(keep.float().mean().item() - d) < 6 * (d * (1 - d) / n) ** 0.5
    for other in (_dare_keep((n,), base, 1), _dare_keep((n,), MergeSpec(None, False, dare=d, seed=6), 0),
                  _dare_keep((n,), MergeSpec(None, False, dare=d, seed=5, stream=1), 0)):
        both = (keep & other).float().mean().item()
        assert abs(both - d * d) < 6 * (d * d * (1 - d * d) / n) ** 0.5


def test_dare_mask_follows_logical_index_not_memory(gen):
    """A strided view and its contiguous copy get the same mask."""
    require_backend("native")
    x = randn((40, 70), torch.float32, gen, noncontig=True)
    a = dare_linear([x], density=0.5, seed=3, backend="native")
    b = dare_linear([x.contiguous()], density=0.5, seed=3, backend="native")
    assert torch.equal(a, b) and torch.equal(a != 0, _dare_keep(x.shape, MergeSpec(None, False, dare=0.5, seed=3, stream=_fnv1a32("")), 0))


def _mixed_sign_weights(T: int, gen: torch.Generator) -> list[float]:
    """Weights in [-0.5, 1.5] whose every nonempty subset sums to at least 0.25 in magnitude.
    mergekit's semantics divide by the sum of the agreeing weights: where that nearly cancels,
    the merged value is ill-conditioned and any float32 pass (theirs included) loses digits in
    proportion, so the float32 tolerance only holds for well-conditioned draws."""
    while True:
        w = torch.rand(T, generator=gen, dtype=torch.float64) * 2 - 0.5
        subsets = [sum(w[t] for t in range(T) if m >> t & 1) for m in range(1, 1 << T)]
        if min(abs(float(s)) for s in subsets) >= 0.25:
            return w.tolist()


@pytest.mark.interpreter_quick(dtype=torch.float32, shape=INTERPRETED_SHAPES[-1], values="tied")
@pytest.mark.parametrize("backend,dtype,shape", _cases(FAST, pairwise=True))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("values", ["normal", "tied"])
def test_methods_match_reference(gen, backend, method, dtype, shape, values):
    """Every method on every backend that implements it keeps the same entries as the
    reference, ties at the threshold included, and agrees to the dtype's rounding."""
    device = require_backend(backend)
    T = int(torch.randint(1, 6, (), generator=gen))
    layout = ["contiguous", "strided"][int(torch.randint(0, 2, (), generator=gen))]
    if values == "tied":
        tvs = [_tied(shape, dtype, gen, device, layout) for _ in range(T)]
    else:
        tvs = [randn(shape, dtype, gen, device=device, noncontig=layout == "strided") for _ in range(T)]
    weights = _mixed_sign_weights(T, gen)
    fn = METHODS[method]
    try:
        fn([t.cpu()[..., :1] for t in tvs[:1]], None, backend=backend)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    fn.__name__ = method
    assert_matches_reference(lambda tvs, **kw: fn(tvs, weights, **kw), (tvs,), {}, backend=backend, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_trim_keeps_exactly_the_reference_entries(gen, dtype):
    """The radix-select threshold and the tie cut reproduce the reference mask bit for bit:
    with one task and no election the output is the trimmed input itself."""
    require_backend("native")
    # (1100, 960) is past the size where the radix select switches to 16-bit digits.
    for shape, values in [((1000,), "tied"), ((31, 77), "tied"), ((31, 77), "normal"), ((5,), "normal"),
                          ((1100, 960), "tied"), ((1100, 960), "normal")]:
        x = _tied(shape, dtype, gen, "cpu", "strided") if values == "tied" else randn(shape, dtype, gen)
        (x if x.dim() == 1 else x[0])[:3] = torch.tensor([0.0, -0.0, 1e-40]).to(dtype)  # signed zeros, a subnormal
        n = x.numel()
        for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n} if n < 10**6 else {1, n // 5, n - 1}):
            density = k / n
            k_used = int(density * n)
            got = magnitude_prune([x], density=density, backend="native")
            want = x * _topk_keep(x.double(), k_used).to(dtype)
            assert torch.equal(got, want), (shape, values, k)
            assert int((got != 0).sum()) <= k_used


def _select(passes, k, n, chunk, keep_ties, **options):
    """The native select of three tasks streamed by ``passes``: (its thresholds, the radix
    passes it ran, 0 when every bracket finds its k-th). ``options``: bracket=False runs the
    radix alone; blind_sample=True gives a sample that brackets nothing near the threshold;
    max_kept=10 leaves room for 10 kept keys per task, so every listed bracket overflows."""
    select = native_module().TopkSelect(k, n, 3, chunk, keep_ties, **options)
    return drive(select, passes), select.radix_passes


def _select_inputs(kind, gen):
    """Three tasks of 257 x 4100 (rows past one select block), with a base where the values are
    theta - theta_0: float32 normals, rows of scales spread over 2^10, bf16 models (whose float32
    differences tie heavily), and five levels only."""
    shape, base = (257, 4100), None
    if kind == "normal":
        tasks = [randn(shape, torch.float32, gen) for _ in range(3)]
    elif kind == "scaled_rows":
        tasks = [randn(shape, torch.float32, gen) * 2.0 ** torch.randint(-5, 5, (shape[0], 1), generator=gen)
                 for _ in range(3)]
    elif kind == "bf16_models":
        base = randn(shape, torch.bfloat16, gen)
        tasks = [(base.float() + 0.01 * randn(shape, torch.float32, gen)).bfloat16() for _ in range(3)]
    else:
        tasks = [(torch.randint(-2, 3, shape, generator=gen) / 4).float() for _ in range(3)]
    return tasks, base


@pytest.mark.parametrize("kind", ["normal", "scaled_rows", "bf16_models", "levels"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_bracketed_select_agrees_with_the_radix(gen, kind, chunked):
    """The sampled bracket finds each task's exact k-th key and tie cut in one pass, equal to
    the radix select's on fine, row-scaled, heavily tied and few-level data, whole or streamed
    in chunks (one shorter than a sample run); a misleading sample or a full budget falls back
    to the radix and still agrees."""
    require_backend("native")
    tasks, base = _select_inputs(kind, gen)
    if chunked:
        flat = [t.reshape(1, -1) for t in tasks]
        bflat = None if base is None else base.reshape(1, -1)
        n = flat[0].shape[1]
        cuts = [0, 10, 400_000, n - 7, n]
        pieces = [(a, b) for a, b in zip(cuts, cuts[1:])]
        passes = lambda which: [([native_buffer(flat[t][:, a:b]) for t in which],
                                 None if bflat is None else native_buffer(bflat[:, a:b])) for a, b in pieces]
        chunk = max(b - a for a, b in pieces)
    else:
        bufs = [native_buffer(t) for t in tasks]
        bb = None if base is None else native_buffer(base)
        passes = lambda which: [([bufs[t] for t in which], bb)]
        chunk = tasks[0].numel()
    n = tasks[0].numel()
    for k in (1, n // 5, n // 2, n - 3):
        for keep_ties in (False, True):
            want, _ = _select(passes, k, n, chunk, keep_ties, bracket=False)
            got, radix_passes = _select(passes, k, n, chunk, keep_ties)
            assert got == want, (k, keep_ties)
            assert radix_passes == 0, (k, keep_ties)
    k = n // 5
    want, _ = _select(passes, k, n, chunk, False, bracket=False)
    for options in (dict(blind_sample=True), dict(max_kept=10)):
        assert _select(passes, k, n, chunk, False, **options)[0] == want, options
    assert _select(passes, k, n, chunk, False, blind_sample=True)[1] > 0


@pytest.mark.parametrize("kind, dtype", [("normal", torch.float32), ("normal", torch.float64),
                                         ("normal", torch.bfloat16), ("normal", torch.float16),
                                         ("bf16_models", torch.bfloat16), ("bf16_models", torch.float16)])
def test_bracket_pass_agrees_across_isas(gen, kind, dtype):
    """Every native build's bracket pass (AVX-512 keeps 32-bit keys' compare masks and scans them
    per block, or counts in vectors; the others and 64-bit keys scan flags per step) counts,
    keeps and bins the same keys: listed brackets on fine data, marked ones on heavily tied
    data (models in 16-bit floats), rows with a short last block, keys of 16 (task vectors in
    16-bit floats), 32 and 64 bits. Whether a sample marks its bracket is random (about 1 bf16
    draw in 20 does not): tied inputs are drawn until one does."""
    require_backend("native")
    nbits = 63 if dtype == torch.float64 else 15 if dtype.itemsize == 2 and kind == "normal" else 31
    for _ in range(20):
        tasks, base = _select_inputs(kind, gen)
        tasks = [t.to(dtype) for t in tasks]
        base = None if base is None else base.to(dtype)
        bufs = [native_buffer(t) for t in tasks]
        base_buf = None if base is None else native_buffer(base)
        n = tasks[0].numel()
        keys = native_module().abs_sample_keys(bufs, base_buf, 1024, 0)
        lo, hi, marks, _ = zip(*native_module().abs_sample_brackets(keys, 0.2, n, nbits))
        if any(marks) or kind != "bf16_models":
            break
    assert any(marks) == (kind == "bf16_models")
    outs = outputs_per_isa(lambda: native_module().abs_bracket(bufs, base_buf, list(lo), list(hi), list(marks), n))
    for isa, got in outs.items():
        for t, ((above, inside, k0, p0, c0), (a, i, k1, p1, c1)) in enumerate(zip(outs["base"], got)):
            assert (above, inside) == (a, i) and inside > 0, (isa, t)
            # Kept pairs come in per-thread parts: compared in position order.
            assert np.array_equal(p0[np.argsort(p0)], p1[np.argsort(p1)]), (isa, t)
            assert np.array_equal(k0[np.argsort(p0)], k1[np.argsort(p1)]), (isa, t)
            assert np.array_equal(c0, c1), (isa, t)


def test_bracket_pass_counts_a_one_key_bracket(gen):
    """A bracket of one key (lo = hi and the one mark: what the sample of models in 16-bit
    floats gives at scale) counts that key per block and the keys above it, as a sort does."""
    require_backend("native")
    tasks, base = _select_inputs("bf16_models", gen)
    keys = [(t.float() - base.float()).abs().view(torch.int32).long() for t in tasks]
    marks = [int(k.flatten().sort().values[int(0.8 * k.numel())]) for k in keys]
    got = native_module().abs_bracket([native_buffer(t) for t in tasks], native_buffer(base), marks, marks,
                                [[m] for m in marks], 0)
    block = native_module().SELECT_BLOCK
    for k, m, (above, inside, _, _, counts) in zip(keys, marks, got, strict=True):
        tied = (k == m).long()
        per_block = torch.stack([tied[:, c:c + block].sum(1) for c in range(0, k.shape[1], block)], dim=1)
        assert (above, inside) == (int((k > m).sum()), int(tied.sum())) and inside > 100
        assert np.array_equal(counts.ravel(), per_block.flatten().numpy())


def test_order_statistic_equals_a_sort(gen):
    """The histogram select behind the bracket returns what a sorted array holds at each
    position: wide and narrow ranges, heavy ties, one value, int64 positions and 63-bit keys."""
    require_backend("native")
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    cases = [rng.integers(0, 2**31, 70_000, dtype=np.int64).astype(np.uint64),
             rng.integers(2**40, 2**40 + 900, 5000, dtype=np.int64).astype(np.uint64),
             rng.choice(rng.integers(0, 2**62, 6, dtype=np.int64), 30_000).astype(np.uint64),
             np.full(17, 5, np.uint64),
             rng.integers(0, 2**40, 3001, dtype=np.int64),
             np.abs(rng.standard_normal(4000)).view(np.uint64)]
    select = native_module().abs_order_statistic
    for keys in cases:
        ordered = np.sort(keys)
        for i in {0, keys.size - 1, *rng.integers(0, keys.size, 20).tolist()}:
            assert select(keys, int(i)) == int(ordered[i]), (keys.dtype, keys.size, i)
    with pytest.raises(ValueError, match=r"position i must lie in \[0, keys\)"):
        select(cases[0], cases[0].size)


def _sorted_bracket(runs: np.ndarray, q: float, numel: int, nbits: int):
    """The sample's bracket, from the keys sorted: what the native histogram select must give."""
    ordered = np.sort(runs.ravel())
    s = ordered.size
    guess = ordered[s - 1 - min(int(q * s), s - 1)]
    spread = (runs >= guess).mean(axis=1).std() / math.sqrt(runs.shape[0])
    margin = 4 * max(spread, math.sqrt(q * (1 - q) / s)) + 4 / s
    top, bottom = math.floor((q - margin) * s), math.ceil((q + margin) * s)
    hi = int(ordered[s - 1 - top]) if top >= 0 else (1 << nbits) - 1
    lo = int(ordered[s - 1 - bottom]) if bottom < s else 0
    seen, count = np.unique(ordered[(ordered >= lo) & (ordered <= hi)], return_counts=True)
    expected = count.sum() / s * numel
    heaviest = [int(key) for _, key in sorted(zip(count.tolist(), seen.tolist()), reverse=True)[:native_module().SELECT_MARKS - 2]]
    marked = expected > 1 << 16 and 4 * count.max() >= count.sum()
    return lo, hi, sorted({lo, hi, *heaviest}) if marked else [], expected


def test_sample_brackets_equal_those_of_the_sorted_sample(gen):
    """The native bracket from a sample (a histogram select over the keys' range, then one
    digit sorted) equals the one read off the sorted keys: wide and narrow ranges (digits of
    one key), 63-bit keys, heavy ties (marked), one value, quantiles whose bracket runs past
    either end of the sample."""
    require_backend("native")
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    normal = np.abs(rng.standard_normal(4096 * 16)).astype(np.float32).view(np.uint32).astype(np.uint64)
    cases = [(normal, 0.2, 31), (normal, 0.9999, 31), (normal, 1e-5, 31),
             (rng.integers(0, 2**31, 1000 * 16), 0.3, 31),
             (rng.integers(2**40, 2**40 + 900, 300 * 16), 0.5, 63),
             (rng.integers(0, 2**15, 2048 * 16), 0.2, 15),
             (np.abs(rng.standard_normal(700 * 16)).view(np.uint64) & (2**63 - 1), 0.1, 63),
             (rng.choice(rng.integers(0, 2**30, 40), 4096 * 16), 0.2, 31),
             (np.full(16 * 16, 5), 0.5, 31)]
    for keys, q, nbits in cases:
        runs = keys.astype(np.uint64).reshape(2, -1, 16)
        numel = 10**9
        for t, (lo, hi, marks, expected) in enumerate(native_module().abs_sample_brackets(runs, q, numel, nbits)):
            want = _sorted_bracket(runs[t], q, numel, nbits)
            assert (lo, hi, marks) == want[:3], (keys.size, q, nbits, t)
            assert expected == pytest.approx(want[3], rel=1e-12)
    assert any(native_module().abs_sample_brackets(np.asarray(rng.choice([3, 9], 4096 * 16)).astype(np.uint64).reshape(1, -1, 16),
                                      0.2, 10**9, 31)[0][2])  # heavy ties: marked


def test_bracketed_select_steps_reject_bad_arguments():
    require_backend("native")
    m = native_module()
    with pytest.raises(ValueError, match=r"keys: expected \[tasks, runs, 16\] uint64"):
        m.abs_sample_brackets(np.zeros((2, 16), np.uint64), 0.2, 100, 31, 16)
    with pytest.raises(ValueError, match="keys must hold >= 1 task and run"):
        m.abs_sample_brackets(np.zeros((2, 0, 16), np.uint64), 0.2, 100, 31, 16)
    with pytest.raises(ValueError, match=r"q must lie in \(0, 1\)"):
        m.abs_sample_brackets(np.zeros((2, 4, 16), np.uint64), 1.0, 100, 31, 16)
    x = [native_buffer(torch.ones(1, 64))]
    with pytest.raises(ValueError, match="runs must be >= 1 and fit the view"):
        m.abs_sample_keys(x, None, 5, 0)
    with pytest.raises(ValueError, match="lo above hi"):
        m.abs_bracket(x, None, [7], [3], [[]], 10)
    with pytest.raises(ValueError, match="marks must be empty or rise strictly from lo to hi"):
        m.abs_bracket(x, None, [3], [7], [[3, 5, 5, 7]], 10)
    with pytest.raises(ValueError, match="one lo, hi and list of marks per task"):
        m.abs_bracket(x, None, [3, 4], [7], [[]], 10)


def test_disjoint_merge_hand_example():
    tvs = [torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([2.0, 0.0, 0.0, -3.0]),
           torch.tensor([-4.0, 1.0, 0.0, 0.0])]
    for backend in ["reference", "native"]:
        # sum: votes -1, -1, 0 (elects +), 0 (elects +)
        out = disjoint_merge(tvs, sign="sum", backend=backend)
        torch.testing.assert_close(out, torch.tensor([-4.0, -2.0, 0.0, 3.0]), rtol=0, atol=0)
        # count: votes +1, 0 (elects +), 0, 0
        out = disjoint_merge(tvs, sign="count", weights=[1.0, 0.5, 2.0], backend=backend)
        torch.testing.assert_close(out, torch.tensor([(1.0 + 1.0) / 2, 2.0, 0.0, 3.0]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_write_only_their_output(gen, backend, dtype):
    """Launch the kernels directly into an output framed by NaN guard regions."""
    device = require_backend(backend)
    from transferops._checks import as_rows

    tvs = [as_rows(randn((9, 77), dtype, gen, device=device, zeros=0.3, noncontig=True)) for _ in range(3)]
    out, check = guarded_empty((9, 77), dtype, device)
    if backend == "triton":
        from transferops.kernels import merging as kernels

        assert kernels.merge(tvs, out, None, elect=True, count=False, weight_before_election=False, dare=None,
                             block=32) == 0
    elif backend == "native":
        from transferops._backend import native_buffer

        bad, _ = native_module().merge([native_buffer(t) for t in tvs], None, native_buffer(out), None, None, None,
                                       True, 0, False, 1, 1.0)
        assert bad == 0
    else:
        pytest.skip("the cuda launcher allocates through torch; covered by the reference test")
    check()
    assert_close(out, disjoint_merge([t.cpu().double() for t in tvs], backend="reference"), dtype)


def test_native_is_deterministic_across_blocks_and_threads(gen):
    """Each element depends only on its own column of inputs: merging a slice gives the same
    bits as slicing the merge, whatever the parallel split."""
    require_backend("native")
    tvs = [randn((300, 1000), torch.float32, gen, zeros=0.5) for _ in range(5)]
    full = disjoint_merge(tvs, backend="native")
    part = disjoint_merge([t[17:19, 3:700] for t in tvs], backend="native")
    assert torch.equal(full[17:19, 3:700], part)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_nonfinite_input_is_an_error(gen, backend):
    device = require_backend(backend)
    tvs = [randn((5, 33), torch.float32, gen, device=device) for _ in range(3)]
    tvs[1][2, 7] = float("nan")
    tvs[2][4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"task_vectors: expected finite values, found NaN or Inf at 2 element positions"):
        disjoint_merge(tvs, backend=backend)


@pytest.mark.parametrize("call,error,match", [
    (lambda: disjoint_merge([]), ValueError, "task_vectors: expected at least one tensor"),
    (lambda: disjoint_merge(torch.tensor(1.0)), ValueError, "leading task dimension"),
    (lambda: disjoint_merge("x"), TypeError, "task_vectors: expected a sequence"),
    (lambda: disjoint_merge([torch.ones(3), torch.ones(4)]), ValueError, r"task_vectors\[1\]: shape"),
    (lambda: disjoint_merge([torch.ones(3), torch.ones(3, dtype=torch.float64)]), ValueError, r"task_vectors\[1\]: dtype"),
    (lambda: disjoint_merge([torch.ones(3, dtype=torch.int32)]), TypeError, r"task_vectors\[0\]: expected dtype"),
    (lambda: disjoint_merge([torch.ones(3)], sign="mass"), ValueError, "sign: expected one of"),
    (lambda: disjoint_merge([torch.ones(3)] * 2, weights=[1.0]), ValueError, "weights: expected 2 values"),
    (lambda: disjoint_merge([torch.ones(3)], weights=[float("nan")]), ValueError, "weights\\[0\\]: expected a finite number"),
    (lambda: disjoint_merge([torch.ones(3)], backend="fast"), ValueError, "backend: expected one of"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unavailable_backend_says_why():
    with pytest.raises(BackendUnavailable, match="cuda.*cannot run"):
        disjoint_merge([torch.ones(3)], backend="cuda")
    with use_backend("triton"), pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailable, match="triton runs on CUDA tensors"):
            disjoint_merge([torch.ones(3)])


def test_empty_tensors_give_an_empty_result():
    out = disjoint_merge([torch.ones(0, 4), torch.ones(0, 4)])
    assert out.shape == (0, 4)


def test_auto_prefers_native_on_cpu():
    require_backend("native")
    assert merge_op.select(None, torch.device("cpu"), torch.float32, ([], None, MergeSpec(None, True)))[0] == "native"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(golden_file("merge_peft_golden.npz")))


def _golden_tvs(g, name):
    return [torch.from_numpy(g[f"tv{t}/{name}"]) for t in range(3)]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("w", ["w1", "wnu"])
def test_reproduces_peft_dare_ties(golden, backend, w):
    """PEFT 0.21.2's dare_ties and dare_linear with its stored random masks (which came from
    torch's RNG, not ours): trim by mask, rescale by 1/density, then the election and
    disjoint mean, or the weighted sum."""
    require_backend(backend)
    density = float(golden["density"])
    weights = golden["weights_uniform" if w == "w1" else "weights_nonuniform"].tolist()
    for name in golden["names"]:
        masks = [torch.from_numpy(golden[f"mask/peft_dare/tv{t}/{name}"]).bool() for t in range(3)]
        tvs = [tv * m / density for tv, m in zip(_golden_tvs(golden, name), masks)]
        merged = disjoint_merge(tvs, sign="sum", weights=weights, backend=backend)
        expected = torch.from_numpy(golden[f"out/peft_dare_ties_{w}/{name}"] - golden[f"base/{name}"])
        torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
        summed = task_arithmetic(tvs, weights=weights, backend=backend)  # dare_linear, same masks
        expected = torch.from_numpy(golden[f"out/peft_dare_linear_{w}/{name}"] - golden[f"base/{name}"])
        torch.testing.assert_close(summed, expected, rtol=1e-6, atol=1e-6)


def _paper_ties(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """The TIES authors' merge of stacked task vectors [T, P], as their code computes it: the
    (P - int(P * density))-th smallest magnitude per row as threshold, kept with every tie;
    sign of the column sums, zeros replaced by the sign of their sum (0 stays 0, and a 0 sign
    keeps the negative entries); mean over the nonzero agreeing entries."""
    P = tvs.shape[1]
    kth = tvs.abs().kthvalue(P - int(P * density), dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= kth)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    selected = trimmed * torch.where(signs > 0, trimmed > 0, trimmed < 0)
    return selected.sum(0) / (selected != 0).sum(0).clamp(min=1)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("majority", [1, -1, 0])
def test_paper_semantics_reproduce_the_authors_code(gen, backend, majority):
    """Ties at the threshold all kept, and exact-zero votes take the majority sign (each of
    its three cases, forced by construction), bit for bit in float64."""
    require_backend(backend)
    tvs = torch.stack([_tied((401,), torch.float64, gen, "cpu", "contiguous") for _ in range(3)])
    # Columns 0-5 cancel exactly (+a, -a, 0); the rest decide the majority of the signs.
    tvs[:, :6] = torch.tensor([[1.0], [-1.0], [0.0]])
    tvs[:, 6:] = tvs[:, 6:].abs() * majority if majority else tvs[:, 6:] * torch.tensor([[1.0], [-1.0], [0.0]])
    want = _paper_ties(tvs, 0.3)
    got = ties(list(tvs), density=0.3, semantics="paper", backend=backend)
    assert torch.equal(got, want)
    assert int((want[:6] != 0).sum()) == 6  # the zero votes did elect a side


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_paper_semantics_over_the_whole_model(tmp_path, gen, backend):
    """merge(scope='global', semantics='paper') = the authors' pipeline on the sorted, flattened
    model; streamed from sharded files in tiny chunks it gives the same bits."""
    peer("safetensors")
    from transferops.merging import merge, merge_files

    require_backend("native")
    base, models = _models(gen, dtype=torch.float32)
    names = sorted(n for n, v in base.items() if v.is_floating_point())
    flat = lambda sd: torch.cat([sd[n].flatten() for n in names])
    merged = _paper_ties(torch.stack([flat(m) - flat(base) for m in models]).double(), 0.2)
    got = merge(base, models, method="ties", density=0.2, lam=0.5, scope="global", semantics="paper", backend=backend)
    offset = 0
    for n in names:
        size = base[n].numel()
        want = base[n] + 0.5 * merged[offset:offset + size].float().view(base[n].shape)
        torch.testing.assert_close(got[n], want, rtol=0, atol=1e-6)
        offset += size
    paths = [_save_sharded(base, tmp_path / "base")] + [_save_sharded(m, tmp_path / f"ft{i}") for i, m in enumerate(models)]
    merge_files(paths[0], paths[1:], tmp_path / "out", method="ties", density=0.2, lam=0.5, scope="global",
                semantics="paper", max_memory=1 << 14, backend=backend)
    streamed = load_folder(tmp_path / "out")
    assert all(torch.equal(streamed[n], got[n]) for n in got)


@pytest.mark.parametrize("density,gamma", [(0.3, 0.1), (0.9, 0.2), (0.5, 0.0)])
def test_breadcrumbs_matches_mergekit_away_from_ties(gen, density, gamma):
    """mergekit's magnitude_outliers (a sort) on distinct magnitudes, its outlier count cut
    back where the kept entries would run out (0.9 + 0.2 > 1), and gamma = 0."""
    sparsify = pytest.importorskip("mergekit.sparsify")
    tvs = [torch.randn(37, 29, generator=gen) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    want = sum(wt * sparsify.magnitude_outliers(t, density=density, gamma=gamma) for wt, t in zip(w, tvs))
    for backend in ("reference", "native"):
        require_backend(backend)
        got = breadcrumbs(tvs, density=density, gamma=gamma, weights=w, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,sign", [("ties_total", "sum"), ("ties_frequency", "count")])
@pytest.mark.parametrize("w", ["w1", "wnu"])
def test_reproduces_peft_ties_away_from_threshold_ties(golden, method, sign, w):
    """PEFT's ties = per-tensor top-k trim + this election. The trim is redone here with a
    strict threshold; entries whose magnitude ties the k-th largest are left out, since which
    of them PEFT keeps depends on torch.topk's internal order."""
    density = float(golden["density"])
    weights = golden["weights_uniform" if w == "w1" else "weights_nonuniform"].tolist()
    checked = 0
    for name in golden["names"]:
        tvs = _golden_tvs(golden, name)
        k = int(density * tvs[0].numel())
        kth = [t.abs().flatten().kthvalue(t.numel() - k + 1).values for t in tvs]
        at_threshold = torch.stack([t.abs() == v for t, v in zip(tvs, kth)]).any(0)
        trimmed = [t * (t.abs() > v) for t, v in zip(tvs, kth)]
        merged = disjoint_merge(trimmed, sign=sign, weights=weights, backend="reference")
        expected = torch.from_numpy(golden[f"out/peft_{method}_{w}/{name}"] - golden[f"base/{name}"])
        keep = ~at_threshold
        torch.testing.assert_close(merged[keep], expected[keep], rtol=1e-6, atol=1e-6)
        checked += int(keep.sum())
    assert checked > 3000


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("w", ["w1", "wnu"])
def test_methods_reproduce_peft_golden(golden, backend, w):
    """task_arithmetic on every tensor; the top-k methods on the tensors without ties at the
    threshold (b, c), exactly as PEFT 0.21.2 computed them."""
    require_backend(backend)
    density = float(golden["density"])
    weights = golden["weights_uniform" if w == "w1" else "weights_nonuniform"].tolist()
    calls = {
        "task_arithmetic": (lambda tvs: task_arithmetic(tvs, weights=weights, backend=backend), "abc"),
        "magnitude_prune": (lambda tvs: magnitude_prune(tvs, density=density, weights=weights, backend=backend), "bc"),
        "ties_total": (lambda tvs: ties(tvs, density=density, weights=weights, backend=backend), "bc"),
        "ties_frequency": (lambda tvs: ties(tvs, density=density, weights=weights, sign="count", backend=backend), "bc"),
    }
    for method, (call, names) in calls.items():
        for name in names:
            expected = torch.from_numpy(golden[f"out/peft_{method}_{w}/{name}"] - golden[f"base/{name}"])
            torch.testing.assert_close(call(_golden_tvs(golden, name)), expected, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{method} {name}: {m}")


def test_golden_tensor_a_really_has_threshold_ties(golden):
    """The reason tensor a is left out above: its top-k threshold is shared by many entries."""
    tv = _golden_tvs(golden, "a")[0].abs().flatten()
    k = int(float(golden["density"]) * tv.numel())
    assert int((tv == tv.kthvalue(tv.numel() - k + 1).values).sum()) > 10


@pytest.mark.parametrize("call,error,match", [
    (lambda: ties([torch.ones(3)], density=1.5), ValueError, r"density: expected a number in \[0, 1\]"),
    (lambda: ties([torch.ones(3)], density=float("nan")), ValueError, "density: expected a finite number"),
    (lambda: ties([torch.ones(3)], density="x"), TypeError, "density: expected a finite number"),
    (lambda: ties([torch.ones(3)], density=0.5, semantics="paper2"), ValueError, "semantics: expected one of"),
    (lambda: magnitude_prune([torch.ones(3)], density=-0.1), ValueError, "density"),
    (lambda: task_arithmetic([torch.ones(3), torch.ones(2)]), ValueError, r"task_vectors\[1\]: shape"),
    (lambda: dare_linear([torch.ones(3)], density=0.5, seed=-1), ValueError, r"seed: expected 0 <= seed < 2\*\*64"),
    (lambda: dare_linear([torch.ones(3)], density=0.5, seed=1.5), TypeError, "seed: expected an int"),
    (lambda: dare_ties([torch.ones(3)], density=2, seed=1), ValueError, "density"),
    (lambda: dare_ties([torch.ones(3)], density=0.5, seed=1, name=3), TypeError, "name: expected a str"),
])
def test_method_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unimplemented_backend_is_named():
    """A backend forced by use_backend that lacks an implementation names what it lacks."""
    with use_backend("native"):
        with pytest.raises(BackendUnavailable, match="della: backend 'native' cannot run: native does not implement della yet"):
            della([torch.ones(3)], density=0.5, epsilon=0.1, seed=0)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_matches_installed_peft(gen, method):
    merge_utils = peer("peft.utils.merge_utils")
    tvs = [randn((64, 33), torch.float32, gen, zeros=0.6) for _ in range(4)]
    weights = torch.rand(4, generator=gen).add(0.1)
    stacked = torch.stack(tvs)
    mask = merge_utils.calculate_majority_sign_mask(stacked, method=method)
    expected = merge_utils.disjoint_merge(stacked * weights.view(-1, 1, 1), mask)
    got = disjoint_merge(tvs, sign="sum" if method == "total" else "count", weights=weights)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_microbench_native_disjoint_merge(benchmark, gen):
    """pytest-benchmark micro-benchmark (run with --benchmark-enable)."""
    require_backend("native")
    tvs = [randn((1 << 20,), torch.float32, gen, zeros=0.8) for _ in range(4)]
    out = benchmark(disjoint_merge, tvs, backend="native")
    assert out.shape == tvs[0].shape


# ---- whole checkpoints --------------------------------------------------------------------------

def _models(gen, dtype=torch.bfloat16, T=3, rows=300):
    """Base + T fine-tunes with many equal magnitudes (threshold ties) and an integer buffer."""
    def q(shape):
        return (torch.randint(-8, 9, shape, generator=gen) / 8).to(dtype)
    base = {"layer.w": q((rows, 70)), "layer.b": q((70,)), "emb": q((50, 33)), "pos": torch.arange(7)}
    models = [{k: v + q(v.shape) if v.is_floating_point() else v.clone() for k, v in base.items()} for _ in range(T)]
    return base, models


def _save_sharded(state: dict, folder: Path, shards: int = 2) -> Path:
    """A HF-style sharded folder written with safetensors itself (independent of our writer)."""
    from safetensors.torch import save_file
    import json as _json

    folder.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / fname)
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(_json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


MODEL_METHODS = [("ties", dict(density=0.2)), ("ties", dict(density=0.3, semantics="mergekit", sign="count")),
                 ("ties", dict(density=0.25, semantics="paper")), ("breadcrumbs_ties", dict(density=0.3, gamma=0.1)),
                 ("della", dict(density=0.5, epsilon=0.2, seed=4)),
                 ("dare_ties", dict(density=0.5, seed=1)), ("dare_linear", dict(density=0.7, seed=2**33)),
                 ("magnitude_prune", dict(density=0.1)), ("task_arithmetic", {})]


@pytest.mark.parametrize("method,kw", MODEL_METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(MODEL_METHODS)])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_merge_files_streams_exactly_the_in_memory_merge(tmp_path, gen, method, kw, backend):
    """Sharded inputs, tensors split in many chunks (tiny memory budget), several output shards:
    the result equals the in-memory merge bit for bit, top-k ties and DARE masks included."""
    peer("safetensors")
    from transferops.merging import merge, merge_files

    require_backend(backend)
    if method == "della" and backend == "native":
        pytest.skip("della runs on the reference backend only")
    base, models = _models(gen)
    paths = [_save_sharded(base, tmp_path / "base")] + [_save_sharded(m, tmp_path / f"ft{i}") for i, m in enumerate(models)]
    want = merge(base, models, method=method, lam=0.8, weights=[1.0, 0.5, 0.7], backend=backend, **kw)
    written = merge_files(paths[0], paths[1:], tmp_path / "out", method=method, lam=0.8, weights=[1.0, 0.5, 0.7],
                          max_memory=1 << 14, shard_size=30_000, backend=backend, **kw)
    assert (tmp_path / "out" / "model.safetensors.index.json") in written and len(written) >= 3
    got = load_folder(tmp_path / "out")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not list((tmp_path / "out").glob(".*partial"))


def test_merge_in_memory_matches_the_per_tensor_functions(gen):
    """merge() = base + lam * method(theta_t - theta_0), task vectors formed in float32."""
    from transferops.merging import merge

    base, models = _models(gen, dtype=torch.float32)
    got = merge(base, models, method="ties", density=0.25, lam=0.5)
    tvs = [m["emb"] - base["emb"] for m in models]
    torch.testing.assert_close(got["emb"], base["emb"] + 0.5 * ties(tvs, density=0.25), rtol=0, atol=1e-7)
    assert torch.equal(got["pos"], base["pos"])


@pytest.mark.parametrize("method,kw", [("ties", dict(density=0.2)), ("ties", dict(density=0.25, semantics="paper")),
                                       ("ties", dict(density=0.2, scope="global")), ("dare_linear", dict(density=0.7, seed=3))],
                         ids=["ties", "paper", "global", "dare"])
@pytest.mark.parametrize("backend", ["native", pytest.param("reference", marks=pytest.mark.slow)])
@pytest.mark.parametrize("in_place", [False, True], ids=["into", "in_place"])
def test_merge_out_writes_what_a_fresh_merge_returns(gen, method, kw, backend, in_place):
    """merge(..., out=) fills the given tensors, the base's own included (in place, where every
    pass reads an element before the merge pass writes it), with the fresh merge's bits."""
    from transferops.merging import merge

    require_backend(backend)
    base, models = _models(gen, rows=15000)  # layer.w over _BRACKET_MIN: the bracketed select runs
    want = merge(base, models, method=method, lam=0.8, backend=backend, **kw)
    target = base if in_place else {n: torch.full_like(t, 7) for n, t in base.items()}
    pointers = {n: t.data_ptr() for n, t in target.items()}
    got = merge(base, models, method=method, lam=0.8, backend=backend, out=target, **kw)
    assert got is target and {n: t.data_ptr() for n, t in got.items()} == pointers
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_merge_out_refuses_what_it_cannot_write_safely(gen):
    """Each bad ``out`` is named with what was expected; overlaps that would feed the merge its
    own output (a model's tensor, another name's base tensor, tied weights) are refused."""
    from transferops.merging import merge

    base, models = _models(gen, dtype=torch.float32)
    kw = dict(method="ties", density=0.2)

    def fresh():
        return {n: torch.empty_like(t) for n, t in base.items()}
    cases = [
        ([1, 2], TypeError, "out: expected a state dict"),
        ({n: t for n, t in fresh().items() if n != "emb"}, ValueError, r"out: no tensor for \['emb'\]"),
        ({**fresh(), "emb": torch.empty(50, 34)}, ValueError, r"out\['emb'\]: expected \(50, 33\) torch.float32"),
        ({**fresh(), "emb": torch.empty(50, 33, dtype=torch.float64)}, ValueError, r"out\['emb'\]: expected"),
        ({**fresh(), "emb": torch.empty(33, 50).t()}, ValueError, r"out\['emb'\]: expected a contiguous tensor"),
        ({**fresh(), "emb": models[1]["emb"]}, ValueError, r"out\['emb'\] overlaps models\[1\]\['emb'\]"),
        ({**fresh(), "emb": "x"}, TypeError, r"out\['emb'\]: expected a tensor"),
    ]
    shared = fresh()
    shared["layer.b"] = shared["layer.w"][0]  # two outputs in one place
    cases.append((shared, ValueError, r"out\[.layer.(w|b).\] overlaps out\[.layer.(w|b).\]"))
    for out, error, message in cases:
        with pytest.raises(error, match=message):
            merge(base, models, out=out, **kw)
    # Tied weights (one tensor under two names) are merged once, in place too, and stay tied;
    # a model whose two names differ is refused.
    want = merge(base, models, **kw)
    tied = {n: t.clone() for n, t in base.items()}
    tied["emb2"] = tied["emb"]
    tied_models = [dict(m, emb2=m["emb"]) for m in models]
    for out in (None, tied):
        got = merge(tied, tied_models, out=out, **kw)
        assert got["emb2"] is got["emb"] and all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(ValueError, match=r"models\[1\]\['emb2'\]: differs from 'emb'"):
        merge(dict(base, emb2=base["emb"]), [tied_models[0], dict(models[1], emb2=models[1]["emb"] + 1)], **kw)
    twin = dict(base, emb2=base["emb"].clone())
    twin_models = [dict(m, emb2=m["emb"].clone()) for m in models]
    with pytest.raises(ValueError, match=r"out\['emb2'\] overlaps base\['emb'\]"):
        merge(twin, twin_models, out={**{n: torch.empty_like(t) for n, t in twin.items()}, "emb2": twin["emb"]}, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_model_merge_matches_reference_on_a_large_tensor(gen, dtype):
    """The fused native path (tau = theta_t - theta_0 formed inside the radix passes and the
    merge, 16-bit digits on a tensor this large) keeps exactly the reference's entries."""
    from transferops.merging import merge

    require_backend("native")
    base = {"w": randn((1100, 960), dtype, gen)}
    models = [{"w": (base["w"].float() + 0.01 * randn((1100, 960), torch.float32, gen)).to(dtype)} for _ in range(3)]
    kw = dict(method="ties", density=0.2, lam=0.9, weights=[1.0, 0.5, 2.0])
    got, want = merge(base, models, backend="native", **kw)["w"], merge(base, models, backend="reference", **kw)["w"]
    assert_close(got, want, dtype)


def test_block_weights_compose_per_parameter_block(gen):
    """aTLAS-style: one coefficient per task and block, first matching pattern wins; a tensor
    no pattern covers is an error naming it."""
    from transferops.merging import merge

    base, models = _models(gen, dtype=torch.float32)
    blocks = {"layer.*": [0.5, -1.0, 2.0], "*": [1.0, 0.25, 0.0]}
    got = merge(base, models, method="task_arithmetic", weights=blocks, lam=0.5)
    for name in ("layer.w", "layer.b", "emb"):
        w = blocks["layer.*"] if name.startswith("layer.") else blocks["*"]
        want = base[name] + 0.5 * sum(wt * (m[name] - base[name]) for wt, m in zip(w, models))
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no pattern matches tensor 'emb'"):
        merge(base, models, method="task_arithmetic", weights={"layer.*": [1.0] * 3})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_memory_merge_needs_little_beyond_its_output(dtype):
    """merge() on the native path (whole tensors, exact top-k by the bracketed select) grows
    the peak RSS by its output plus a few percent, not by the T x P task vectors (measured in a
    child process, Linux)."""
    require_backend("native")
    import json as _json
    import os
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    prog = f"""
import json, torch
from transferops.bench.harness import peak_rss, reset_peak_rss
from transferops.merging import merge
g = torch.Generator().manual_seed(0)
base = {{"w": torch.randn(2048, 2600, generator=g).to(torch.{dtype})}}
models = [{{"w": (base["w"].float() + 0.01 * torch.randn(2048, 2600, generator=g)).to(torch.{dtype})}} for _ in range(4)]
merge({{"w": base["w"][:1]}}, [{{"w": m["w"][:1]}} for m in models], method="ties", density=0.2)
before = reset_peak_rss()
merge(base, models, method="ties", density=0.2)
print(json.dumps({{"growth": peak_rss() - before, "output": base["w"].numel() * base["w"].element_size()}}))
"""
    # A fixed mmap threshold: glibc then returns large freed blocks to the system at once, and a
    # fresh output cannot hide in memory the set-up freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    stats = _json.loads(res.stdout.strip().splitlines()[-1])
    extra = stats["growth"] - stats["output"]
    task_vectors = 4 * stats["output"] * (2 if dtype == "bfloat16" else 1)  # T float32 task vectors
    print(f"{dtype}: output {stats['output'] / 1e6:.1f} MB, peak growth beyond it {extra / 1e6:.1f} MB, "
          f"T float32 task vectors {task_vectors / 1e6:.0f} MB")
    assert extra < 0.25 * stats["output"] + (4 << 20), extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_native_outputs_are_advised_huge_pages(monkeypatch, gen, dtype):
    """Outputs of 32 MB and more are private mappings advised MADV_HUGEPAGE (their first-touch
    faults cost as much as the merge pass otherwise); TRANSFEROPS_HUGEPAGES=0 and smaller
    outputs use torch's allocator. The result is an ordinary tensor that outlives its inputs."""
    require_backend("native")
    from transferops import _memory

    mode = require_thp()
    numel = (_memory.HUGE_MIN_BYTES // torch.empty((), dtype=dtype).element_size()) + 3
    tvs = [torch.randn(numel, generator=gen).to(dtype) for _ in range(2)]
    got = task_arithmetic(tvs, backend="native")
    assert thp_eligible(got) and got.is_contiguous() and got.dtype == dtype and got.shape == (numel,)
    want = (tvs[0].float() + tvs[1].float()).to(dtype)
    del tvs
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.add_(1)  # writable
    if "[madvise]" not in mode.read_text():
        return  # "always": every mapping is eligible
    assert not thp_eligible(task_arithmetic([want[:1000]], backend="native"))
    monkeypatch.setenv("TRANSFEROPS_HUGEPAGES", "0")
    assert not thp_eligible(task_arithmetic([want], backend="native"))


@pytest.mark.slow
def test_cli_merges_a_multishard_bf16_checkpoint_under_a_memory_cap(tmp_path, gen):
    """The CLI's peak memory growth stays far below one model (measured, in a child process)
    and its output loads with safetensors and equals the in-memory merge."""
    peer("safetensors")
    import json as _json
    import subprocess
    import sys

    from transferops.merging import merge

    base, models = _models(gen, rows=40_000)  # 2.8M params per model, ~5.6 MB in bf16
    model_bytes = sum(v.numel() * v.element_size() for v in base.values())
    paths = [_save_sharded(base, tmp_path / "base")] + [_save_sharded(m, tmp_path / f"ft{i}") for i, m in enumerate(models)]
    cap = model_bytes // 8
    tiny_base, tiny = _models(gen, T=3, rows=300)
    tiny_paths = [_save_sharded(tiny_base, tmp_path / "tiny_base")] + [
        _save_sharded(m, tmp_path / f"tiny{i}") for i, m in enumerate(tiny)]
    warm = ["merge", "--method", "ties", "--density", "0.2", "--base", str(tiny_paths[0]), *map(str, tiny_paths[1:]),
            "-o", str(tmp_path / "warm"), "--max-memory", str(cap), "-q"]
    prog = f"""
import json, sys
from transferops.bench.harness import peak_rss, reset_peak_rss
from transferops.cli import main
# A first run on a tiny model pays the one-time costs (imports, kernels' first use, thread
# pools); then the peak is reset (Linux: clear_refs 5) and the measured run starts.
assert main({warm!r}) == 0
before = reset_peak_rss()
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "before": before, "peak": peak_rss()}}))
"""
    args = ["merge", "--method", "ties", "--density", "0.2", "--lam", "0.9", "--base", str(paths[0]),
            *map(str, paths[1:]), "-o", str(tmp_path / "out"), "--max-memory", str(cap), "--shard-size", "4MB", "-q"]
    res = subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    stats = _json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["code"] == 0
    growth = stats["peak"] - stats["before"]
    print(f"model {model_bytes / 1e6:.1f} MB, cap {cap / 1e6:.2f} MB, peak growth {growth / 1e6:.2f} MB")
    assert growth < 2 * cap, growth  # a whole tensor of one model alone would be 5.6 MB
    got = load_folder(tmp_path / "out")
    want = merge(base, models, method="ties", density=0.2, lam=0.9)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _no_output(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_merge_files_errors_leave_no_output(tmp_path, gen):
    peer("safetensors")
    from safetensors.torch import save_file

    from transferops._safetensors import CheckpointError
    from transferops.merging import merge_files

    base, models = _models(gen, T=2)
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"ft{i}.safetensors")
    ok = [tmp_path / "ft0.safetensors", tmp_path / "ft1.safetensors"]

    bad_shape = dict(models[0], **{"emb": torch.zeros(50, 34, dtype=torch.bfloat16)})
    save_file(bad_shape, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"models\[1\]: tensor 'emb' is \(50, 34\)"):
        merge_files(tmp_path / "base.safetensors", [ok[0], tmp_path / "shape.safetensors"], tmp_path / "o1", method="task_arithmetic")
    assert _no_output(tmp_path / "o1")

    missing = {k: v for k, v in models[0].items() if k != "layer.b"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"models\[0\].*missing \['layer.b'\]"):
        merge_files(tmp_path / "base.safetensors", [tmp_path / "missing.safetensors"], tmp_path / "o2", method="task_arithmetic")

    raw = (tmp_path / "ft1.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="trunc.safetensors.*truncated"):
        merge_files(tmp_path / "base.safetensors", [ok[0], tmp_path / "trunc.safetensors"], tmp_path / "o3", method="task_arithmetic")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors: corrupt header"):
        merge_files(tmp_path / "base.safetensors", [tmp_path / "junk.safetensors"], tmp_path / "o4", method="task_arithmetic")

    nan = dict(models[1])
    nan["layer.w"] = nan["layer.w"].clone()
    nan["layer.w"][5, 5] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="finite values"):
        merge_files(tmp_path / "base.safetensors", [ok[0], tmp_path / "nan.safetensors"], tmp_path / "o5",
                    method="ties", density=0.5)
    for o in ("o2", "o3", "o4", "o5"):
        assert _no_output(tmp_path / o), o
    with pytest.raises(ValueError, match="density: method 'ties' needs a density"):
        merge_files(tmp_path / "base.safetensors", ok, tmp_path / "o6", method="ties")
    with pytest.raises(ValueError, match="seed: method 'dare_ties' needs an integer seed"):
        merge_files(tmp_path / "base.safetensors", ok, tmp_path / "o7", method="dare_ties", density=0.5)


def test_cli_reads_a_mergekit_config(tmp_path, gen):
    peer("safetensors")
    peer("yaml")
    from safetensors.torch import save_file

    from transferops.cli import main
    from transferops.merging import merge

    base, models = _models(gen, T=2)
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"ft{i}.safetensors")
    (tmp_path / "cfg.yaml").write_text(f"""
merge_method: ties
base_model: {tmp_path / 'base.safetensors'}
models:
  - model: {tmp_path / 'ft0.safetensors'}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {tmp_path / 'ft1.safetensors'}
    parameters: {{weight: 0.4, density: 0.3}}
parameters: {{normalize: true}}
dtype: bfloat16
""")
    assert main(["merge", "--config", str(tmp_path / "cfg.yaml"), "-o", str(tmp_path / "out"), "-q"]) == 0
    want = merge(base, models, method="ties", density=0.3, weights=[0.7, 0.4], semantics="mergekit")
    got = load_folder(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_native_float16_conversions_exact():
    """Every finite float16, widened, scaled (into subnormals and past the largest float16) and
    rounded back by each native build, equals torch's float32 arithmetic and rounding (the
    float64 reference would round once, not twice)."""
    require_backend("native")
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = every[torch.isfinite(every)].reshape(32, -1)
    for isa in native_module().cpu_isas():
        with native_isa(isa):
            for w in (1.0, 0.5, 1e-3, 3.0, 7e3):
                got = task_arithmetic([x], weights=[w], backend="native")
                # The pass sums onto +0, which turns -0 into +0.
                want = (torch.zeros(x.shape) + x.float() * torch.tensor(w, dtype=torch.float32)).half()
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (isa, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_isas_agree_bit_for_bit(gen, dtype):
    """Every build of the kernels this CPU runs (baseline, AVX2, AVX-512) gives identical bits
    (no FMA contraction, same order of operations), with four tasks (one sweep everywhere),
    eight (one sweep in the AVX-512 TIES loop, two groups of four elsewhere) and nine (groups
    of four and a single task everywhere), on task vectors and on models with a base (whose
    differences the pass forms)."""
    from transferops.merging import merge

    require_backend("native")
    native = native_module()
    tvs = [_tied((37, 301), dtype, gen, "cpu", "strided") for _ in range(4)] + [randn((37, 301), dtype, gen)
                                                                                for _ in range(5)]
    weights = [0.3, -0.7, 1.1, 0.9, 0.6, -0.2, 0.8, 1.3, -0.4]
    starts = (5, 1, 0)
    cases = [(tvs[k:], weights[k:]) for k in starts]
    base = {"w": randn((37, 301), dtype, gen)}
    models = [{"w": (base["w"].float() + t.float()).to(dtype)} for t in tvs]
    outs = outputs_per_isa(lambda: [fn(t, w, backend="native") for t, w in cases for fn in METHODS.values()] +
                           [merge(base, models[k:], method="ties", density=0.3, lam=0.7, weights=weights[k:],
                                  backend="native")["w"] for k in starts])
    names = [m for _ in cases for m in METHODS] + [f"merge_ties_{len(tvs) - k}" for k in starts]
    for isa, got in outs.items():
        for method, a, b in zip(names, outs["base"], got, strict=True):
            assert torch.equal(a, b), (isa, method)
    with pytest.raises(ValueError, match="isa: expected one of"):
        native.set_cpu_isa("sve")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_global_scope_thresholds_the_whole_model(tmp_path, gen, backend):
    """scope='global': one top-k per task over all float tensors together (ties: lowest
    position in sorted-name order first), then PEFT's election per entry; streamed == in memory
    although the files hold the tensors in another order."""
    peer("safetensors")
    from transferops.merging import merge, merge_files

    require_backend("native")  # the global radix select streams through the native kernels
    base, models = _models(gen, dtype=torch.float32)
    names = sorted(n for n, v in base.items() if v.is_floating_point())  # the global order
    got = merge(base, models, method="ties", density=0.15, lam=0.7, scope="global", backend=backend)
    taus = [torch.cat([(m[n] - base[n]).flatten() for n in names]) for m in models]
    k = int(0.15 * taus[0].numel())
    trimmed = [t * _topk_keep(t.double(), k) for t in taus]
    offset = 0
    for n in names:
        size = base[n].numel()
        merged = disjoint_merge([t[offset:offset + size] for t in trimmed], backend="reference")
        torch.testing.assert_close(got[n], base[n] + 0.7 * merged.view(base[n].shape), rtol=0, atol=1e-6)
        offset += size
    per_tensor = merge(base, models, method="ties", density=0.15, lam=0.7, backend=backend)
    assert any(not torch.equal(got[n], per_tensor[n]) for n in names)

    paths = [_save_sharded(base, tmp_path / "base")] + [_save_sharded(m, tmp_path / f"ft{i}") for i, m in enumerate(models)]
    merge_files(paths[0], paths[1:], tmp_path / "out", method="ties", density=0.15, lam=0.7, scope="global",
                max_memory=1 << 14, backend=backend)
    streamed = load_folder(tmp_path / "out")
    assert all(torch.equal(streamed[n], got[n]) for n in base)
