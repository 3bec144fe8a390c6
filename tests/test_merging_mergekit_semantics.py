"""mergekit's semantics in the fused merge pass: per-task densities (and gamma, epsilon),
normalize (an election's sum of the agreeing entries), and DARE/DELLA without the 1/p rescale,
with mergekit's L1 rescale. Every backend against the float64 reference, and the reference
against mergekit 0.1.5's own GeneralizedTaskArithmeticMerge fed our Philox masks."""
import pytest
import torch

from transferops import BackendUnavailable
from transferops.merging import (MergeSpec, _dare_keep, _della_keep_probability, _draws, _fnv1a32, breadcrumbs,
                                 breadcrumbs_ties, dare_linear, dare_ties, della, della_linear, magnitude_prune,
                                 merge, merge_files, method_spec, task_arithmetic, ties)

from _kit import assert_close, backend_cases, assert_matches_reference, load_folder, peer, randn, require_backend

FAST = ["native", "triton"]
SHAPES = [(7,), (37, 129), (3, 5, 129)]
# The Triton interpreter's shapes (no GPU; see _kit.backend_cases): fewer rows, still several.
INTERPRETED_SHAPES = [(7,), (5, 129), (2, 3, 129)]


def _cases(backends, *, pairwise=False):
    return backend_cases(backends, SHAPES, INTERPRETED_SHAPES, pairwise=pairwise)


def _fractions(gen, T, low, high):
    return [round(low + (high - low) * float(u), 3) for u in torch.rand(T, generator=gen, dtype=torch.float64)]


# Each: (tvs, weights, per-task fractions drawn for T tasks) -> merged, in a configuration of its own.
CONFIGS = {
    "dare_ties_mergekit": lambda tvs, w, f, **kw: dare_ties(tvs, density=f(0.2, 0.9), seed=2**40 + 7, weights=w,
                                                            name="a", semantics="mergekit", **kw),
    "dare_ties_mergekit_normalized_count": lambda tvs, w, f, **kw: dare_ties(
        tvs, density=f(0.3, 0.8), seed=3, weights=w, sign="count", semantics="mergekit", normalize=True, **kw),
    "dare_linear_mergekit": lambda tvs, w, f, **kw: dare_linear(tvs, density=f(0.1, 0.9), seed=9, weights=w,
                                                                name="b", semantics="mergekit", **kw),
    "dare_linear_mergekit_plain": lambda tvs, w, f, **kw: dare_linear(
        tvs, density=0.6, seed=9, weights=w, semantics="mergekit", rescale=False, normalize=True, **kw),
    "dare_ties_peft_per_task": lambda tvs, w, f, **kw: dare_ties(tvs, density=f(0.3, 0.9), seed=1, weights=w, **kw),
    "ties_mergekit_rescaled_sum": lambda tvs, w, f, **kw: ties(tvs, density=f(0.05, 0.6), weights=w,
                                                               semantics="mergekit", rescale=True, normalize=False,
                                                               **kw),
    "ties_peft_sum": lambda tvs, w, f, **kw: ties(tvs, density=f(0.1, 0.5), weights=w, normalize=False, **kw),
    "breadcrumbs_ties_mergekit": lambda tvs, w, f, **kw: breadcrumbs_ties(
        tvs, density=f(0.3, 0.8), gamma=f(0.0, 0.15), weights=w, semantics="mergekit", **kw),
    "breadcrumbs_mergekit_rescaled": lambda tvs, w, f, **kw: breadcrumbs(
        tvs, density=0.5, gamma=f(0.01, 0.1), weights=w, semantics="mergekit", rescale=True, **kw),
    "magnitude_prune_per_task": lambda tvs, w, f, **kw: magnitude_prune(tvs, density=f(0.0, 1.0), weights=w, **kw),
    "task_arithmetic_normalized": lambda tvs, w, f, **kw: task_arithmetic(tvs, weights=w, normalize=True, **kw),
    "della_mergekit": lambda tvs, w, f, **kw: della(tvs, density=f(0.4, 0.6), epsilon=0.1, seed=4, weights=w,
                                                    semantics="mergekit", **kw),
}


@pytest.mark.interpreter_quick(dtype=torch.float32, shape=INTERPRETED_SHAPES[-1])
@pytest.mark.parametrize("backend,dtype,shape", _cases(FAST, pairwise=True))
@pytest.mark.parametrize("config", CONFIGS)
def test_mergekit_semantics_match_reference(gen, backend, config, dtype, shape):
    """Odd sizes, contiguous or strided inputs, every float dtype: each backend keeps the
    reference's entries and agrees to the dtype's rounding (weights of one sign, so that the
    mergekit means stay well conditioned)."""
    device = require_backend(backend)
    T = int(torch.randint(1, 5, (), generator=gen))
    strided = bool(torch.randint(0, 2, (), generator=gen))
    tvs = [randn(shape, dtype, gen, device=device, zeros=0.1, noncontig=strided) for _ in range(T)]
    weights = (torch.rand(T, generator=gen, dtype=torch.float64) + 0.25).tolist()
    fractions = {}

    def f(low, high):  # the same draws for the backend and the reference
        return fractions.setdefault((low, high), _fractions(gen, T, low, high))
    fn = CONFIGS[config]
    try:
        fn([t.cpu()[..., :1] for t in tvs], weights, f, backend=backend)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    run = lambda tvs, **kw: fn(tvs, weights, f, **kw)
    run.__name__ = config
    assert_matches_reference(run, (tvs,), {}, backend=backend, dtype=dtype)


