import warnings

import numpy as np
import pytest
import torch

from _kit import golden_file, outputs_per_isa, peer
from transferops.ot import cost_matrix, sinkhorn, sinkhorn_cost_matrix, sinkhorn_divergence

POINT_CLOUDS = ["ot_pc_n200_m300_d64_rand", "ot_pc_n64_m48_d64_unif"]
BACKENDS = ["reference", "native"]


def _golden(name: str) -> dict:
    data = np.load(golden_file(f"{name}.npz"))
    return {k: (torch.from_numpy(v) if v.dtype.kind == "f" and v.ndim else v) for k, v in data.items()}


def _rel(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.slow), "native"])
@pytest.mark.parametrize("name", POINT_CLOUDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_point_clouds_match_pot(name, dtype, tol, backend):
    """POT's sinkhorn_log (float64, converged to 1e-11): transport cost, ot_eps, the potentials
    (up to the constant they are defined up to) and the divergence."""
    d = _golden(name)
    x, y, a, b = (d[k].to(dtype) for k in "xyab")
    eps = float(d["eps"])
    r = sinkhorn(x, y, a, b, eps=eps, tol=1e-12 if dtype == torch.float64 else 1e-7, backend=backend)
    assert bool(r.converged) and float(r.marginal_error) <= 1e-7
    assert _rel(r.transport_cost, d["transport_cost"]) < tol
    assert _rel(r.ot_eps, d["ot_eps_kl"]) < tol
    shift = float((r.f - d["f"]).mean())
    torch.testing.assert_close(r.f - shift, d["f"], rtol=0, atol=tol * 10)
    torch.testing.assert_close(r.g + shift, d["g"], rtol=0, atol=tol * 10)
    div = sinkhorn_divergence(x, y, a, b, eps=eps, tol=1e-12 if dtype == torch.float64 else 1e-7, backend=backend)
    assert _rel(div, d["sinkhorn_divergence"]) < tol


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.slow), "native"])
def test_cost_matrix_and_unbalanced_match_pot(backend):
    d = _golden("ot_costmatrix_128x96_uniformcost_eps002")
    r = sinkhorn_cost_matrix(d["C"], d["a"], d["b"], eps=float(d["eps"]), tol=1e-12, backend=backend)
    assert _rel(r.transport_cost, d["transport_cost"]) < 1e-8
    # POT's scalings: P = diag(u) K diag(v), so log u_i = log a_i + f_i / eps up to a constant
    log_u = d["a"].log() + r.f / float(d["eps"])
    torch.testing.assert_close(log_u - log_u.mean(), d["log_u"] - d["log_u"].mean(), rtol=0, atol=1e-7)
    d = _golden("ot_unbalanced_n200_m250_rho1")
    r = sinkhorn(d["x"], d["y"], d["a"], d["b"], eps=float(d["eps"]), reach=float(d["reg_m"]), tol=1e-13,
                 backend=backend)
    assert _rel(r.transport_cost, d["sinkhorn_unbalanced2"]) < 1e-8
    P = r.plan()
    assert float((P - d["plan"]).abs().max()) <= 1e-8 * float(d["plan"].abs().max())
    torch.testing.assert_close(r.apply(torch.eye(P.shape[1], dtype=torch.float64)), P, rtol=0, atol=1e-15)


