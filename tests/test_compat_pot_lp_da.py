"""transferops.compat.pot's exact solvers (``lp``), domain-adaptation transports (``da``) and
unified solvers (``solvers``) against POT on the same inputs, and every argument they reject."""
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch

from _kit import peer
from transferops.compat import pot as cot
from transferops.compat.pot import lp
from transferops.compat.pot.lp import MarginalError


@pytest.fixture(scope="module")
def ot():
    return peer("ot")


@pytest.fixture(params=["network_simplex", "highs"])
def solver(request, monkeypatch):
    """emd's two solvers: POT's network simplex (POT installed), scipy's HiGHS (without POT)."""
    if request.param == "highs":
        monkeypatch.setattr(lp, "_network_simplex", lambda *args: None)
    return request.param


def _problem(rng, n, m, uniform=False):
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + 0.5
    a = np.full(n, 1.0 / n) if uniform else rng.dirichlet(np.ones(n))
    b = np.full(m, 1.0 / m) if uniform else rng.dirichlet(np.ones(m))
    return a, b, ((x[:, None] - y[None]) ** 2).sum(-1)


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _close(ours, theirs, atol, center=False):
    ours, theirs = _np(ours).astype(np.float64), _np(theirs).astype(np.float64)
    if center:  # potentials defined up to a constant shift
        ours, theirs = ours - ours.mean(), theirs - theirs.mean()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)


# ---- lp -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,uniform", [(30, 30, False), (40, 25, False), (17, 50, False), (35, 35, True)])
def test_emd_matches_pot(ot, n, m, uniform, solver):
    a, b, M = _problem(np.random.default_rng(n * m), n, m, uniform)
    G0, log0 = ot.emd(a, b, M, log=True)
    G, log = cot.emd(a, b, M, log=True)
    _close(G, G0, 1e-10)
    assert isinstance(log["cost"], float) and abs(log["cost"] - log0["cost"]) < 1e-10
    assert log["warning"] is None and log["result_code"] == 1
    if not uniform:  # a nondegenerate vertex: unique duals once centred
        _close(log["u"], log0["u"], 1e-8)
        _close(log["v"], log0["v"], 1e-8)
    value = cot.emd2(a, b, M)
    assert isinstance(value, float) and abs(value - ot.emd2(a, b, M)) < 1e-10
    _close(cot.emd([], [], M), ot.emd([], [], M), 1e-10)  # POT's [] = uniform
    _close(cot.emd(list(a), list(b), M.tolist()), G0, 1e-10)


def test_emd_degenerate_and_zero_weights(ot, solver):
    rng = np.random.default_rng(1)
    n = 24
    M = rng.integers(0, 3, size=(n, n)).astype(np.float64)  # ties: many optimal plans
    a = np.full(n, 1 / n)
    G, log = cot.emd(a, a, M, log=True)
    assert abs(log["cost"] - ot.emd2(a, a, M)) < 1e-12
    _close(G.sum(0), a, 1e-14)
    _close(G.sum(1), a, 1e-14)
    u, v = log["u"], log["v"]
    assert (u[:, None] + v[None] - M).max() < 1e-9  # dual feasible, optimal, centred
    assert abs(u @ a + v @ a - log["cost"]) < 1e-12 and abs(u @ a - v @ a) < 1e-12

    a, b, M = _problem(rng, 20, 15)
    a[[2, 7]], b[4] = 0, 0
    a, b = a / a.sum(), b / b.sum()
    (G0, log0), (G, log) = ot.emd(a, b, M, log=True), cot.emd(a, b, M, log=True)
    _close(G, G0, 1e-10)
    # The weighted rows' and columns' duals are POT's; the zero weights' are completed the same
    # way, from a constant that is each solver's own: both feasible, not equal.
    _close(log["u"][a > 0], log0["u"][a > 0], 1e-8)
    _close(log["v"][b > 0], log0["v"][b > 0], 1e-8)
    assert (log["u"][:, None] + log["v"][None] - M).max() < 1e-9