def test_normalize_false_sums_the_agreeing_entries():
    """By hand: votes +3 +1 -2 elect +; mergekit's vote weighs first (w = 1, 2, 1)."""
    tvs = [torch.tensor([v], dtype=torch.float64) for v in (3.0, 1.0, -2.0)]
    for backend in ["reference", "native"]:
        got = ties(tvs, density=1.0, weights=[1.0, 2.0, 1.0], semantics="mergekit", normalize=False, backend=backend)
        assert got.item() == 5.0
        assert ties(tvs, density=1.0, weights=[1.0, 2.0, 1.0], semantics="mergekit", backend=backend).item() == 5 / 3
        assert ties(tvs, density=1.0, normalize=False, backend=backend).item() == 4.0
        assert task_arithmetic(tvs, weights=[1.0, 2.0, 1.0], normalize=True, backend=backend).item() == 3 / 4


def test_rescale_restores_each_tasks_l1_norm(gen):
    """A task's kept entries, rescaled, have its whole L1 norm: dare_linear of one task."""
    x = torch.randn(301, generator=gen, dtype=torch.float64)
    for backend in ["reference", "native"]:
        got = dare_linear([x], density=0.3, seed=5, semantics="mergekit", backend=backend)
        assert (got != 0).sum() < 150
        torch.testing.assert_close(got.abs().sum(), x.abs().sum(), rtol=1e-13, atol=0)
    zero = dare_linear([torch.zeros(9, dtype=torch.float64)], density=0.5, seed=1, semantics="mergekit")
    assert torch.equal(zero, torch.zeros(9, dtype=torch.float64))  # mergekit's 1e-7 guard: no 0 / 0


def test_della_keeps_all_at_density_1_and_none_at_0(gen):
    """mergekit's della_magprune returns a task whole at density 1 and zeros at 0, whatever
    epsilon (which would otherwise put the probabilities outside [0, 1])."""
    tvs = [torch.randn(33, 17, generator=gen, dtype=torch.float64) for _ in range(2)]
    got = della_linear(tvs, density=[1.0, 0.0], epsilon=0.3, seed=1, semantics="mergekit")
    assert torch.equal(got, tvs[0])
    with pytest.raises(ValueError, match="epsilon"):
        della_linear(tvs, density=[1.0, 0.0], epsilon=0.3, seed=1)  # the paper's: probabilities 1.3 and -0.3


