"""transferops.compat.pot's entropic entry points against POT on the same inputs: gradients of
the ``*2`` functions on torch inputs, POT's argument handling (every keyword honoured or
rejected), warnings and return kinds. POT's own tests run in test_compat_pot_suite.py."""
import warnings

import numpy as np
import pytest
import torch

from transferops.compat import pot as ours

POT = pytest.importorskip("ot")
TIGHT = dict(numItermax=20000, stopThr=1e-13)


def _problem(n=40, m=30, seed=0):
    rng = np.random.RandomState(seed)
    x, y = rng.randn(n, 2), rng.randn(m, 2) + 0.5
    a, b = rng.rand(n) + 0.1, rng.rand(m) + 0.1
    return x, y, a / a.sum(), b / b.sum()


def _grads(lib, fn, M, a, b, *args, **kw):
    Mt, at, bt = (torch.tensor(v, requires_grad=True) for v in (M, a, b))
    value = fn(lib)(at, bt, Mt, *args, **kw)
    value.sum().backward()
    return value.detach(), Mt.grad, at.grad, bt.grad


CASES = {
    "sinkhorn2": (lambda lib: lib.sinkhorn2, (0.5,), {}),
    "sinkhorn2 small reg": (lambda lib: lib.sinkhorn2, (0.05,), {}),
    "unbalanced2": (lambda lib: lib.unbalanced.sinkhorn_unbalanced2, (0.5, 1.0), {}),
    "unbalanced2 reg_m pair": (lambda lib: lib.unbalanced.sinkhorn_unbalanced2, (0.5, (1.0, 3.0)), {}),
    "unbalanced2 semi-relaxed": (lambda lib: lib.unbalanced.sinkhorn_unbalanced2, (0.5, (np.inf, 2.0)), {}),
    "unbalanced2 reg_m=inf": (lambda lib: lib.unbalanced.sinkhorn_unbalanced2, (0.5, np.inf), {}),
    "unbalanced2 entropy": (lambda lib: lib.unbalanced.sinkhorn_unbalanced2, (0.5, 1.0), {"reg_type": "entropy"}),
    "unbalanced2 total": (lambda lib: lib.unbalanced.sinkhorn_unbalanced2, (0.5, 1.0), {"returnCost": "total"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_pots(case):
    """POT differentiates through its iterations; compat differentiates the converged fixed point
    implicitly. At convergence the two agree: values, d/dM, d/da and d/db within 1e-6."""
    fn, args, kw = CASES[case]
    x, y, a, b = _problem()
    M = POT.dist(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _grads(POT, fn, M, a, b, *args, **kw, **TIGHT)
        got = _grads(ours, fn, M, a, b, *args, **kw, **TIGHT)
    for name, w, g in zip(("value", "M", "a", "b"), want, got):
        assert float((w - g).abs().max()) <= 1e-6 * max(1.0, float(w.abs().max())), name


@pytest.mark.parametrize("fn,kw", [(ours.sinkhorn2, {}), (ours.unbalanced.sinkhorn_unbalanced2, {"reg_m": 1.0}),
                                   (ours.unbalanced.sinkhorn_unbalanced2, {"reg_m": (1.0, np.inf)})])
def test_gradients_at_zero_weights_are_one_sided_derivatives(fn, kw):
    """A zero weight's gradient is the derivative as the weight grows from 0 (POT's sinkhorn_log
    gives NaN there): checked against finite differences along random directions."""
    x, y, a, b = _problem(12, 10, seed=3)
    a[3], b[1] = 0, 0
    a, b = a / a.sum(), b / b.sum()
    M = POT.dist(x, y)
    at, bt, Mt = (torch.tensor(v, requires_grad=True) for v in (a, b, M))
    fn(at, bt, Mt, 0.5, **kw, **TIGHT).backward()
    rng, h = np.random.RandomState(0), 1e-6
    for _ in range(3):
        da, db, dM = rng.randn(12), rng.randn(10), rng.randn(12, 10)
        da[3], db[1] = abs(da[3]), abs(db[1])  # a zero weight can only grow
        if not kw:  # exact marginals: directions that keep the masses equal
            da[a > 0] -= da.sum() / (a > 0).sum()
            db[b > 0] -= db.sum() / (b > 0).sum()
        fd = (float(fn(a + h * da, b + h * db, M + h * dM, 0.5, **kw, **TIGHT)) - float(fn(a, b, M, 0.5, **kw, **TIGHT))) / h
        analytic = float((at.grad.numpy() * da).sum() + (bt.grad.numpy() * db).sum() + (Mt.grad.numpy() * dM).sum())
        assert abs(fd - analytic) <= 1e-4 * max(1.0, abs(fd))


def test_signatures_are_pots():
    """Every function takes POT's parameters in POT's order with POT's defaults, so positional
    calls mean what they mean in POT."""
    import inspect
    for module in ("", "bregman", "unbalanced", "lp", "da", "utils"):
        mine, theirs = (getattr(lib, module) if module else lib for lib in (ours, POT))
        for name in mine.__all__:
            f, g = getattr(mine, name), getattr(theirs, name, None)
            if g is None or not callable(f) or isinstance(f, type(ours)):
                continue
            ps, pt = (list(inspect.signature(h).parameters.values()) for h in (f, g))
            if name == "check_number_threads":
                ps = ps[:1]
            assert [p.name for p in ps] == [p.name for p in pt], f"{module}.{name}"
            for p, q in zip(ps, pt):
                if not callable(q.default):
                    assert repr(p.default) == repr(q.default), f"{module}.{name}({p.name})"


def test_empirical_gradients_in_the_points_equal_pots():
    x, y, a, b = _problem(25, 20, seed=1)
    out = []
    for lib in (POT, ours):
        xs, xt = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
        value = lib.bregman.empirical_sinkhorn2(xs, xt, 0.5, torch.tensor(a), torch.tensor(b), numIterMax=20000,
                                                stopThr=1e-13)
        value.backward()
        out.append((value.detach(), xs.grad, xt.grad))
    for w, g in zip(*out):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-7)


def test_several_target_histograms_and_kinds():
    x, y, a, b = _problem()
    M = POT.dist(x, y)
    B = np.stack([b, b[::-1], np.full_like(b, 1 / len(b))], 1)
    np.testing.assert_allclose(ours.sinkhorn2(a, B, M, 0.3, **TIGHT),
                               POT.sinkhorn2(a, B, M, 0.3, method="sinkhorn_log", **TIGHT), rtol=1e-9)
    M32 = torch.tensor(M, dtype=torch.float32)
    P = ours.sinkhorn(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), M32, 0.3)
    assert isinstance(P, torch.Tensor) and P.dtype == torch.float32
    assert isinstance(ours.sinkhorn2(a, b, M, 0.3), np.float64)
    assert isinstance(ours.unif(4), np.ndarray) and ours.dist(torch.tensor(x)).shape == (40, 40)
    with pytest.raises(ValueError, match="^M, b: expected torch tensors|^b: expected torch tensors"):
        ours.sinkhorn(torch.tensor(a), b, M, 0.3)


def test_every_keyword_is_honoured_or_rejected():
    x, y, a, b = _problem()
    M = POT.dist(x, y)
    with pytest.raises(TypeError, match="lazy"):
        ours.sinkhorn(a, b, M, 0.3, lazy=True)
    with pytest.raises(TypeError, match="stopthr"):
        ours.sinkhorn2(a, b, M, 0.3, stopthr=1e-3)  # misspelled: POT swallows it
    with pytest.raises(TypeError, match="tau"):
        ours.sinkhorn(a, b, M, 0.3, method="sinkhorn_log", tau=10)
    ours.sinkhorn(a, b, M, 0.3, method="sinkhorn_stabilized", tau=10)
    with pytest.raises(ValueError, match="^tau: "):
        ours.sinkhorn(a, b, M, 0.3, method="sinkhorn_stabilized", tau=-1)
    with pytest.raises(ValueError, match="^method: "):
        ours.sinkhorn2(a, b, M, 0.3, method="greenkhorn")  # POT's sinkhorn2 has no greenkhorn either
    with pytest.raises(ValueError, match="^returnCost: "):
        ours.sinkhorn_unbalanced2(a, b, M, 0.3, 1.0, returnCost="Total")
    with pytest.raises(ValueError, match="^reg_type: "):
        ours.sinkhorn_unbalanced(a, b, M, 0.3, 1.0, reg_type="l2")
    with pytest.raises(ValueError, match="^warmstart"):
        ours.sinkhorn(a, b, M, 0.3, warmstart=(np.zeros(3), np.zeros(30)))
    with pytest.raises(ValueError, match="^c: "):
        ours.sinkhorn_unbalanced(a, b, M, 0.3, 1.0, c=-np.ones_like(M))
    with pytest.raises(ValueError, match="^warmstart"):
        ours.sinkhorn(a, b, M, 0.3, warmstart=(0.0, 0.0))
    with pytest.raises(ValueError, match="^reg: gradients"):
        ours.sinkhorn2(torch.tensor(a), torch.tensor(b), torch.tensor(M), torch.tensor(0.3, requires_grad=True))
    with pytest.raises(ValueError, match="^a, b: exact marginals need equal masses"):
        ours.sinkhorn(a, 2 * b, M, 0.3)
    with pytest.raises(ValueError, match="^w: "):
        ours.dist(x, y, metric="cityblock", w=np.ones(2))
    with pytest.raises(ValueError, match="^weights: "):
        ours.barycenter(np.stack([a, a], 1), POT.dist(x, x), 0.3, weights=np.array([-1.0, 2.0]))
    np.testing.assert_allclose(ours.sinkhorn(a, b, M, np.array(0.3), method="Sinkhorn_Log"),
                               ours.sinkhorn(a, b, M, 0.3), rtol=0, atol=1e-12)  # POT lowercases method
    np.testing.assert_allclose(ours.bregman.sinkhorn_stabilized(a, b, M, 0.3, 1000, 1e3),  # POT's positional order
                               ours.sinkhorn(a, b, M, 0.3), rtol=0, atol=1e-12)


def test_reference_measure_and_reg_m_forms_match_pot():
    x, y, a, b = _problem()
    M = POT.dist(x, y)
    c = np.outer(a, b) * np.exp(np.random.RandomState(2).rand(*M.shape))
    for kw in ({"c": c}, {"reg_m": (0.7, np.inf)}, {"reg_m": np.array([2.0])}, {"reg_type": "entropy"}):
        reg_m = kw.pop("reg_m", 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want, wlog = POT.unbalanced.sinkhorn_unbalanced(a, b * 1.3, M, 0.4, reg_m, log=True, **kw, **TIGHT)
            got, glog = ours.unbalanced.sinkhorn_unbalanced(a, b * 1.3, M, 0.4, reg_m, log=True, **kw, **TIGHT)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
        np.testing.assert_allclose(glog["logu"], wlog["logu"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(glog["total_cost"], wlog["total_cost"], rtol=1e-8, atol=1e-10)


def test_pots_warnings():
    x, y, a, b = _problem()
    M = POT.dist(x, y)
    with pytest.warns(UserWarning, match="stopThr"):
        ours.sinkhorn(a, b, M, 0.3, stopThr=0, numItermax=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.sinkhorn2(a, b, M, 0.3, stopThr=0, numItermax=1, warn=False)
    with pytest.warns(UserWarning, match="reg=0"):
        P = ours.sinkhorn(a, b, M, 0)  # POT: NaN and a warning; here the exact plan
    np.testing.assert_allclose(P, POT.emd(a, b, M), atol=1e-12)
