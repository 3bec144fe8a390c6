"""merging_interp: the torch path against the float64 reference, both against mergekit 0.1.5's
own merge functions, mergekit's edge-case rules, and argument errors."""
from __future__ import annotations

import math

import pytest
import torch

from transferops import merging_interp as mi
from transferops._backend import use_backend

from _kit import DTYPES, assert_close, assert_matches_reference, noncontiguous, peer

F64 = torch.float64

# The torch path against the reference: |out - ref| <= rtol |ref| + atol * scale, scale the
# inputs' largest magnitude (so entries that cancel are held to the inputs' precision). rtol:
# the kit's (one rounding from an fp32 accumulator: <= 1 ulp of the output dtype).
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}
# Against mergekit, which computes float32 inputs in float32 (rounding each step).
MERGEKIT_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-6)}


def _rand(shape, dtype, gen, layout="contiguous", scale=1.0, around=None):
    x = torch.randn(shape, generator=gen, dtype=F64) * scale
    if around is not None:
        x = x + around.to(F64)
    x = x.to(dtype)
    if layout == "sliced":
        return noncontiguous(x)
    if layout == "transposed":
        return x.t().contiguous().t()
    return x


def _scale(*tensors) -> float:
    return max([1e-30] + [float(t.detach().abs().max().double()) for t in tensors if t.numel()])


# Each case: (function, positional inputs, keyword arguments) for one shape, dtype and layout.
def _case(name, shape, dtype, gen, layout="contiguous"):
    base = _rand(shape, dtype, gen, layout)
    near = lambda: _rand(shape, dtype, gen, layout, 0.3, base)  # noqa: E731
    far = lambda: _rand(shape, dtype, gen, layout)  # noqa: E731
    cases = {
        "linear": lambda: (mi.linear, ([far(), far(), far()],), dict(weights=[0.2, 0.5, 0.9])),
        "linear_unnormalized": lambda: (mi.linear, ([far(), far()],), dict(weights=[0.7, -0.4], normalize=False)),
        "slerp": lambda: (mi.slerp, (base, near()), dict(t=0.3)),
        "nuslerp": lambda: (mi.nuslerp, ([far(), far()],), dict(weights=[0.3, 0.9])),
        "nuslerp_rows": lambda: (mi.nuslerp, ([far(), far()],), dict(weights=[0.3, 0.9], nuslerp_flatten=False)),
        "nuslerp_cols_base": lambda: (lambda xs, b, **k: mi.nuslerp(xs, base=b, **k), ([near(), near()], base),
                                      dict(weights=[1.0, 2.0], nuslerp_flatten=False, nuslerp_row_wise=True)),
        "multislerp": lambda: (mi.multislerp, ([far(), far(), far()],), dict(weights=[0.2, 0.5, 0.9])),
        "multislerp_base": lambda: (lambda xs, b, **k: mi.multislerp(xs, base=b, **k), ([near(), near(), near()], base),
                                    dict(weights=[1.0, 2.0, 0.5], normalize_weights=False)),
        "karcher": lambda: (mi.karcher, ([far(), far(), far()],), {}),
        "karcher_weighted": lambda: (mi.karcher, ([far(), far()],), dict(weights=[0.3, 0.9], max_iter=4)),
        "model_stock": lambda: (mi.model_stock, (base, [near(), near(), near()]), {}),
        "model_stock_filters": lambda: (mi.model_stock, (base, [near(), near()]), dict(filter_wise=True)),
        "sce": lambda: (mi.sce, (base, [near(), near(), near()]), {}),
        "sce_topk": lambda: (mi.sce, (base, [near(), near(), near()]), dict(select_topk=0.4)),
        "passthrough": lambda: (mi.passthrough, (far(),), dict(scale=0.7)),
        "nearswap": lambda: (mi.nearswap, (base, near()), dict(t=0.2)),
    }
    return cases[name]()


CASES = ["linear", "linear_unnormalized", "slerp", "nuslerp", "nuslerp_rows", "nuslerp_cols_base", "multislerp",
         "multislerp_base", "karcher", "karcher_weighted", "model_stock", "model_stock_filters", "sce", "sce_topk",
         "passthrough", "nearswap"]