def test_emd2_torch_gradients_and_dtypes(ot, solver):
    a, b, M = _problem(np.random.default_rng(2), 25, 18)
    grads = []
    for lib in (ot, cot):
        at, bt, Mt = (torch.tensor(t, requires_grad=True) for t in (a, b, M))
        value, log = lib.emd2(at, bt, Mt, log=True)
        (3.0 * value).backward()
        grads.append((value, at.grad, bt.grad, Mt.grad, log["u"], log["v"]))
    for ours, theirs in zip(grads[1], grads[0]):
        _close(ours, theirs, 1e-8)
    _close(grads[1][1], 3 * (grads[1][4] - grads[1][4].mean()), 1e-12)  # d/da = u - mean(u)
    at, Mt = torch.tensor(a, dtype=torch.float32, requires_grad=True), torch.tensor(M, requires_grad=True)
    G = cot.emd(at, [], Mt)
    assert G.dtype == torch.float32 and not G.requires_grad  # a's dtype; no gradient, as POT
    assert cot.emd2([], [], Mt.float()).dtype == torch.float32


def test_emd2_several_histograms(ot, solver):
    rng = np.random.default_rng(3)
    a, _, M = _problem(rng, 20, 16)
    B = rng.dirichlet(np.ones(16), size=3).T
    values = cot.emd2(a, B, M)
    assert isinstance(values, list) and len(values) == 3
    _close(values, ot.emd2(a, B, M), 1e-10)
    for k, (value, log) in enumerate(cot.emd2(a, B, M, log=True, return_matrix=True)):
        _close(log["G"], ot.emd(a, B[:, k], M), 1e-10)
        assert value == log["cost"]
    Bt = torch.tensor(B, requires_grad=True)
    costs = cot.emd2(torch.tensor(a), Bt, torch.tensor(M))
    (costs[0] + 2 * costs[2]).backward()  # column k's gradient is its v - mean(v)
    for k, w in ((0, 1.0), (1, 0.0), (2, 2.0)):
        v = cot.emd(a, B[:, k], M, log=True)[1]["v"]
        _close(Bt.grad[:, k], w * (v - v.mean()), 1e-12)


def test_emd_warnings_and_rejections(ot, solver):
    a, b, M = _problem(np.random.default_rng(4), 12, 10)
    with pytest.warns(UserWarning, match="numItermax"):
        G, log = cot.emd(a, b, M, numItermax=1, log=True)
    assert log["result_code"] == 3 and "numItermax" in log["warning"]
    if solver == "highs":
        _close(G.sum(1), a, 1e-15)  # a feasible plan (the independent coupling)
    with pytest.raises(MarginalError, match="a, b") as err:
        cot.emd(a, 2 * b, M)
    assert isinstance(err.value, AssertionError) and isinstance(err.value, ValueError)  # as POT's assert
    _close(cot.emd2(a, 2 * b, M, check_marginals=False), ot.emd2(a, 2 * b, M, check_marginals=False), 1e-10)
    with pytest.warns(DeprecationWarning, match="numThreads"):
        cot.emd(a, b, M, numThreads=2)
    with pytest.warns(UserWarning, match="processes"):
        cot.emd2(a, np.stack([b, b], 1), M, processes=2)
    cases = [(dict(a=a[:-1]), MarginalError, "a"), (dict(numThreads=0), ValueError, "numThreads"),
             (dict(numItermax=0), ValueError, "numItermax"), (dict(numItermax=1.5), TypeError, "numItermax"),
             (dict(M=scipy.sparse.coo_array(M)), NotImplementedError, "M"),
             (dict(M=np.full_like(M, np.nan)), ValueError, "M"),
             (dict(potentials_init=(a, b[:-1])), ValueError, "potentials_init"),
             (dict(a=-a), ValueError, "a"), (dict(b=torch.tensor(b)), ValueError, "M, a")]
    for change, error, name in cases:
        kw = dict(a=a, b=b, M=M) | change
        with pytest.raises(error, match=f"^{name}"):
            cot.emd(**kw)
    with pytest.raises(ValueError, match="^processes"):
        cot.emd2(a, b, M, processes=0)
    _close(cot.emd(a, b, M, potentials_init=(a, b)), ot.emd(a, b, M), 1e-10)  # checked, unused


