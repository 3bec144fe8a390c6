"""Optimal transport on inputs nobody vetted: eps far above the costs, tolerances below what the
working precision resolves, masses equal only up to rounding, unbounded eps-scaling schedules,
out-of-range or mistyped numeric arguments, labels of any integer dtype. Each answer is checked
against the float64 reference backend, POT, or the closed form of the regime."""
import math
import warnings

import numpy as np
import pytest
import torch

from _kit import peer
from transferops import ot
from transferops.compat import pot

BACKENDS = ["native", "reference"]


def _clouds(dtype=torch.float64, n=50, m=60):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype),
            (torch.randn(m, 3, generator=g, dtype=torch.float64) + 1).to(dtype))


def _limit(C, a, b, eps):
    """<C, a b^T> - |C~|^2 / eps and - |C~|^2 / (2 eps) (C~: C doubly centred), (<C, P>, ot_eps)
    of unit masses to O(R^3 / eps^2), R the spread of C."""
    Cb, aC = C @ b, a @ C
    c0 = a @ Cb
    q = float((a[:, None] * b[None, :] * (C - Cb[:, None] - aC[None, :] + c0) ** 2).sum())
    return float(c0) - q / eps, float(c0) - q / (2 * eps)


def _close(got, want, rtol):
    return abs(float(got) - want) <= rtol * abs(want)


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("eps", [1e8, 1e12, 1e16, 1e20, 1e100, 1e300])
def test_eps_far_above_the_costs_gives_the_independent_limit(eps, dtype, rtol, online, monkeypatch):
    """As eps / spread -> inf the plan tends to a b^T: ot_eps and <C, P> against the expansion
    (error (R / eps)^2 relative, R ~ 30 here), on every backend. Before, native ot_eps at eps =
    1e20 was 99920 (eps times the rounding of the plan's mass) and float32's at 1e12 was 0.115,
    both flagged converged; the reference was off by 1e-3 at 1e12 (the same cancellation)."""
    if online:
        monkeypatch.setattr(ot, "MATERIALIZE_BYTES", 0)
    x, y = _clouds(dtype)
    C = ot.cost_matrix(x.double(), y.double())
    a, b = torch.full((50,), 1 / 50, dtype=torch.float64), torch.full((60,), 1 / 60, dtype=torch.float64)
    transport, value = _limit(C, a, b, eps)
    for backend in BACKENDS[:1] if online else BACKENDS:
        r = ot.sinkhorn(x, y, eps=eps, backend=backend, progress=False)
        assert bool(r.converged) and _close(r.ot_eps, value, rtol) and _close(r.transport_cost, transport, rtol), \
            (backend, float(r.ot_eps), value)
        m = ot.sinkhorn_cost_matrix(C.to(dtype), eps=eps, backend=backend)
        assert _close(m.ot_eps, value, rtol) and _close(m.transport_cost, transport, rtol), backend
    assert _close(ot.sinkhorn_loss(x, y, eps=eps), value, rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [30.0, 3e3, 3e5])
def test_large_eps_native_matches_reference(eps, dtype):
    """Below the closed form's regime: the iterations, native against the reference, and POT's
    <C, P> (log-domain Sinkhorn) on the same costs."""
    POT = peer("ot")
    x, y = _clouds(dtype)
    kw = {"eps": eps, "tol": 1e-12 if dtype == torch.float64 else 1e-7}
    want, got = (ot.sinkhorn(x, y, backend=backend, **kw) for backend in ("reference", "native"))
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    assert _close(got.ot_eps, float(want.ot_eps), rtol) and _close(got.transport_cost, float(want.transport_cost), rtol)
    M = ot.cost_matrix(x, y).numpy()
    pot_cost = POT.sinkhorn2(np.full(50, 1 / 50), np.full(60, 1 / 60), M, eps, method="sinkhorn_log", stopThr=1e-12)
    assert _close(got.transport_cost, float(pot_cost), rtol)