SHAPES = [((7, 13), "contiguous"), ((7, 13), "sliced"), ((7, 13), "transposed"), ((5,), "sliced"), ((), "contiguous")]


def _inputs(args):
    for a in args:
        yield from (a if isinstance(a, list) else [a])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", CASES)
def test_torch_matches_reference(name, shape, layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    fn, args, kwargs = _case(name, shape, dtype, gen, layout)
    if layout != "contiguous" and len(shape) > 1:
        assert not all(t.is_contiguous() for t in _inputs(args))
    out = assert_matches_reference(fn, args, kwargs, backend="torch", dtype=dtype,
                                   atol=ATOL[dtype] * _scale(*_inputs(args)))
    assert out.shape == torch.Size(shape) and out.is_contiguous()


# ---- against mergekit 0.1.5 -----------------------------------------------------------------

def _mergekit(name, base, models, params):
    merge_methods = peer("mergekit.merge_methods")
    tensors = ([] if base is None else [base]) + models
    return merge_methods.merge_tensors(tensors, name, parameters=params, base_index=None if base is None else 0)


MERGEKIT_CASES = [
    ("linear", False, 3, {"weight": [0.2, 0.5, 0.9]}),
    ("linear", False, 2, {"weight": [0.7, -0.4], "normalize": False}),
    ("slerp", True, 1, {"t": 0.3}),
    ("slerp", True, 1, {"t": 1.4}),
    ("nuslerp", False, 2, {"weight": [0.3, 0.9]}),
    ("nuslerp", True, 2, {"weight": [0.3, 0.9], "nuslerp_flatten": False}),
    ("nuslerp", True, 2, {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", False, 2, {"weight": [0.5, -0.5]}),
    ("multislerp", False, 3, {"weight": [0.2, 0.5, 0.9]}),
    ("multislerp", True, 4, {"weight": [1.0, 2.0, 0.5, 1.0], "normalize_weights": False, "eps": 1e-6}),
    ("karcher", False, 3, {}),
    ("karcher", False, 4, {"max_iter": 3, "tol": 1e-3}),
    ("model_stock", True, 3, {}),
    ("model_stock", True, 2, {"filter_wise": True}),
    ("sce", True, 3, {}),
    ("sce", True, 3, {"select_topk": 0.3}),
    ("sce", True, 2, {"select_topk": 0.0, "int8_mask": True}),
    ("passthrough", False, 1, {"scale": [0.7]}),
    ("nearswap", True, 1, {"t": 0.2}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (5,), ()], ids=str)
@pytest.mark.parametrize("name,with_base,count,params", MERGEKIT_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MERGEKIT_CASES)])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_matches_mergekit(name, with_base, count, params, shape, dtype, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    base = _rand(shape, dtype, gen)
    models = [_rand(shape, dtype, gen, "contiguous", 0.3, base if with_base else None) for _ in range(count)]
    expected = _mergekit(name, base if with_base else None, models, params)
    out = mi.apply(name, base if with_base else None, models, params, backend=backend)
    assert out.dtype == dtype
    tol = MERGEKIT_TOL[dtype]
    assert_close(out, expected, dtype, name=f"{name}[{backend}] vs mergekit", rtol=tol["rtol"],
                 atol=tol["atol"] * _scale(base, *models))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_karcher_weights_match_mergekit(dtype, seed):
    karcher = peer("mergekit.merge_methods.karcher")
    gen = torch.Generator().manual_seed(seed)
    xs = [_rand((6, 11), dtype, gen) for _ in range(3)]
    xs[1] = xs[1] * 1e-6  # below tol: out of the mean, still in the scale
    expected = karcher.karcher_merge_tensors(xs, [0.5, 0.2, 0.9], max_iter=10, tol=1e-5)
    for backend in ("reference", "torch"):
        out = mi.karcher(xs, weights=[0.5, 0.2, 0.9], backend=backend)
        assert_close(out, expected, dtype, rtol=MERGEKIT_TOL[dtype]["rtol"],
                     atol=MERGEKIT_TOL[dtype]["atol"] * _scale(*xs))


# ---- edge cases, each against mergekit where it has one ------------------------------------

def _orthogonal(b):
    """A unit vector orthogonal to b, of b's shape."""
    r = b.roll(1, dims=-1).flatten()
    r = r - (r @ b.flatten()) / (b.flatten() @ b.flatten()) * b.flatten()
    return (r / r.norm()).view(b.shape)


EDGES = {
    "slerp colinear": ("slerp", lambda b: (b, [2.5 * b]), {"t": 0.3}),
    "slerp antipodal": ("slerp", lambda b: (b, [-0.5 * b]), {"t": 0.3}),
    "slerp zero base": ("slerp", lambda b: (torch.zeros_like(b), [b]), {"t": 0.3}),
    "slerp zero both": ("slerp", lambda b: (torch.zeros_like(b), [torch.zeros_like(b)]), {"t": 0.3}),
    "slerp tiny base": ("slerp", lambda b: (b.roll(1) * 1e-10, [b]), {"t": 0.3}),
    "slerp near threshold": ("slerp", lambda b: (b, [b + 0.025 * b.norm() * _orthogonal(b)]), {"t": 0.3}),
    "slerp below threshold": ("slerp", lambda b: (b, [b + 0.04 * b.norm() * _orthogonal(b)]), {"t": 0.3}),
    "nuslerp colinear": ("nuslerp", lambda b: (None, [b, 3 * b]), {"weight": [1.0, 1.0]}),
    "nuslerp nearly colinear": ("nuslerp", lambda b: (None, [b, 3 * b + 3e-4 * b.roll(1)]), {"weight": [1.0, 2.0]}),
    "nuslerp tiny model": ("nuslerp", lambda b: (None, [b * 1e-9, b.roll(1)]), {"weight": [1.0, 2.0]}),
    "nuslerp zero row": ("nuslerp", lambda b: (None, [b, torch.cat([torch.zeros_like(b[:1]), b[1:]])]),
                         {"weight": [1.0, 3.0], "nuslerp_flatten": False}),
    "multislerp one model": ("multislerp", lambda b: (b, [2 * b + 1]), {"weight": [0.3]}),
    "multislerp antipodal pair": ("multislerp", lambda b: (None, [b, -b]), {"weight": [1.0, 1.0]}),
    "multislerp eps above the mean": ("multislerp", lambda b: (None, [b, b.roll(1)]), {"weight": [0.2, 0.8], "eps": 10.0}),
    "multislerp zero pair": ("multislerp", lambda b: (None, [b * 0, b * 0]), {"weight": [1.0, 2.0]}),
    "karcher one model": ("karcher", lambda b: (None, [b]), {}),
    "karcher zero models": ("karcher", lambda b: (None, [b * 0, b * 0, b * 0]), {}),
    "karcher antipodal pair": ("karcher", lambda b: (None, [b, -b]), {}),
    "karcher a zero model": ("karcher", lambda b: (None, [b * 0, b, b.flip(0)]), {}),
    "model_stock opposite": ("model_stock", lambda b: (b, [b + 1, b - 1]), {}),
    "model_stock equal": ("model_stock", lambda b: (b, [b, b]), {}),
    "sce no variance": ("sce", lambda b: (b, [b + 1, b + 1]), {"select_topk": 0.5}),
    "sce one model": ("sce", lambda b: (b, [b + 1]), {"select_topk": 0.5}),
    "sce tiny task vectors": ("sce", lambda b: (b, [b + 1e-4 * b.roll(1), b + 3e-4 * b.roll(2)]), {}),
    # where the large task vector is 0 the tiny one agrees alone: its weight ~1e-8 is floored at 1e-6
    "sce tiny weight": ("sce", lambda b: (b, [b + b.roll(1) * (b.roll(2) > 0), b + 1e-4 * b.roll(3)]), {}),
    "sce cancelling votes": ("sce", lambda b: (b, [b + 1, b - 1]), {}),
    "nearswap equal": ("nearswap", lambda b: (b, [b.clone()]), {"t": 0.5}),
    "nearswap negative t": ("nearswap", lambda b: (b, [b + 0.1]), {"t": -1.0}),
    "nearswap tiny differences": ("nearswap", lambda b: (b, [b + 1e-6 * b.roll(1)]), {"t": 2e-7}),
    "nearswap large t": ("nearswap", lambda b: (b, [b + 0.1]), {"t": 10.0}),
    "linear one model": ("linear", lambda b: (None, [b]), {"weight": [3.0]}),
}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_edge_cases_match_mergekit(edge, backend, seed):
    name, make, params = EDGES[edge]
    gen = torch.Generator().manual_seed(seed)
    base, models = make(_rand((6, 9), F64, gen))
    expected = _mergekit(name, base, models, params)
    out = mi.apply(name, base, models, params, backend=backend)
    assert torch.isfinite(out).all()
    assert_close(out, expected, F64, name=edge, atol=1e-12 * _scale(*models))


def test_slerp_endpoints_and_rules(seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = _rand((5, 8), F64, gen), _rand((5, 8), F64, gen)
    assert torch.equal(mi.slerp(a, b, t=0.0), a) and torch.equal(mi.slerp(a, b, t=1.0), b)
    # colinear: the chord, not the arc
    assert_close(mi.slerp(a, 3 * a, t=0.25), 0.75 * a + 0.75 * a, F64)
    # a zero tensor is at 90 degrees to anything: sin(t pi / 2) b
    assert_close(mi.slerp(torch.zeros_like(a), b, t=0.3), math.sin(0.15 * math.pi) * b, F64)
    # the whole tensor is one vector: rows are not interpolated apart
    rowwise = torch.stack([mi.slerp(a[i], b[i], t=0.3) for i in range(5)])
    assert not torch.allclose(mi.slerp(a, b, t=0.3), rowwise)


def test_nuslerp_row_modes_differ(seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [_rand((4, 6), F64, gen) for _ in range(2)]
    flat, rows = mi.nuslerp(xs, weights=[1, 1]), mi.nuslerp(xs, weights=[1, 1], nuslerp_flatten=False)
    cols = mi.nuslerp(xs, weights=[1, 1], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert_close(rows[2], mi.nuslerp([xs[0][2], xs[1][2]], weights=[1, 1]), F64)
    assert_close(cols[:, 3], mi.nuslerp([xs[0][:, 3], xs[1][:, 3]], weights=[1, 1]), F64)
    assert not torch.allclose(flat, rows) and not torch.allclose(rows, cols)
    # row_wise is ignored when flattening
    assert torch.equal(flat, mi.nuslerp(xs, weights=[1, 1], nuslerp_row_wise=True))


def test_weights_summing_to_zero(seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [_rand((3, 4), F64, gen) for _ in range(3)]
    with pytest.raises(ValueError, match="weights: they sum to 0"):
        mi.linear(xs, weights=[1.0, -0.5, -0.5])
    with pytest.raises(ValueError, match="weights: they sum to 0"):
        mi.multislerp(xs, weights=[1.0, -0.5, -0.5])
    assert_close(mi.linear(xs, weights=[1.0, -0.5, -0.5], normalize=False), xs[0] - 0.5 * xs[1] - 0.5 * xs[2], F64)
    # nuslerp: t = 0.5 when the two weights cancel
    assert torch.equal(mi.nuslerp(xs[:2], weights=[2.0, -2.0]), mi.nuslerp(xs[:2], weights=[1.0, 1.0]))
    with pytest.raises(ValueError, match="karcher divides"):
        mi.karcher(xs[:2], weights=[1.0, -1.0])


def test_mergekit_divides_by_zero_weights(seed):
    """What the ValueError above replaces: mergekit's Inf/NaN."""
    gen = torch.Generator().manual_seed(seed)
    xs = [_rand((3, 4), F64, gen) for _ in range(3)]
    for name in ("linear", "multislerp"):
        assert not torch.isfinite(_mergekit(name, None, xs, {"weight": [1.0, -0.5, -0.5]})).all()


def test_multislerp_antipodal_three_raise(seed):
    gen = torch.Generator().manual_seed(seed)
    a = _rand((4, 5), F64, gen)
    with pytest.raises(ValueError, match="weighted mean of the models' directions is zero"):
        mi.multislerp([a, -a, torch.zeros_like(a)], weights=[1, 1, 1])
    merge_methods = peer("mergekit.merge_methods")
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        merge_methods.merge_tensors([a, -a, torch.zeros_like(a)], "multislerp", parameters={"weight": [1, 1, 1]})


def test_passthrough_copies(seed):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    out = mi.passthrough(x)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(mi.passthrough(x, scale=2.0), x * 2)


def test_sce_without_models_is_base():
    b = torch.randn(3, 4)
    assert torch.equal(mi.sce(b, []), b)
    assert torch.equal(mi.apply("sce", b, [], {}), b)


def test_empty_tensors():
    e = torch.empty(0, 3)
    assert mi.slerp(e, e, t=0.5).shape == (0, 3)
    assert mi.linear([e, e], weights=[1, 1]).shape == (0, 3)
    assert mi.sce(e, [e, e], select_topk=0.5).shape == (0, 3)


def test_auto_honours_use_backend_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    a, b = _rand((40, 50), torch.float32, gen), _rand((40, 50), torch.float32, gen)
    ref, fast = mi.slerp(a, b, t=0.3, backend="reference"), mi.slerp(a, b, t=0.3, backend="torch")
    assert not torch.equal(ref, fast)  # float32 against float64 arithmetic: some entries round apart
    with use_backend("reference"):
        assert torch.equal(mi.slerp(a, b, t=0.3), ref)
    assert torch.equal(mi.slerp(a, b, t=0.3), fast)


# ---- the registry -------------------------------------------------------------------------------

def test_registry_contract():
    assert set(mi.TENSORWISE) == {"linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce",
                                  "passthrough", "nearswap"}
    needs = {k: m.needs_base for k, m in mi.TENSORWISE.items()}
    assert needs == {"linear": False, "slerp": True, "nuslerp": "optional", "multislerp": "optional",
                     "karcher": False, "model_stock": True, "sce": True, "passthrough": False, "nearswap": True}
    assert mi.check("nuslerp", {"weight": [1, 2]}) == {"weight": [1.0, 2.0], "nuslerp_row_wise": False,
                                                       "nuslerp_flatten": True}
    assert mi.check("passthrough", {}, 1) == {"scale": [None]}
    assert mi.check("linear", {"weight": 0.5}, 3)["weight"] == [0.5, 0.5, 0.5]
    for name, m in mi.TENSORWISE.items():
        assert set(m.defaults) <= set(m.per_model + m.shared), name
        assert set(m.kinds) <= set(m.per_model + m.shared), name


def test_registry_keys_are_mergekits():
    """Every key the registry takes is a parameter of mergekit's method, with its default."""
    merge_methods = peer("mergekit.merge_methods")
    for name, m in mi.TENSORWISE.items():
        spec = merge_methods.get(name).spec
        theirs = {p.name: p for p in spec.parameters}
        assert set(m.per_model + m.shared) == set(theirs), name
        for key in m.per_model:
            assert theirs[key].scope != "shared", (name, key)
        for key in m.shared:
            assert theirs[key].scope == "shared", (name, key)
        for key, p in theirs.items():
            assert (key in m.defaults) == (not p.required), (name, key)
            if not p.required:
                assert m.defaults[key] == p.default, (name, key)


@pytest.mark.parametrize("method,base,models,params,match", [
    ("linear", None, 2, {"weight": [1, 1], "density": 0.5}, "unknown key 'density'"),
    ("linear", None, 2, {}, "needs 'weight'"),
    ("linear", None, 2, {"weight": [1, 1, 1]}, "'weight' takes one value per model"),
    ("linear", True, 2, {"weight": [1, 1]}, "base: method 'linear' takes no base"),
    ("slerp", None, 1, {"t": 0.5}, "base: method 'slerp' needs a base"),
    ("slerp", True, 2, {"t": 0.5}, "takes exactly 1 model"),
    ("nuslerp", None, 3, {"weight": [1, 1, 1]}, "takes exactly 2 model"),
    ("model_stock", True, 1, {}, "at least 2 model"),
    ("passthrough", None, 2, {}, "exactly 1 model"),
    ("nearswap", True, 1, {"similarity_threshold": 0.1}, "unknown key 'similarity_threshold'"),
    ("ties", True, 1, {}, "method: expected one of"),
])
def test_apply_errors(method, base, models, params, match):
    b = torch.randn(3, 4)
    with pytest.raises(ValueError, match=match):
        mi.apply(method, b if base else None, [b + i for i in range(models)], params)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: mi.slerp(x, x[:2], t=0.5), ValueError, r"b: shape"),
    (lambda x: mi.slerp(x, x.double(), t=0.5), ValueError, r"b: dtype"),
    (lambda x: mi.slerp(x, x, t=float("nan")), ValueError, "t: expected a finite number"),
    (lambda x: mi.slerp(x, x.long(), t=0.5), TypeError, "b: expected dtype"),
    (lambda x: mi.slerp(x, x, t=0.5, backend="native"), ValueError, "backend: expected one of"),
    (lambda x: mi.linear([x, x], weights=None), ValueError, "weights: linear needs one weight per model"),
    (lambda x: mi.linear([x, x], weights=[1]), ValueError, "weights: expected 2 values"),
    (lambda x: mi.linear([x, x], weights=[1, 1], normalize=1), TypeError, "normalize: expected True or False"),
    (lambda x: mi.nuslerp([x, x, x], weights=[1, 1, 1]), ValueError, "nuslerp interpolates exactly 2"),
    (lambda x: mi.nuslerp([x, x], weights=[1, 1], base=x[0]), ValueError, "base: shape"),
    (lambda x: mi.multislerp([x, x], weights=[1, 1], eps=0), ValueError, "eps: expected a positive"),
    (lambda x: mi.karcher([x, x], max_iter=-1), ValueError, r"max_iter: expected an int in \[0"),
    (lambda x: mi.karcher([x, x], tol=0.0), ValueError, "tol: expected a positive"),
    (lambda x: mi.model_stock(x, [x]), ValueError, "at least 2 models"),
    (lambda x: mi.model_stock(x, [x, x], filter_wise="yes"), TypeError, "filter_wise: expected True or False"),
    (lambda x: mi.sce(x, [x, x], select_topk=1.5), ValueError, r"select_topk: expected a number in \[0, 1\]"),
    (lambda x: mi.passthrough(x, scale=float("inf")), ValueError, "scale: expected a finite number"),
    (lambda x: mi.passthrough([x]), TypeError, "tensor: expected a torch.Tensor"),
    (lambda x: mi.nearswap(x, x, t="0.1"), TypeError, "t: expected a finite number"),
])
def test_argument_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(3, 4))


NONFINITE_CALLS = {
    "linear": lambda x, y: mi.linear([x, y], weights=[1, 1]),
    "slerp": lambda x, y: mi.slerp(x, y, t=0.5),
    "nuslerp": lambda x, y: mi.nuslerp([x, y], weights=[1, 1]),
    "multislerp": lambda x, y: mi.multislerp([x, y], weights=[1, 1]),
    "karcher": lambda x, y: mi.karcher([x, y]),
    "model_stock": lambda x, y: mi.model_stock(x, [y, y + 1]),
    "sce": lambda x, y: mi.sce(x, [y, y + 1], select_topk=0.5),
    "passthrough": lambda x, y: mi.passthrough(y, scale=2.0),
    "nearswap": lambda x, y: mi.nearswap(x, y, t=0.1),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(NONFINITE_CALLS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_nonfinite_inputs_raise(name, bad, backend):
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    y[1, 2] = bad
    with use_backend(backend if backend == "reference" else "auto"):
        with pytest.raises(ValueError, match="expected finite values, found NaN or Inf at 1 element"):
            NONFINITE_CALLS[name](x, y)