# ---- da -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def domains():
    rng = np.random.default_rng(5)
    Xs = np.concatenate([rng.normal(size=(15, 2)) + c for c in ([0, 0], [3, 0], [0, 3])])
    Xt = np.concatenate([rng.normal(size=(12, 2)) * 1.3 + c for c in ([1, 1], [4, 1], [1, 4])])
    ys, yt = np.repeat([0, 1, 2], 15), np.repeat([0, 1, 2], 12)
    yt_partial = np.where(rng.random(36) < 0.7, -1, yt)
    return Xs, ys, Xt, yt, yt_partial, rng.normal(size=(9, 2)) + 1, rng.normal(size=(7, 2)) + 2


def _compare_transports(ours, theirs, domains, atol):
    Xs, ys, Xt, yt, _, Xs_new, Xt_new = domains
    for name in ("cost_", "coupling_", "mu_s", "mu_t"):
        _close(getattr(ours, name), getattr(theirs, name), atol)
    for method, args in (("transform", dict(Xs=Xs)), ("transform", dict(Xs=Xs_new)),
                         ("inverse_transform", dict(Xt=Xt)), ("inverse_transform", dict(Xt=Xt_new)),
                         ("transform_labels", dict(ys=ys)), ("inverse_transform_labels", dict(yt=yt))):
        _close(getattr(ours, method)(**args), getattr(theirs, method)(**args), atol)


@pytest.mark.parametrize("kw", [dict(), dict(out_of_sample_map="ferradans", norm="median"),
                                dict(norm="max", reg_e=0.3, log=True), dict(norm="loglog", limit_max=5.0),
                                dict(limit_max=np.inf, out_of_sample_map="ferradans")])
def test_sinkhorn_transport_matches_pot(ot, domains, kw):
    Xs, ys, Xt, _, yt_partial, *_ = domains
    fit = dict(Xs=Xs, Xt=Xt) | (dict(ys=ys, yt=yt_partial) if "limit_max" in kw else {})
    theirs = ot.da.SinkhornTransport(tol=1e-13, max_iter=100000, **kw).fit(**fit)
    ours = cot.da.SinkhornTransport(tol=1e-13, max_iter=100000, **kw).fit(**fit)
    _compare_transports(ours, theirs, domains, 1e-6)
    assert float(ours.limit_max) == pytest.approx(float(theirs.limit_max))
    assert ("log_v" in ours.log_) == ("log_v" in theirs.log_)
    if kw.get("limit_max") == np.inf:  # labelled pairs of different classes carry no mass
        conflict = (ys[:, None] != yt_partial[None, :]) & (yt_partial[None, :] != -1)
        assert ours.coupling_[conflict].max() < 1e-300


@pytest.mark.parametrize("semi", [False, True])
def test_emd_transport_matches_pot(ot, domains, semi):
    Xs, ys, Xt, yt, yt_partial, *_ = domains
    fit = dict(Xs=Xs, Xt=Xt) | (dict(ys=ys, yt=yt_partial) if semi else {})
    theirs, ours = ot.da.EMDTransport(log=True).fit(**fit), cot.da.EMDTransport(log=True).fit(**fit)
    _compare_transports(ours, theirs, domains, 1e-10)
    assert float(ours.limit_max) == pytest.approx(float(theirs.limit_max))
    _close(cot.da.EMDTransport().fit_transform(**fit), theirs.transform(Xs=Xs), 1e-10)


def test_unbalanced_transport_and_torch(ot, domains):
    Xs, ys, Xt, yt, *_ = domains
    kw = dict(reg_m=0.5, max_iter=100000, tol=1e-13)
    theirs = ot.da.UnbalancedSinkhornTransport(**kw).fit(Xs=Xs, Xt=Xt)
    _compare_transports(cot.da.UnbalancedSinkhornTransport(**kw).fit(Xs=Xs, Xt=Xt), theirs, domains, 1e-6)
    ours = cot.da.SinkhornTransport(tol=1e-12).fit(Xs=torch.tensor(Xs), Xt=torch.tensor(Xt))
    reference = cot.da.SinkhornTransport(tol=1e-12).fit(Xs=Xs, Xt=Xt)
    out = ours.transform(Xs=torch.tensor(domains[5]))
    assert isinstance(out, torch.Tensor) and isinstance(ours.coupling_, torch.Tensor)
    _close(out, reference.transform(Xs=domains[5]), 1e-10)
    _close(ours.transform_labels(torch.tensor(ys)), reference.transform_labels(ys), 1e-10)