@pytest.mark.parametrize("reach", [1.0, 1e3])
@pytest.mark.parametrize("eps", [1e3, 1e10, 1e20, 1e300])
def test_unbalanced_values_at_large_eps(eps, reach):
    """Unbalanced OT (no closed form needed: its potentials are set to reach's scale, not eps's):
    native against the reference, and against <C, a b^T> in the limit. Before, the reference was
    off by 3e-7 at eps = 1e10 (its KL terms cancelled to rounding times eps)."""
    x, y = _clouds()
    want, got = (ot.sinkhorn(x, y, eps=eps, reach=reach, tol=1e-12, backend=backend) for backend in BACKENDS[::-1])
    assert _close(got.ot_eps, float(want.ot_eps), 1e-10)
    assert _close(got.transport_cost, float(want.transport_cost), 1e-10)
    if eps >= 1e20:
        assert _close(got.ot_eps, float(ot.cost_matrix(x, y).mean()), 1e-12)


def test_mass_of_the_weights_in_the_limit():
    """Balanced weights of mass m: ot_eps = m (<C, a' b'> - |C~|^2 / (2 eps)) + eps m (m - 1 - log m),
    the last term exact (m = 1 + 1e-9: 50 at eps = 1e20); uniform weights (None) have m = 1."""
    x, y = _clouds()
    C = ot.cost_matrix(x, y)
    d = 1e-9
    a, b = torch.full((50,), (1 + d) / 50, dtype=torch.float64), torch.full((60,), (1 + d) / 60, dtype=torch.float64)
    m = float(a.sum())
    dm = m - 1
    for backend in BACKENDS:
        r = ot.sinkhorn(x, y, a, b, eps=1e20, backend=backend)
        _, unit = _limit(C, a / m, b / float(b.sum()), 1e20)
        want = m * unit + 1e20 * m * (dm**2 / 2 - dm**3 / 3 + dm**4 / 4)
        assert _close(r.ot_eps, want, 1e-6), (backend, float(r.ot_eps), want)


def test_a_batch_mixing_regimes_equals_separate_problems():
    """One problem whose costs vanish next to eps (closed form), one that iterates."""
    x, y = _clouds()
    xb, yb = torch.stack([x, x * 1e-9]), torch.stack([y, y * 1e-9])
    both = ot.sinkhorn(xb, yb, eps=1.0, tol=1e-12)
    for k in range(2):
        alone = ot.sinkhorn(xb[k], yb[k], eps=1.0, tol=1e-12)
        assert _close(both.ot_eps[k], float(alone.ot_eps), 1e-12)
        assert _close(both.transport_cost[k], float(alone.transport_cost), 1e-12)
        torch.testing.assert_close(both.plan()[k], alone.plan(), rtol=1e-12, atol=0)
    assert int(both.n_iter[1]) == 0 and int(both.n_iter[0]) > 0


@pytest.mark.parametrize("eps", [1e-20, 1e-300, 5e-324])
def test_eps_far_below_the_costs_is_a_clear_error(eps):
    """eps below the rounding of the costs (2^-44 times the largest): before, native returned
    <C, P> = 5e305 at eps = 1e-20 (costs up to 30), the reference a marginal error of 19, both NaN
    at subnormal eps. eps = 1e-11 still solves (slowly: a plan, not noise)."""
    x, y = _clouds()
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="^eps: .* is below 2\\^-44 times the largest cost"):
            ot.sinkhorn(x, y, eps=eps, backend=backend)
        with pytest.raises(ValueError, match="^eps: "):
            ot.sinkhorn_cost_matrix(ot.cost_matrix(x, y), eps=eps, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ot.sinkhorn(x, y, eps=1e-11, max_iter=100)
    C = ot.cost_matrix(x, y)
    assert float(C.min()) <= float(r.transport_cost) <= float(C.max()) and math.isfinite(float(r.ot_eps))


def _issue_problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 2, generator=g), torch.rand(400, 2, generator=g) + 0.2
    a = torch.rand(300, generator=g)
    return x, y, a / a.sum()  # float32 weights: mass 1 in float32, 1 - 6e-8 in float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_masses_equal_up_to_rounding_converge(backend):
    """A balanced problem whose masses differ by float32 rounding, with tol below the gap: before,
    native ran to max_iter and diverged (marginal error 147, <C, P> 13.2 against 0.0892 at tol
    1e-6); the reference ran 10000 iterations (36 s) without converging."""
    x, y, a = _issue_problem()
    C = ot.cost_matrix(x, y)
    loose = ot.sinkhorn_cost_matrix(C, a.double(), eps=0.01, tol=1e-6, backend=backend)
    tight = ot.sinkhorn_cost_matrix(C, a.double(), eps=0.01, tol=1e-9, max_iter=10000, backend=backend)
    assert bool(tight.converged) and float(tight.marginal_error) <= 1e-9
    assert _close(tight.transport_cost, float(loose.transport_cost), 1e-5)