def test_transport_cost_approaches_emd_as_eps_shrinks():
    d = _golden("ot_pc_n64_m48_d64_unif")
    gaps = []
    for eps in (0.05, 0.02, 0.008):
        r = sinkhorn(d["x"], d["y"], eps=eps, tol=1e-6, eps_scaling=0.8)
        assert bool(r.converged), eps
        gaps.append(float(r.transport_cost) - float(d["emd2"]))
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-9 and gaps[2] < 0.25 * gaps[0], gaps


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_with_padding_equal_separate_problems(backend):
    """A ragged batch padded with zero-weight points: each problem equals its own solve, and
    each stops on its own (different iteration counts)."""
    g = torch.Generator().manual_seed(0)
    sizes = [(7, 5), (3, 9), (9, 9)]
    x = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 9, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
    a, b = torch.zeros(3, 9, dtype=torch.float64), torch.zeros(3, 9, dtype=torch.float64)
    for i, (n, m) in enumerate(sizes):
        a[i, :n], b[i, :m] = 1.0 / n, 1.0 / m
    batch = sinkhorn(x, y, a, b, eps=0.5, tol=1e-10, backend=backend)
    for i, (n, m) in enumerate(sizes):
        one = sinkhorn(x[i, :n], y[i, :m], eps=0.5, tol=1e-10, backend=backend)
        assert _rel(batch.ot_eps[i], one.ot_eps) < 1e-9 and _rel(batch.transport_cost[i], one.transport_cost) < 1e-9
        assert int(batch.n_iter[i]) == int(one.n_iter)
    assert bool(batch.converged.all()) and len(set(batch.n_iter.tolist())) > 1


def test_eps_scaling_and_half_cost_keep_the_answer():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    plain = sinkhorn(x, y, eps=0.05, tol=1e-10)
    scaled = sinkhorn(x, y, eps=0.05, tol=1e-10, eps_scaling=0.5)
    assert bool(plain.converged) and bool(scaled.converged)
    assert _rel(scaled.ot_eps, plain.ot_eps) < 1e-8 and int(scaled.n_iter) < int(plain.n_iter)
    half = sinkhorn(x, y, eps=0.025, cost="sqeuclidean_half", tol=1e-10)  # C/2 with eps/2: the same plan
    assert _rel(half.transport_cost * 2, plain.transport_cost) < 1e-8
    C = cost_matrix(x, y)
    assert _rel(sinkhorn_cost_matrix(C, eps=0.05, tol=1e-10).ot_eps, plain.ot_eps) < 1e-12


def test_gradients_by_the_envelope_theorem():
    """d ot_eps / d(x, y, a, b) against central finite differences of converged solves, along
    directions that keep the masses equal when balanced."""
    g = torch.Generator().manual_seed(2)
    inputs = {"x": torch.randn(6, 2, generator=g, dtype=torch.float64),
              "y": torch.randn(5, 2, generator=g, dtype=torch.float64),
              "a": torch.rand(6, generator=g, dtype=torch.float64) + 0.5,
              "b": torch.rand(5, generator=g, dtype=torch.float64) + 0.5}
    inputs["b"] *= inputs["a"].sum() / inputs["b"].sum()

    def value(reach, **kw):
        return sinkhorn(kw["x"], kw["y"], kw["a"], kw["b"], eps=0.2, tol=1e-13, reach=reach).ot_eps

    for reach in (None, 0.7):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        grads = dict(zip(leaves, torch.autograd.grad(value(reach, **leaves), list(leaves.values()))))
        for name, t in inputs.items():
            direction = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if reach is None and name in "ab":
                direction -= direction.mean()
            h = 1e-6
            up = value(reach, **{**inputs, name: t + h * direction})
            down = value(reach, **{**inputs, name: t - h * direction})
            assert abs(float(up - down) / (2 * h) - float((grads[name] * direction).sum())) < 1e-6, (reach, name)


def test_nonconvergence_is_reported_and_warned():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g)
    with pytest.warns(RuntimeWarning, match="1 of 1 problems did not reach tol=1e-06 in 5 iterations"):
        r = sinkhorn(x, y, eps=0.01, tol=1e-6, max_iter=5)
    assert not bool(r.converged) and int(r.n_iter) == 5 and float(r.marginal_error) > 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bool(sinkhorn(x, y, eps=0.5).converged)