def test_da_rejections(domains):
    Xs, ys, Xt, *_ = domains
    with pytest.raises(ValueError, match="out_of_sample_map"):
        cot.da.SinkhornTransport(out_of_sample_map="nearest")
    with pytest.raises(ValueError, match="norm"):
        cot.da.EMDTransport(norm="l2")
    with pytest.raises(ValueError, match="Xt"):
        cot.da.EMDTransport().fit(Xs=Xs)
    with pytest.raises(RuntimeError, match="fit"):
        cot.da.EMDTransport().transform(Xs=Xs)
    otda = cot.da.EMDTransport().fit(Xs=Xs, Xt=Xt)
    with pytest.raises(ValueError, match="batch_size"):
        otda.transform(Xs=Xs[:5] + 1, batch_size=0)
    with pytest.raises(ValueError, match="ys"):
        otda.transform_labels(ys[:-1])
    with pytest.raises(ValueError, match="regularisation"):
        otda.set_params(regularisation=1.0)
    with pytest.raises(ValueError, match="ys, yt"):
        cot.da.EMDTransport().fit(Xs=Xs, ys=ys[:-1], Xt=Xt, yt=ys)
    assert cot.da.SinkhornTransport(reg_e=0.5).get_params()["reg_e"] == 0.5
    with pytest.warns(UserWarning, match="method"):
        cot.da.SinkhornTransport(method="sinkhorn").fit(Xs=Xs, Xt=Xt)


# ---- solvers --------------------------------------------------------------------------------------

ATTRIBUTES = ("value", "value_linear", "plan", "potential_a", "potential_b", "marginal_a", "marginal_b")


def _compare_results(ours, theirs, atol, center=False, names=ATTRIBUTES):
    for name in names:
        mine, ref = getattr(ours, name), getattr(theirs, name)
        assert (mine is None) == (ref is None), name
        if mine is not None:
            _close(mine, ref, atol, center=center and name.startswith("potential"))
    assert ours.status == theirs.status


@pytest.mark.parametrize("kw,center", [(dict(), False), (dict(reg=0.2), True), (dict(reg=0.2, reg_type="entropy"), True),
                                       (dict(reg=0.2, unbalanced=0.8), False),
                                       (dict(reg=0.5, unbalanced=(0.9, 3.0)), False)])
def test_solve_matches_pot(ot, kw, center):
    a, b, M = _problem(np.random.default_rng(6), 14, 11)
    tight = dict(tol=1e-13, max_iter=100000) if kw else {}
    _compare_results(cot.solve(M, a, b, **kw, **tight), ot.solve(M, a, b, **kw, **tight), 1e-8, center)
    _compare_results(cot.solve(M, **kw, **tight), ot.solve(M, **kw, **tight), 1e-8, center)
    res = cot.solve(torch.tensor(M), torch.tensor(a), torch.tensor(b), **kw, **tight)
    assert isinstance(res.value, torch.Tensor) and isinstance(res.plan, torch.Tensor)
    _compare_results(res, ot.solve(M, a, b, **kw, **tight), 1e-8, center)


def test_solve_sample_matches_pot(ot):
    rng = np.random.default_rng(7)
    Xa, Xb = rng.normal(size=(13, 2)), rng.normal(size=(10, 2))
    a, b = rng.dirichlet(np.ones(13)), rng.dirichlet(np.ones(10))
    tight = dict(tol=1e-13, max_iter=100000)
    _compare_results(cot.solve_sample(Xa, Xb, a, b), ot.solve_sample(Xa, Xb, a, b), 1e-8)
    # POT's lazy exact result keeps a sparse plan, and no marginals
    _compare_results(cot.solve_sample(Xa, Xb, a, b, lazy=True), ot.solve_sample(Xa, Xb, a, b, lazy=True), 1e-8,
                     names=ATTRIBUTES[:5])
    ours, theirs = (lib.solve_sample(Xa, Xb, a, b, reg=0.5, lazy=True, **tight) for lib in (cot, ot))
    _compare_results(ours, theirs, 1e-8, center=True)
    _close(ours.lazy_plan[:], theirs.lazy_plan[:], 1e-10)
    ours, theirs = (lib.solve_sample(Xa, Xb, a, b, reg=0.5, debias=True, **tight) for lib in (cot, ot))
    _compare_results(ours, theirs, 1e-8, center=True)
    assert set(ours.log) == {"res_aa", "res_bb", "res_ab"}