def test_pot_compat_at_pots_default_stop_threshold():
    """POT's default stopThr=1e-9 on those weights: POT's answer (before: 13.2 against 0.0892)."""
    POT = peer("ot")
    x, y, a = _issue_problem()
    M = POT.dist(x.double().numpy(), y.double().numpy())
    an, b = a.double().numpy(), np.full(400, 1 / 400)
    want = POT.sinkhorn2(an, b, M, 0.01, method="sinkhorn_log")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pot.sinkhorn2(an, b, M, 0.01)
    assert _close(got, float(want), 1e-8)


def test_the_solver_returns_its_best_state():
    """Called directly with masses that differ (no iteration can meet tol), the native solver runs
    to max_iter: it returns the state of its smallest error, not where Anderson's extrapolation of
    the drift took it (before: marginal error 147, <C, P> 13.2)."""
    x, y, a = _issue_problem()
    C = ot.cost_matrix(x, y)[None]
    b = torch.full((1, 400), 1 / 400, dtype=torch.float64)
    *_, transport, _, n_iter, error = ot._sinkhorn_native(C, a.double()[None], b, 0.01, None, 1e-12, 10000, [], False,
                                                          False)
    assert int(n_iter) == 10000 and float(error) < 1e-6 and abs(float(transport) - 0.0892374) < 1e-6


@pytest.mark.parametrize("tol,dtype,floor", [(1e-9, torch.float32, 1e-7), (1e-18, torch.float64, 1e-15)])
def test_tol_below_the_working_precision_is_floored_with_a_warning(tol, dtype, floor, monkeypatch):
    """Online (point clouds, costs never stored): a tol the working precision cannot resolve is
    raised to what it can, with a warning naming tol; the solve stops there, at the answer of a
    reachable tol. Before: float32 with these weights ran every iteration without converging."""
    monkeypatch.setattr(ot, "MATERIALIZE_BYTES", 0)
    x, y, a = _issue_problem()
    x, y = x.to(dtype), y.to(dtype)
    with pytest.warns(RuntimeWarning, match=f"tol={tol:g} is below the marginal error"):
        r = ot.sinkhorn(x, y, a, eps=0.01, tol=tol, max_iter=2000, progress=False)
    assert bool(r.converged) and float(r.marginal_error) <= floor and int(r.n_iter) < 500
    loose = ot.sinkhorn(x, y, a, eps=0.01, tol=1e-6, progress=False)
    assert _close(r.transport_cost, float(loose.transport_cost), 1e-5)


def test_eps_scaling_near_one_is_a_clear_error():
    """Before: 0.999999999 built a schedule of 1e10 values (MemoryError at 6 GB)."""
    x, y = _clouds()
    with pytest.raises(ValueError, match="eps_scaling: a factor of 0.999999999 takes .* more than max_iter=10000"):
        ot.sinkhorn(x, y, eps=0.01, eps_scaling=0.999999999)
    assert bool(ot.sinkhorn(x, y, eps=0.01, eps_scaling=0.999, max_iter=20000).converged)


def _bad_numbers():
    x, y = _clouds(n=5, m=6)
    C = ot.cost_matrix(x, y)
    calls = {
        "sinkhorn": lambda kw: ot.sinkhorn(x, y, **{"eps": 1.0, **kw}),
        "sinkhorn_cost_matrix": lambda kw: ot.sinkhorn_cost_matrix(C, **{"eps": 1.0, **kw}),
        "sinkhorn_divergence": lambda kw: ot.sinkhorn_divergence(x, y, **{"eps": 1.0, **kw}),
    }
    cases = []
    for value in (2**64, 2**31, 0, -1):
        cases.append(("max_iter", value, ValueError))
    for value in (1.5, 10.0, True, "10", None):
        cases.append(("max_iter", value, TypeError))
    for name in ("eps", "tol", "reach"):
        for value in (math.nan, math.inf, -math.inf, 0.0, -1.0):
            cases.append((name, value, ValueError))
        for value in ("1", True, [1.0], 1j):
            cases.append((name, value, TypeError))
    for value in (math.nan, 0.0, 1.0, 1.5, -0.5):
        cases.append(("eps_scaling", value, ValueError))
    cases.append(("eps_scaling", "0.5", TypeError))
    return [pytest.param(fn, name, value, error, id=f"{key}-{name}={value!r}")
            for key, fn in calls.items() for name, value, error in cases
            if not (key == "sinkhorn_divergence" and name == "reach")]