@pytest.mark.parametrize("call,error,match", [
    (lambda: sinkhorn(torch.tensor([[float("nan")]]), torch.ones(1, 1), eps=1), ValueError, "x: expected finite"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 4), eps=1), ValueError, "x, y: expected .* the same d"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), eps=0), ValueError, "eps: expected a finite number > 0"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), eps=float("inf")), ValueError, "eps: expected a finite"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([1.0, -1.0]), eps=1), ValueError,
     "a: expected non-negative weights"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2), eps=1), ValueError, "a: expected a positive"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3), eps=1), ValueError, "a: expected 2 weights"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2), eps=1), ValueError,
     "balanced OT needs equal masses"),
    (lambda: sinkhorn(torch.ones(0, 3), torch.ones(2, 3), eps=1), ValueError, "x: expected at least one point"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), eps=1, cost="l1"), ValueError, "cost: expected one of"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), eps=1, max_iter=0), ValueError, "max_iter: expected an int"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), eps=1, eps_scaling=2.0), ValueError, "eps_scaling"),
    (lambda: sinkhorn(torch.ones(2, 3), torch.ones(2, 3), eps=1, reach=-1.0), ValueError, "reach: expected"),
    (lambda: sinkhorn(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), eps=1), TypeError, "x: expected a float"),
    (lambda: sinkhorn_cost_matrix(torch.ones(2, 3).fill_(float("inf")), eps=1), ValueError, "C: expected finite"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("N,M,reach,symmetric,scaling", [
    (37, 23, None, False, None), (64, 64, None, True, None), (29, 41, 0.3, False, None), (50, 31, None, False, 0.6),
    pytest.param(300, 200, None, False, None, marks=pytest.mark.slow),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_matches_reference(N, M, reach, symmetric, scaling, dtype):
    """Fresh clustered clouds with a small eps (exp(-C/eps) spans 1e-40 and less, so the kernel
    needs absorption and the log-domain fallback): the native
    kernel-domain solver (Anderson-accelerated) against the log-domain reference; non-contiguous inputs;
    float32 keeps its kernel in float32."""
    g = torch.Generator().manual_seed(N * M)
    centers = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    x = (centers[torch.randint(0, 4, (N,), generator=g)] + torch.randn(N, 3, generator=g, dtype=torch.float64))
    y = x if symmetric else (centers[torch.randint(0, 4, (M,), generator=g)]
                             + torch.randn(M, 3, generator=g, dtype=torch.float64))
    a = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    b = a if symmetric else torch.rand(M, generator=g, dtype=torch.float64) + 0.1
    if reach is None and not symmetric:
        b = b * a.sum() / b.sum()
    wide = torch.zeros(N, 6, dtype=dtype)
    wide[:, ::2] = x.to(dtype)
    xs = wide[:, ::2]
    ys = xs if symmetric else y.to(dtype)
    eps = 0.05 * float(cost_matrix(x, y).mean())  # as the benchmarks: eps = 0.05 on costs of mean 1
    kw = dict(eps=eps, tol=1e-11 if dtype == torch.float64 else 1e-5, reach=reach, eps_scaling=scaling)
    want = sinkhorn(xs, ys, a, b if not symmetric else a, backend="reference", **kw)
    got = sinkhorn(xs, ys, a, b if not symmetric else a, backend="native", **kw)
    rtol = 1e-9 if dtype == torch.float64 else 1e-4
    assert bool(got.converged) and bool(want.converged)
    assert _rel(got.ot_eps, want.ot_eps) < rtol and _rel(got.transport_cost, want.transport_cost) < rtol
    assert int(got.n_iter) <= int(want.n_iter)  # accelerated: the same fixed point in fewer iterations


@pytest.mark.parametrize("scaling", [0.25, 0.5])
def test_symmetric_eps_scaling_in_float32(scaling):
    """x is y with eps-scaling, kernel in float32: the warm start averages f with its update, as
    the main loop does. Before, the native warm start took plain updates, which settle into a
    2-cycle, and from it the solve reported convergence at 0.0357 (scaling 0.25) and 0.0470
    (0.5) for 0.01334."""
    x = torch.rand(300, 3, generator=torch.Generator().manual_seed(0))
    want = sinkhorn(x.double(), x.double(), eps=0.0025, cost="sqeuclidean_half", tol=1e-9)
    got = sinkhorn(x, x, eps=0.0025, cost="sqeuclidean_half", eps_scaling=scaling, tol=1e-6, backend="native")
    assert bool(got.converged) and _rel(got.ot_eps, want.ot_eps) < 1e-5


def test_anderson_acceleration_cuts_iterations(monkeypatch):
    """Clustered clouds, whose slow modes (mass moving between clusters) plain Sinkhorn takes
    thousands of iterations to settle: Anderson steps on the column potentials reach the same
    fixed point in a fraction of them. Plain (ANDERSON_MEMORY = 0): 6880 iterations on this batch;
    memory 8: 770 (tuned over-relaxation, which this replaced: 2230). Every problem meets tol and
    the values agree to the accuracy tol gives."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(8, 16, generator=g, dtype=torch.float64)
    x, y = (centers[torch.randint(0, 8, (16, 128), generator=g)] + 0.5 * torch.randn(16, 128, 16, generator=g,
                                                                                      dtype=torch.float64)
            for _ in range(2))
    scale = float(cost_matrix(x, y).mean()) ** 0.5
    x, y = x / scale, y / scale
    fast = sinkhorn(x, y, eps=0.05, tol=1e-4, backend="native")
    monkeypatch.setattr("transferops.ot.ANDERSON_MEMORY", 0)
    plain = sinkhorn(x, y, eps=0.05, tol=1e-4, backend="native")
    assert bool(fast.converged.all()) and bool(plain.converged.all())
    assert int(fast.n_iter.sum()) <= 0.2 * int(plain.n_iter.sum())
    torch.testing.assert_close(fast.ot_eps, plain.ot_eps, rtol=1e-3, atol=0)


def test_pot_compat_is_a_drop_in():
    """transferops.compat.pot against POT itself: same signatures, numpy in and out, same values
    at a tight stopThr (POT's sinkhorn_log, which converges where the kernel form would not)."""
    ot = peer("ot")
    from transferops.compat import pot

    g = np.random.default_rng(0)
    x, y = g.normal(size=(40, 5)), g.normal(size=(30, 5)) + 0.5
    a, b = g.random(40) + 0.1, g.random(30) + 0.1
    a, b = a / a.sum(), b / b.sum()
    M = ot.dist(x, y)
    M /= M.mean()
    want = ot.sinkhorn2(a, b, M, 0.05, method="sinkhorn_log", stopThr=1e-13, numItermax=100000)
    got = pot.sinkhorn2(a, b, M, 0.05, stopThr=1e-13, numItermax=100000)
    assert isinstance(got, np.float64) and abs(float(got) - float(want)) < 1e-8 * float(want)
    P = pot.sinkhorn(a, b, M, 0.05, stopThr=1e-13, numItermax=100000)
    np.testing.assert_allclose(P, ot.sinkhorn(a, b, M, 0.05, method="sinkhorn_log", stopThr=1e-13,
                                              numItermax=100000), rtol=0, atol=1e-10)
    uniform = pot.sinkhorn2([], [], torch.from_numpy(M), 0.05, stopThr=1e-12, numItermax=100000)
    assert isinstance(uniform, torch.Tensor)
    assert abs(float(uniform) - float(ot.sinkhorn2([], [], M, 0.05, method="sinkhorn_log", stopThr=1e-13,
                                                   numItermax=100000))) < 1e-7
    un = pot.sinkhorn_unbalanced2(a, b * 1.5, M, 0.05, 1.0, stopThr=1e-13, numItermax=100000)
    ref = ot.sinkhorn_unbalanced2(a, b * 1.5, M, 0.05, 1.0, method="sinkhorn_stabilized", stopThr=1e-13,
                                  numItermax=100000)
    assert abs(float(un) - float(ref)) < 1e-7 * abs(float(ref))
    eps = 0.05 * float(ot.dist(x, y).mean())
    emp = pot.empirical_sinkhorn2(x, y, eps, a, b, stopThr=1e-12, numIterMax=100000)
    want = ot.sinkhorn2(a, b, ot.dist(x, y), eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100000)
    assert abs(float(emp) - float(want)) < 1e-7 * float(want)
    _, log = pot.sinkhorn2(a, b, M, 0.05, stopThr=1e-13, numItermax=100000, log=True)
    _, want_log = ot.sinkhorn(a, b, M, 0.05, method="sinkhorn_log", stopThr=1e-13, numItermax=100000, log=True)
    shift = (log["log_u"] - want_log["log_u"]).mean()
    np.testing.assert_allclose(log["log_u"] - shift, want_log["log_u"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(log["log_v"] + shift, want_log["log_v"], rtol=0, atol=1e-7)
    several = np.stack([b, b[::-1]], 1)  # k target histograms: k costs
    np.testing.assert_allclose(pot.sinkhorn2(a, several, M, 0.05, stopThr=1e-13, numItermax=100000),
                               ot.sinkhorn2(a, several, M, 0.05, method="sinkhorn_log", stopThr=1e-13,
                                            numItermax=100000), rtol=1e-8)


@pytest.fixture
def online(monkeypatch):
    """Every point-cloud problem solved online (costs recomputed in tiles, never stored)."""
    import transferops.ot

    monkeypatch.setattr(transferops.ot, "MATERIALIZE_BYTES", 0)


@pytest.mark.parametrize("name", POINT_CLOUDS)
def test_online_matches_pot_and_the_stored_costs(online, name):
    d = _golden(name)
    x, y, a, b = (d[k] for k in "xyab")
    eps = float(d["eps"])
    r = sinkhorn(x, y, a, b, eps=eps, tol=1e-12, progress=False)
    assert _rel(r.transport_cost, d["transport_cost"]) < 1e-8 and _rel(r.ot_eps, d["ot_eps_kl"]) < 1e-8
    assert _rel(sinkhorn_divergence(x, y, a, b, eps=eps, tol=1e-12), d["sinkhorn_divergence"]) < 1e-8
    P = r.plan()  # rows recomputed from the points
    torch.testing.assert_close(P.sum(1), a, rtol=1e-9, atol=0)
    r32 = sinkhorn(x.float(), y.float(), a, b, eps=eps, tol=1e-6, progress=False)
    assert _rel(r32.transport_cost, d["transport_cost"]) < 1e-4


@pytest.mark.parametrize("reach", [None, 0.7])
def test_online_gradients_match_stored(online, reach):
    """Gradients of ot_eps in x, y, a and b of a problem solved online (the plan recomputed in
    blocks of rows in backward; BLOCK_ENTRIES shrunk so that several blocks run) against those
    through the stored cost matrix; a ragged batch (a zero weight) and the half cost."""
    import transferops.ot

    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(2, 37, 4, generator=g, dtype=torch.float64)
    y0 = torch.randn(2, 53, 4, generator=g, dtype=torch.float64) + 0.3
    a0 = torch.rand(2, 37, generator=g, dtype=torch.float64) + 0.1
    a0[1, 30:] = 0
    b0 = torch.rand(2, 53, generator=g, dtype=torch.float64) + 0.1
    if reach is None:
        b0 = b0 * a0.sum(-1, keepdim=True) / b0.sum(-1, keepdim=True)
    weights = torch.rand(2, generator=g, dtype=torch.float64)

    def grads():
        x, y, a, b = (t.clone().requires_grad_() for t in (x0, y0, a0, b0))
        r = sinkhorn(x, y, a, b, eps=0.2, tol=1e-12, reach=reach, cost="sqeuclidean_half", progress=False)
        return torch.autograd.grad((r.ot_eps * weights).sum(), (x, y, a, b))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transferops.ot, "BLOCK_ENTRIES", 2 * 53 * 8)
        got = grads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transferops.ot, "MATERIALIZE_BYTES", 1 << 40)
        want = grads()
    for name, gg, ww in zip("xyab", got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-8, atol=1e-10, msg=name)


def test_online_batches_unbalanced_scaling_and_progress(online, capsys):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 70, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1100, 3, generator=g, dtype=torch.float64)  # more columns than one tile
    a = torch.ones(2, 70, dtype=torch.float64) / 70
    a[1, 60:] = 0  # padding
    a[1] /= a[1].sum()
    b = torch.rand(2, 1100, generator=g, dtype=torch.float64) * 1.5 / 1100
    import transferops.ot

    for reach, scaling in [(None, None), (0.5, None), (None, 0.5)]:
        bb = b / b.sum(-1, keepdim=True) if reach is None else b
        got = sinkhorn(x, y, a, bb, eps=0.3, tol=1e-10, reach=reach, eps_scaling=scaling, progress=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transferops.ot, "MATERIALIZE_BYTES", 1 << 40)
            want = sinkhorn(x, y, a, bb, eps=0.3, tol=1e-10, reach=reach, eps_scaling=scaling)
        torch.testing.assert_close(got.ot_eps, want.ot_eps, rtol=1e-9, atol=0)
        torch.testing.assert_close(got.transport_cost, want.transport_cost, rtol=1e-9, atol=0)
        # Online, the error is checked at every iteration; from a stored kernel, every CHECK_EVERY.
        assert all(w - transferops.ot.CHECK_EVERY < n <= w for n, w in zip(got.n_iter.tolist(), want.n_iter.tolist()))
    mp = pytest.MonkeyPatch()
    mp.setattr(transferops.ot, "PROGRESS_EVERY_S", 0.0)
    sinkhorn(x, y, a, b / b.sum(-1, keepdim=True), eps=0.3, progress=True)
    mp.undo()
    assert "sinkhorn 70x1100: problem 2/2, iteration 10, marginal error" in capsys.readouterr().err
    with pytest.raises(transferops.BackendUnavailable, match="the reference stores the 1 x 70 x 1100 costs"):
        sinkhorn(x[0].detach(), y[0], eps=0.3, backend="reference")


@pytest.mark.parametrize("inner", ["gaussian", "exact"])
def test_dataset_distance_matches_an_explicit_construction(inner):
    """OTDD against its definition built by hand: Bures distances through scipy's sqrtm (or POT's
    Sinkhorn between the class samples), the label-augmented cost, and POT's Sinkhorn on it."""
    ot = peer("ot")
    from scipy.linalg import sqrtm

    from transferops.ot import dataset_distance

    g = torch.Generator().manual_seed(4)
    ys, yt = torch.randint(0, 3, (60,), generator=g), torch.randint(1, 4, (50,), generator=g)  # 0 only in source
    Xs = torch.randn(60, 4, generator=g, dtype=torch.float64) + ys[:, None]
    Xt = torch.randn(50, 4, generator=g, dtype=torch.float64) * 1.3 + yt[:, None] * 0.8
    eps = 0.5
    W = np.zeros((3, 4))
    for c in range(3):
        for c2 in range(1, 4):
            A, B = Xs[ys == c].numpy(), Xt[yt == c2].numpy()
            if inner == "gaussian":
                S1, S2 = np.cov(A.T), np.cov(B.T)
                root = sqrtm(S1)
                W[c, c2] = (((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(S1) + np.trace(S2)
                            - 2 * np.trace(sqrtm(root @ S2 @ root)).real)
            else:
                W[c, c2] = ot.sinkhorn2(np.full(len(A), 1 / len(A)), np.full(len(B), 1 / len(B)), ot.dist(A, B),
                                        eps, method="sinkhorn_log", stopThr=1e-12, numItermax=100000)
    C = ot.dist(Xs.numpy(), Xt.numpy()) + W[ys.numpy()][:, yt.numpy()]
    want = ot.sinkhorn2(np.full(60, 1 / 60), np.full(50, 1 / 50), C, eps, method="sinkhorn_log", stopThr=1e-12,
                        numItermax=100000)
    got, label_w = dataset_distance(Xs, ys, Xt, yt, eps=eps, inner=inner, tol=1e-11, return_label_distances=True)
    np.testing.assert_allclose(label_w[:, 1:].numpy(), W[:, 1:], rtol=1e-6 if inner == "exact" else 1e-9, atol=1e-9)
    assert abs(float(got.transport_cost) - float(want)) < 1e-6 * float(want)


@pytest.mark.parametrize("inner", ["gaussian", "exact"])
def test_dataset_distance_online_matches_stored(online, inner):
    """Outer costs recomputed in tiles with the label table (each cloud sorted by class inside,
    answers in the callers' order) against the stored label-augmented costs: class ids with gaps
    (empty classes), a class only in the source, more target points than one tile."""
    import transferops.ot
    from transferops.ot import dataset_distance

    g = torch.Generator().manual_seed(9)
    ys = torch.tensor([0, 2, 5])[torch.randint(0, 3, (70,), generator=g)]
    yt = torch.tensor([2, 5, 6])[torch.randint(0, 3, (1100,), generator=g)]
    Xs = torch.randn(70, 3, generator=g, dtype=torch.float64) + ys[:, None] * 0.3
    Xt = torch.randn(1100, 3, generator=g, dtype=torch.float64) * 1.2 + yt[:, None] * 0.25
    kw = dict(eps=0.4, inner=inner, tol=1e-10, return_label_distances=True)
    got, W = dataset_distance(Xs, ys, Xt, yt, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transferops.ot, "MATERIALIZE_BYTES", 1 << 40)
        want, W_want = dataset_distance(Xs, ys, Xt, yt, **kw)
    torch.testing.assert_close(W, W_want, rtol=1e-9, atol=0)  # "exact": inner problems online too
    assert _rel(got.transport_cost, want.transport_cost) < 1e-9 and _rel(got.ot_eps, want.ot_eps) < 1e-9
    torch.testing.assert_close(got.plan(), want.plan(), rtol=1e-7, atol=1e-14)
    with pytest.raises(NotImplementedError, match="dataset_distance: gradients"):
        dataset_distance(Xs.requires_grad_(), ys, Xt, yt, eps=0.4)


def test_dataset_distance_sees_classes_not_label_names():
    """Renaming the classes changes nothing (the ground cost compares class distributions);
    swapping the features of two classes does."""
    from transferops.ot import dataset_distance

    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, 3, (90,), generator=g)
    X = torch.randn(90, 3, generator=g, dtype=torch.float64) + 3 * y[:, None]
    same = float(dataset_distance(X, y, X, y, eps=0.2).transport_cost)
    renamed = float(dataset_distance(X, y, X, (y + 1) % 3, eps=0.2).transport_cost)
    mixed = y.clone()
    mixed[:45] = (y[:45] + 1) % 3  # half the points change class: the classes' distributions change
    assert abs(renamed - same) < 1e-9 and float(dataset_distance(X, y, X, mixed, eps=0.2).transport_cost) > same + 1


@pytest.mark.parametrize("call,error,match", [
    (lambda d: d(torch.ones(3, 2), torch.tensor([0, 1, 0]), torch.ones(2, 3), torch.tensor([0, 1]), eps=1.0),
     ValueError, "Xs, Xt: expected features of one width"),
    (lambda d: d(torch.ones(3, 2), torch.tensor([0, 1]), torch.ones(2, 2), torch.tensor([0, 1]), eps=1.0),
     ValueError, "ys: expected 3 labels"),
    (lambda d: d(torch.ones(2, 2), torch.tensor([0.5, 1.0]), torch.ones(2, 2), torch.tensor([0, 1]), eps=1.0),
     TypeError, "ys: expected integer class ids"),
    (lambda d: d(torch.ones(2, 2), torch.tensor([0, -1]), torch.ones(2, 2), torch.tensor([0, 1]), eps=1.0),
     ValueError, "ys: class ids must be >= 0"),
    (lambda d: d(torch.ones(2, 2), torch.tensor([0, 1]), torch.ones(2, 2), torch.tensor([0, 1]), eps=1.0, inner="x"),
     ValueError, "inner: expected one of"),
])
def test_dataset_distance_bad_input(call, error, match):
    from transferops.ot import dataset_distance

    with pytest.raises(error, match=match):
        call(dataset_distance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("materialize", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_native_isas_agree_bit_for_bit(dtype, materialize, monkeypatch):
    """Every build of the Sinkhorn kernels this CPU runs gives identical bits (fixed lanes, no
    FMA contraction), stored costs and online alike."""
    import transferops.ot

    if not materialize:
        monkeypatch.setattr(transferops.ot, "MATERIALIZE_BYTES", 0)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(2, 90, 5, generator=g).to(dtype), torch.randn(2, 70, 5, generator=g).to(dtype)
    outs = outputs_per_isa(lambda: sinkhorn(x, y, eps=0.2, tol=1e-8 if dtype == torch.float64 else 1e-5,
                                            backend="native", progress=False))
    for isa, got in outs.items():
        for field in ("f", "g", "transport_cost", "ot_eps", "n_iter"):
            assert torch.equal(getattr(outs["base"], field), getattr(got, field)), (isa, field)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_online_values_do_not_depend_on_the_thread_count(dtype, online):
    """Each sum behind the values belongs to one point, so one thread and all of them give the
    same bits (per-thread column partials once made ot_eps differ between runs)."""
    from threadpoolctl import threadpool_limits
    from transferops._backend import native_module

    native = native_module()
    if native is None or native.omp_max_threads() < 2:
        pytest.skip("needs the native module with two or more OpenMP threads")
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(1, 333, 6, generator=g).to(dtype), torch.randn(1, 210, 6, generator=g).to(dtype)
    solve = lambda: sinkhorn(x, y, eps=0.3, tol=1e-6, backend="native", progress=False)  # noqa: E731
    many = solve()
    with threadpool_limits(1, user_api="openmp"):
        assert native.omp_max_threads() == 1
        one = solve()
    for field in ("f", "g", "transport_cost", "ot_eps", "n_iter"):
        assert torch.equal(getattr(one, field), getattr(many, field)), field


def test_sinkhorn_loss_is_a_custom_op_for_compiled_graphs():
    """torch.library.opcheck passes (schema, fake, autograd registration, AOT dispatch); the
    gradients equal those of sinkhorn(...).ot_eps; torch.compile(fullgraph=True) runs forward and
    backward without graph breaks; bad values still get clear errors from inside the op."""
    from transferops.ot import sinkhorn_loss

    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 15, 3, generator=g, dtype=torch.float64)
    a = torch.rand(2, 20, generator=g, dtype=torch.float64) + 0.5
    a = a / a.sum(-1, keepdim=True)
    b = torch.full((2, 15), 1 / 15, dtype=torch.float64)
    torch.library.opcheck(torch.ops.transferops.sinkhorn_ot_eps.default, (x, y, a, b, 0.5, 1.0, 1e-10, 10000))
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = sinkhorn_loss(xs, ys, a, b, eps=0.5, tol=1e-12).sum()
    got = torch.autograd.grad(loss, (xs, ys))
    want = torch.autograd.grad(sinkhorn(xs, ys, a, b, eps=0.5, tol=1e-12).ot_eps.sum(), (xs, ys))
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y):
        return sinkhorn_loss(x * 1.0, y, a, b, eps=0.5, tol=1e-12).sum()

    xc = x.clone().requires_grad_()
    value = step(xc, y)
    value.backward()
    torch.testing.assert_close(value, loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(xc.grad, got[0], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="x: expected finite values"):
        sinkhorn_loss(torch.full((3, 2), float("nan")), torch.ones(3, 2), eps=1.0)