@pytest.mark.parametrize("grad", ["autodiff", "envelope", "last_step"])
def test_solve_gradients_match_pot(ot, grad):
    a, b, M = _problem(np.random.default_rng(8), 9, 7)
    grads = []
    for lib in (ot, cot):
        at, bt, Mt = (torch.tensor(t, requires_grad=True) for t in (a, b, M))
        lib.solve(Mt, at, bt, reg=1.0, grad=grad, tol=1e-13, max_iter=100000).value.backward()
        # the weights' gradients are defined up to a shift between a and b (balanced OT)
        grads.append((Mt.grad, at.grad - at.grad.mean(), bt.grad - bt.grad.mean()))
    for ours, theirs in zip(grads[1], grads[0]):
        _close(ours, theirs, 1e-8)
    Mt = torch.tensor(M, requires_grad=True)
    res = cot.solve(Mt, reg=1.0, grad="detach")
    assert not res.value.requires_grad and not res.plan.requires_grad


@pytest.mark.parametrize("call,error,name", [
    (lambda M: cot.solve(M, reg=1, reg_type="L2"), NotImplementedError, "reg_type"),
    (lambda M: cot.solve(M, reg=1, reg_type=(np.sum, np.sign)), NotImplementedError, "reg_type"),
    (lambda M: cot.solve(M, reg=1, unbalanced=1, unbalanced_type="TV"), NotImplementedError, "unbalanced_type"),
    (lambda M: cot.solve(M, reg=1, unbalanced=1, unbalanced_type="L2"), NotImplementedError, "unbalanced_type"),
    (lambda M: cot.solve(M, unbalanced=1), NotImplementedError, "unbalanced"),
    (lambda M: cot.solve(M, reg=1, unbalanced=1, method="lbfgsb"), NotImplementedError, "method"),
    (lambda M: cot.solve(M, unbalanced=1, method="mm"), NotImplementedError, "method"),
    (lambda M: cot.solve(M, method="simplex"), ValueError, "method"),
    (lambda M: cot.solve(M, reg=1, grad="implicit"), ValueError, "grad"),
    (lambda M: cot.solve(M, reg=1, c=np.ones_like(M)), NotImplementedError, "c"),
    (lambda M: cot.solve(M, plan_init=np.ones((2, 2))), ValueError, "plan_init"),
    (lambda M: cot.solve(M, reg=-1), ValueError, "^reg:"),
    (lambda M: cot.solve(M, n_threads=0), ValueError, "^n_threads"),
    (lambda M: cot.solve(M, reg=1, grad="last_step", max_iter=0), ValueError, "max_iter"),
    (lambda M: cot.solve_sample(M, M, method="lowrank"), NotImplementedError, "method"),
    (lambda M: cot.solve_sample(M, M, method="sinkhorn_gpu"), ValueError, "method"),
    (lambda M: cot.solve_sample(M, M, rank=5), NotImplementedError, "rank"),
    (lambda M: cot.solve_sample(M, M, random_state=0), NotImplementedError, "random_state"),
    (lambda M: cot.solve_sample(M, M, scaler=object()), NotImplementedError, "scaler"),
    (lambda M: cot.solve_sample(M, M, debias="split"), NotImplementedError, "debias"),
    (lambda M: cot.solve_sample(M, M, reg=1, lazy=True, unbalanced=1), NotImplementedError, "unbalanced"),
    (lambda M: cot.solve_sample(M, M, lazy=True, unbalanced=1), NotImplementedError, "unbalanced"),
    (lambda M: cot.solve_sample(M, M, batch_size=0), ValueError, "batch_size"),
])
def test_solve_rejections(call, error, name):
    M = np.random.default_rng(9).random((5, 4))
    with pytest.raises(error, match=name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(M)