@pytest.mark.parametrize("call,name,value,error", _bad_numbers())
def test_bad_numbers_are_clear_errors_on_every_backend(call, name, value, error):
    """Each argument is checked before a backend is chosen: the same error, naming it, on every
    backend (before: max_iter=2**64 was an OverflowError/TypeError from pybind11, 1e10 updates
    of eps-scaling were attempted, NumPy floats were refused)."""
    messages = set()
    for backend in BACKENDS:
        with pytest.raises(error, match=f"^{name}: ") as info:
            call({name: value, "backend": backend})
        messages.add(str(info.value))
    assert len(messages) == 1


def test_valid_numbers_of_other_types_are_accepted():
    x, y = _clouds(n=5, m=6)
    r = ot.sinkhorn(x, y, eps=np.float32(1.0), tol=np.float64(1e-6), max_iter=np.int64(100), reach=torch.tensor(2.0))
    assert bool(r.converged)


@pytest.mark.parametrize("call,match,error", [
    (lambda x, y: ot.sinkhorn_loss(x, y, eps=1.0, max_iter=2**64), "max_iter: ", ValueError),
    (lambda x, y: ot.sinkhorn_loss(x, y, eps=1.0, max_iter=2.5), "max_iter: ", TypeError),
    (lambda x, y: ot.sinkhorn_loss(x, y, eps=math.nan), "eps: ", ValueError),
    (lambda x, y: ot.sinkhorn_loss(x, y, eps=1.0, tol=-1.0), "tol: ", ValueError),
    (lambda x, y: ot.dataset_distance(x, torch.zeros(5, dtype=torch.int64), y, torch.zeros(6, dtype=torch.int64),
                                      eps=-1.0), "eps: ", ValueError),
    (lambda x, y: ot.dataset_distance(x, torch.zeros(5, dtype=torch.int64), y, torch.zeros(6, dtype=torch.int64),
                                      eps=1.0, inner="exact", inner_eps=math.inf), "inner_eps: ", ValueError),
    (lambda x, y: ot.dataset_distance(x, torch.zeros(5, dtype=torch.int64), y, torch.zeros(6, dtype=torch.int64),
                                      eps=1.0, max_iter=0), "max_iter: ", ValueError),
    (lambda x, y: pot.sinkhorn2([], [], ot.cost_matrix(x, y).numpy(), -1.0), "reg: ", ValueError),
    (lambda x, y: pot.sinkhorn2([], [], ot.cost_matrix(x, y).numpy(), 1.0, numItermax=2**64), "numItermax: ",
     ValueError),
    (lambda x, y: pot.sinkhorn2([], [], ot.cost_matrix(x, y).numpy(), 1.0, stopThr=math.nan), "stopThr: ",
     ValueError),
    (lambda x, y: pot.sinkhorn_unbalanced2([], [], ot.cost_matrix(x, y).numpy(), 1.0, -1.0), "reg_m: ", ValueError),
    (lambda x, y: pot.sinkhorn_unbalanced2([], [], ot.cost_matrix(x, y).numpy(), 1.0, (1.0, 2.0, 3.0)), "reg_m: ",
     ValueError),
    (lambda x, y: pot.empirical_sinkhorn2(x.numpy(), y.numpy(), 1.0, numIterMax=1.5), "numIterMax: ", TypeError),
    (lambda x, y: pot.sinkhorn2([], [], np.ones((5, 6), dtype=np.complex128), 1.0), "M: ", TypeError),
])
def test_other_entry_points_check_their_numbers(call, match, error):
    x, y = _clouds(n=5, m=6)
    with pytest.raises(error, match=f"^{match}"):
        call(x, y)