@pytest.mark.parametrize("call,error,match", [
    (lambda: method_spec("dare_ties", density=0.5, seed=1, rescale=True), ValueError, "rescale: .*semantics='mergekit'"),
    (lambda: method_spec("ties", density=0.5, normalize=1), TypeError, "normalize"),
    (lambda: method_spec("ties", density=[0.5, 1.5]), ValueError, r"density\[1\]"),
    (lambda: method_spec("ties", density=[]), ValueError, "density"),
    (lambda: method_spec("breadcrumbs", density=[0.5, 0.4], gamma=[0.1, 0.1, 0.1]), ValueError, "gamma"),
    (lambda: method_spec("della", density=[0.5, 0.2], epsilon=0.3, seed=1), ValueError, "epsilon"),
    (lambda: method_spec("ties", density=[0.5, 0.4], tasks=3), ValueError, "density: .*one per task \\(3\\)"),
    (lambda: ties([torch.ones(3)] * 3, density=[0.5, 0.4]), ValueError, "density"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_merge_files_streams_exactly_the_in_memory_merge(tmp_path, gen):
    """A tensor of several L1 blocks merged in 1024-element chunks from disk (its rescale found
    by a pass of its own) equals the in-memory merge bit for bit, on both CPU backends."""
    peer("safetensors")
    from safetensors.torch import save_file

    base = {"w": torch.randn(300, 70, generator=gen), "b": torch.randn(70, generator=gen)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path, sd in zip(paths, [base, *models]):
        save_file(sd, path)
    runs = [("dare_ties", dict(density=[0.3, 0.6, 0.8], seed=2)),
            ("ties", dict(density=[0.1, 0.3, 0.2], rescale=True, normalize=False)),
            ("breadcrumbs", dict(density=0.4, gamma=[0.01, 0.05, 0.1], rescale=True))]
    for backend in ["native", "reference"]:
        require_backend(backend)
        for i, (method, kw) in enumerate(runs):
            args = dict(method=method, semantics="mergekit", weights=[0.5, 1.0, 0.8], lam=0.9, backend=backend, **kw)
            want = merge(base, models, **args)
            merge_files(paths[0], paths[1:], tmp_path / f"out{backend}{i}", max_memory=1 << 14, **args)
            got = load_folder(tmp_path / f"out{backend}{i}")
            for name in want:
                assert torch.equal(got[name], want[name]), (backend, method, name)


# ---- against mergekit 0.1.5 itself ----------------------------------------------------------------

class _MergekitTorch:
    """What mergekit.sparsify sees as `torch`: torch, except that ``bernoulli`` returns our keep
    masks in call order (mergekit draws one per model, in order) and records the probabilities
    asked for, and that its CPU work dtype (``torch.float32``, where on a GPU it keeps the
    tensor's) is ``work``: float64 inputs then stay float64, as on a GPU."""

    def __init__(self, masks, work):
        self.masks, self.float32, self.asked = iter(masks), work, []

    def bernoulli(self, p):
        self.asked.append(p)
        return next(self.masks).to(p.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


def _distinct(shape, dtype, gen):
    """Normal values whose magnitudes are all distinct in ``dtype`` (mergekit's sorts break ties
    their own way)."""
    while True:
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if x.abs().flatten().unique().numel() == x.numel():
            return x


MERGEKIT_RUNS = [
    ("dare_ties", dict(density=[0.3, 0.65, 0.5]), {}),
    ("dare_ties", dict(density=[0.4, 0.7, 0.55]), dict(normalize=True)),
    ("dare_linear", dict(density=[0.2, 0.9, 0.5]), {}),
    ("dare_linear", dict(density=[0.5, 0.5, 0.3]), dict(rescale=False)),
    ("della", dict(density=[0.5, 0.4, 0.6], epsilon=[0.1, 0.2, 0.05]), {}),
    ("della_linear", dict(density=[0.5, 0.4, 0.6], epsilon=[0.1, 0.2, 0.05]), {}),
    ("breadcrumbs_ties", dict(density=[0.5, 0.3, 0.7], gamma=[0.01, 0.1, 0.05]), {}),
    ("breadcrumbs", dict(density=[0.5, 0.3, 0.7], gamma=[0.01, 0.1, 0.05]), dict(rescale=True)),
    ("ties", dict(density=[0.1, 0.4, 0.25]), {}),
    ("ties", dict(density=[0.1, 0.4, 0.25]), dict(rescale=True, normalize=False)),
]
MERGEKIT_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}


@pytest.mark.parametrize("dtype", MERGEKIT_TOL, ids=str)
@pytest.mark.parametrize("shape", [(37, 41), (257,), (3, 7, 5)], ids=str)
@pytest.mark.parametrize("method,kw,flags", MERGEKIT_RUNS,
                         ids=[f"{m}-{'-'.join(f) or 'default'}" for m, _, f in MERGEKIT_RUNS])
def test_matches_mergekit(monkeypatch, gen, method, kw, flags, dtype, shape):
    """merge(semantics="mergekit") equals mergekit's merge_group with its defaults (or the
    flags given) and per-model parameters, its torch.bernoulli returning our Philox masks; the
    DELLA probabilities it asks for equal ours (ranked along dimension 1, 1-D as one row)."""
    peer("mergekit")
    from mergekit import sparsify
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    T, weights, lam, seed = 3, [0.6, 1.1, 0.35], 0.8, 12345
    base = _distinct(shape, dtype, gen)
    models = [base + _distinct(shape, dtype, gen) for _ in range(T)]
    tvs = [(m - base).to(torch.float64) for m in models]
    stream = _fnv1a32("w")
    masks, probs = [], []
    for t, x in enumerate(tvs):
        if method.startswith("dare"):
            masks.append(_dare_keep(x.shape, MergeSpec(None, False, dare=tuple(kw["density"]), seed=seed, stream=stream), t))
        elif method.startswith("della"):
            probs.append(_della_keep_probability(x, kw["density"][t], kw["epsilon"][t], dim=1))
            masks.append(_draws(x.shape, MergeSpec(None, False, seed=seed, stream=stream), t) / 2.0**32 < probs[-1])
    proxy = _MergekitTorch(masks, dtype)
    monkeypatch.setattr(sparsify, "torch", proxy)
    params = {"weight": dict(enumerate(weights)), "density": dict(enumerate(kw["density"])), "lambda": lam,
              "int8_mask": False, "normalize": flags.get("normalize", method in ("ties", "della")),
              "rescale": flags.get("rescale", method.startswith(("dare", "della")))}
    for key in ("gamma", "epsilon"):
        if key in kw:
            params[key] = dict(enumerate(kw[key]))
    group = TensorGroup.from_tensors([base, *models], ids=["base", *range(T)], base_index=0, name="w")
    want = registry.get(method).merge_group(group, **params)
    assert len(proxy.asked) == len(masks)
    for asked, p in zip(proxy.asked, probs):
        torch.testing.assert_close(asked.to(torch.float64).view(p.shape), p, rtol=0, atol=1e-6)
    got = merge({"w": base}, [{"w": m} for m in models], method=method, semantics="mergekit", seed=seed,
                weights=weights, lam=lam, **kw, **flags)["w"]
    assert got.dtype == dtype
    assert_close(got, want, torch.float64, name=f"{method} vs mergekit ({dtype})", **MERGEKIT_TOL[dtype])