def test_pot_reg_m_inf_is_balanced():
    x, y = _clouds(n=5, m=6)
    M = ot.cost_matrix(x, y).numpy()
    balanced = pot.sinkhorn2([], [], M, 1.0, stopThr=1e-12)
    assert _close(pot.sinkhorn_unbalanced2([], [], M, 1.0, math.inf, stopThr=1e-12), float(balanced), 1e-12)


def _labeled_data():
    g = torch.Generator().manual_seed(5)
    ys, yt = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (30,), generator=g)
    Xs = torch.randn(40, 3, generator=g, dtype=torch.float64) + ys[:, None]
    Xt = torch.randn(30, 3, generator=g, dtype=torch.float64) + yt[:, None] * 0.8
    return Xs, ys, Xt, yt


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_dataset_distance_takes_labels_of_any_integer_dtype(dtype):
    """Before: uint8 labels were indexing masks (IndexError traceback); other integer dtypes and
    floats holding integers now give the int64 answer."""
    Xs, ys, Xt, yt = _labeled_data()
    want, W = ot.dataset_distance(Xs, ys, Xt, yt, eps=0.5, return_label_distances=True)
    got, W_got = ot.dataset_distance(Xs, ys.to(dtype), Xt, yt.to(dtype), eps=0.5, return_label_distances=True)
    assert float(got.transport_cost) == float(want.transport_cost)
    torch.testing.assert_close(W_got, W, rtol=0, atol=0)


def test_dataset_distance_bool_and_sparse_labels():
    """Bool labels are two classes; ids as large as 1e9 cost memory per class present, not per
    id (before: a 1e9-row table); the table by id that return_label_distances gives is refused
    past LABEL_TABLE_ENTRIES, naming the labels."""
    Xs, ys, Xt, yt = _labeled_data()
    ys2, yt2 = ys.clamp(max=1), yt.clamp(max=1)
    want = ot.dataset_distance(Xs, ys2, Xt, yt2, eps=0.5)
    got = ot.dataset_distance(Xs, ys2.bool(), Xt, yt2.bool(), eps=0.5)
    assert float(got.transport_cost) == float(want.transport_cost)
    far = ot.dataset_distance(Xs, ys2 * 10**9, Xt, yt2 * 10**9 + 7, eps=0.5)
    assert _close(far.transport_cost, float(want.transport_cost), 1e-12)
    with pytest.raises(ValueError, match="ys, yt: return_label_distances gives a table indexed by class id"):
        ot.dataset_distance(Xs, ys2 * 10**9, Xt, yt2, eps=0.5, return_label_distances=True)


@pytest.mark.parametrize("eps", [1e20, 1e300])
def test_dataset_distance_in_the_limit_online_matches_stored(eps, monkeypatch):
    """The closed form from the clouds' moments and the label table (online) against the one from
    the stored label-augmented costs."""
    Xs, ys, Xt, yt = _labeled_data()
    want = ot.dataset_distance(Xs, ys, Xt, yt, eps=eps)
    monkeypatch.setattr(ot, "MATERIALIZE_BYTES", 0)
    got = ot.dataset_distance(Xs, ys, Xt, yt, eps=eps)
    assert int(got.n_iter) == 0 and _close(got.transport_cost, float(want.transport_cost), 1e-12)
    assert _close(got.ot_eps, float(want.ot_eps), 1e-12)
    torch.testing.assert_close(got.plan(), want.plan(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("labels,error,match", [
    (torch.tensor([0.0, 1.5] * 20), TypeError, "ys: expected integer class ids, got 1.5"),
    (torch.tensor([0.0, math.nan] * 20), TypeError, "ys: expected integer class ids, got nan"),
    (torch.tensor([0, -3] * 20), ValueError, "ys: class ids must be >= 0"),
    (torch.zeros(39, dtype=torch.int64), ValueError, "ys: expected 40 labels"),
    ([0, 1] * 20, TypeError, "ys: expected integer class ids"),
])
def test_dataset_distance_bad_labels(labels, error, match):
    Xs, _, Xt, yt = _labeled_data()
    with pytest.raises(error, match=match):
        ot.dataset_distance(Xs, labels, Xt, yt, eps=0.5)
