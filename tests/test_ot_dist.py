"""Sinkhorn and OTDD with x's rows sharded across gloo ranks (sinkhorn(..., group=)) against the
same problem on one process: potentials, values and iteration counts to float64 rounding
(1e-10), gradients included; arguments one rank rejects raise on every rank."""
import pytest
import torch

from _kit import require_backend
from _ranks import run_ranks
from transferops import ot

TOL = dict(rtol=1e-10, atol=1e-10)


def _clouds(B=None):
    g = torch.Generator().manual_seed(0)
    lead = () if B is None else (B,)
    x = torch.randn(*lead, 47, 5, generator=g, dtype=torch.float64)
    y = torch.randn(*lead, 38, 5, generator=g, dtype=torch.float64) + 1
    a = torch.rand(*lead, 47, generator=g, dtype=torch.float64) + 0.1
    a[..., 3] = 0.0  # a zero weight
    b = torch.rand(*lead, 38, generator=g, dtype=torch.float64) + 0.1
    return x, y, a, b * a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True)


def _datasets():
    g = torch.Generator().manual_seed(1)
    Xs, ys = torch.randn(52, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (52,), generator=g) * 2 + 1
    Xt, yt = torch.randn(41, 4, generator=g, dtype=torch.float64) + 0.5, torch.randint(0, 4, (41,), generator=g)
    return Xs, ys, Xt, yt


# Every rank's rows: uneven blocks, rank 0's taken with a stride (a non-contiguous view).
def _rows(n, rank, world):
    return torch.arange(n).tensor_split(world)[rank]


def _cols(m, rank, world, sharded):
    return _rows(m, rank, world) if sharded else torch.arange(m)


CASES = [  # (backend, reach, y_sharded, batch)
    ("native", None, False, None), ("native", 2.0, True, None), ("reference", None, True, 2),
    ("reference", 2.0, False, None), ("native", None, True, 3),
]


def _sinkhorn_cases(rank, world):
    out = []
    for backend, reach, y_sharded, B in CASES:
        x, y, a, b = _clouds(B)
        r, c = _rows(x.shape[-2], rank, world), _cols(y.shape[-2], rank, world, y_sharded)
        xs = x[..., r, :]
        if rank == 0:  # a strided view of the same rows
            xs = torch.repeat_interleave(xs, 2, dim=-2)[..., ::2, :]
        res = ot.sinkhorn(xs, y[..., c, :], a[..., r], b[..., c], eps=0.5, tol=1e-12, reach=reach, backend=backend,
                          group=torch.distributed.group.WORLD, y_sharded=y_sharded)
        out.append((res.f, res.g, res.ot_eps, res.transport_cost, res.n_iter))
    # gradients in x, y, a, b: y replicated (each rank gets all of y's), then y sharded (its block's)
    grads = []
    for y_sharded in (False, True):
        x, y, a, b = (t.requires_grad_() for t in _clouds())
        r, c = _rows(47, rank, world), _cols(38, rank, world, y_sharded)
        ot.sinkhorn(x[r], y[c], a[r], b[c], eps=0.2, tol=1e-13, reach=1.0, group=torch.distributed.group.WORLD,
                    y_sharded=y_sharded).ot_eps.backward()
        grads.append((x.grad[r], y.grad[c], a.grad[r], b.grad[c]))
    Xs, ys, Xt, yt = _datasets()
    otdd = []
    for sharded in (False, True):
        r = _rows(52, rank, world)
        if rank == 0:
            r = r[ys[r] != 3]  # a class that rank 0 lacks
        c = _cols(41, rank, world, sharded)
        res, W = ot.dataset_distance(Xs[r], ys[r], Xt[c], yt[c], eps=0.5, tol=1e-12, return_label_distances=True,
                                     group=torch.distributed.group.WORLD, target_sharded=sharded)
        otdd.append((r, res.f, res.g, res.transport_cost, W))
    return out, grads, otdd


def _joined(parts, key, sharded):
    return torch.cat([p[key] for p in parts], -1) if sharded else parts[0][key]


def test_sharded_sinkhorn_and_otdd_match_one_process():
    world = 3
    results = run_ranks(_sinkhorn_cases, world, timeout=180)
    for k, (backend, reach, y_sharded, B) in enumerate(CASES):
        x, y, a, b = _clouds(B)
        one = ot.sinkhorn(x, y, a, b, eps=0.5, tol=1e-12, reach=reach, backend="reference")
        parts = [res[0][k] for res in results]
        torch.testing.assert_close(_joined(parts, 0, True), one.f, **TOL)
        torch.testing.assert_close(_joined(parts, 1, y_sharded), one.g, **TOL)
        for p in parts:  # the values and counts of the whole problem, on every rank
            torch.testing.assert_close(p[2], one.ot_eps, **TOL)
            torch.testing.assert_close(p[3], one.transport_cost, **TOL)
            assert torch.equal(p[4], one.n_iter), (backend, reach, p[4], one.n_iter)
    for k, y_sharded in enumerate((False, True)):
        x, y, a, b = (t.requires_grad_() for t in _clouds())
        ot.sinkhorn(x, y, a, b, eps=0.2, tol=1e-13, reach=1.0, backend="reference").ot_eps.backward()
        gx, gy, ga, gb = ([res[1][k][i] for res in results] for i in range(4))
        torch.testing.assert_close(torch.cat(gx), x.grad, **TOL)
        torch.testing.assert_close(torch.cat(ga), a.grad, **TOL)
        torch.testing.assert_close(torch.cat(gy) if y_sharded else gy[1], y.grad, **TOL)
        torch.testing.assert_close(torch.cat(gb) if y_sharded else gb[2], b.grad, **TOL)
    Xs, ys, Xt, yt = _datasets()
    for k, sharded in enumerate((False, True)):
        parts = [res[2][k] for res in results]
        order = torch.cat([p[0] for p in parts])
        one, W = ot.dataset_distance(Xs[order], ys[order], Xt, yt, eps=0.5, tol=1e-12, return_label_distances=True,
                                     backend="reference")
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), one.f, **TOL)
        torch.testing.assert_close(torch.cat([p[2] for p in parts]) if sharded else parts[0][2], one.g, **TOL)
        for p in parts:
            torch.testing.assert_close(p[3], one.transport_cost, **TOL)
            torch.testing.assert_close(p[4], W, **TOL)


def _on_triton(rank, world):
    x, y, a, b = _clouds()
    r = _rows(47, rank, world)
    res = ot.sinkhorn(x[r].float(), y.float(), a[r], b, eps=1.0, tol=1e-5, backend="triton",
                      group=torch.distributed.group.WORLD)
    return res.f, res.g, res.ot_eps, res.n_iter


@pytest.mark.interpreter
def test_sharded_sinkhorn_on_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the children inherit it
    results = run_ranks(_on_triton, 2, timeout=240)
    x, y, a, b = _clouds()
    one = ot.sinkhorn(x.float(), y.float(), a, b, eps=1.0, tol=1e-5, backend="reference")
    torch.testing.assert_close(torch.cat([f for f, *_ in results]), one.f, rtol=0, atol=2e-4)
    for _, g, value, n_iter in results:
        torch.testing.assert_close(g, one.g, rtol=0, atol=2e-4)
        torch.testing.assert_close(value, one.ot_eps, rtol=1e-5, atol=0)
        assert n_iter == one.n_iter


def _errors(rank, world):
    x, y, a, b = _clouds()
    r = _rows(47, rank, world)
    errors = []
    for bad in ({"x": x[r, :4] if rank == 1 else x[r]}, {"y": y[:30] if rank == 2 else y, "b": b[:30] if rank == 2 else b},
                {"eps": -1.0}, {"a": -a[r] if rank == 1 else a[r]}, {"a": 0 * a[r], "reach": 1.0}):
        args = dict(x=x[r], y=y, a=a[r], b=b, eps=0.1) | bad
        try:
            ot.sinkhorn(args.pop("x"), args.pop("y"), args.pop("a"), args.pop("b"),
                        group=torch.distributed.group.WORLD, **args)
        except Exception as e:  # noqa: BLE001 (the test compares each rank's error)
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_an_argument_one_rank_rejects_raises_on_every_rank(monkeypatch):
    monkeypatch.setenv("TRANSFEROPS_DIST_TIMEOUT", "60")
    errors = run_ranks(_errors, 3, timeout=120)
    # x of another width on rank 1, negative weights there: every rank names rank 1 and its error
    for e in errors:
        assert e[0].startswith("RankFailure: rank 1 failed: x, y: expected [N, d] and [M, d]"), e
        assert e[1].startswith("ValueError: x, y, a, b (batch, width"), e  # y's points differ
        assert e[2].startswith("ValueError: eps: "), e
        assert e[3].startswith("RankFailure: rank 1 failed: a: expected non-negative weights"), e
        assert e[4] == "ValueError: a: expected a positive total mass over the ranks in every problem, got zero", e


def test_group_arguments_are_checked():
    x, y, *_ = _clouds()
    with pytest.raises(ValueError, match="y_sharded: blocks of y are for sharded problems"):
        ot.sinkhorn(x, y, eps=0.1, y_sharded=True)
    with pytest.raises(ValueError, match="target_sharded: blocks of the target"):
        ot.dataset_distance(x, torch.zeros(47), y, torch.zeros(38), eps=0.1, target_sharded=True)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
            ot.sinkhorn(x, y, eps=0.1, group=object())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("labeled", [False, True], ids=["plain", "labeled"])
def test_native_passes_equal_the_torch_reference(dtype, labeled):
    """The native sweeps (each a transferops._native.sinkhorn_pass) against the torch blocks they
    stand in for, on odd sizes, non-contiguous points, zero weights and a batch: half-steps both
    ways and the values. Tolerances: float64 to rounding; float32 tiles (GEMM in float32) to its
    rounding times the potentials' size."""
    require_backend("native")
    from transferops._ot_sweeps import BlockSweeps, NativeSweeps
    from transferops.ot import _Points

    g = torch.Generator().manual_seed(3)
    B = 1 if labeled else 2
    x = torch.randn(B, 7, 67, generator=g, dtype=torch.float64).transpose(1, 2).to(dtype)  # [B, 67, 7], strided
    y = torch.randn(B, 1030, 7, generator=g, dtype=torch.float64).to(dtype) + 0.5
    labels = None
    if labeled:
        W = torch.rand(3, 4, generator=g, dtype=torch.float64)
        labels = (torch.randint(0, 3, (67,), generator=g), torch.randint(0, 4, (1030,), generator=g), W)
    points = _Points(x, y, 0.5, labels)
    la, lb = torch.rand(B, 67, generator=g, dtype=torch.float64).log(), torch.rand(B, 1030, generator=g,
                                                                                    dtype=torch.float64).log()
    la[:, 5], lb[:, 1029] = -torch.inf, -torch.inf  # zero weights
    f, gp = torch.randn(B, 67, generator=g, dtype=torch.float64), torch.randn(B, 1030, generator=g, dtype=torch.float64)
    active = torch.ones(B, dtype=torch.int32)
    ref, fast = BlockSweeps(_Points(x.double(), y.double(), 0.5, labels)), NativeSweeps(points)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for eps in (0.3, 5.0):
        torch.testing.assert_close(fast.lse(gp, lb, eps, active), ref.lse(gp, lb, eps, active), **tol)
        torch.testing.assert_close(fast.lse(f, la, eps, active, transposed=True),
                                   ref.lse(f, la, eps, active, transposed=True), **tol)
        for got, want in zip(fast.values(f, gp, la, lb, eps, active), ref.values(f, gp, la, lb, eps, active)):
            torch.testing.assert_close(got, want, **tol)
    if B > 1:  # an inactive problem is left out
        assert torch.all(fast.lse(gp, lb, 0.3, torch.tensor([0, 1], dtype=torch.int32))[0] == 0)


def test_native_pass_rejects_mismatched_buffers():
    require_backend("native")
    from transferops._backend import native_buffer, native_module, single_threaded_blas

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    w, out = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 5, dtype=torch.float64)
    run = native_module().sinkhorn_pass
    with single_threaded_blas() as blas:
        with pytest.raises(ValueError, match="x_log_weights and x_pot go together"):
            run(native_buffer(x), native_buffer(y), 1.0, blas, 0.5, native_buffer(out), native_buffer(w),
                native_buffer(w), x_pot=native_buffer(torch.zeros(1, 5, dtype=torch.float64)))
        with pytest.raises(ValueError, match=r"out: expected \[2, 5\] float64, got \[1, 5\]"):
            run(native_buffer(x), native_buffer(y), 1.0, blas, 0.5, native_buffer(out), native_buffer(w),
                native_buffer(w), x_log_weights=native_buffer(out), x_pot=native_buffer(out))
        with pytest.raises(ValueError, match=r"y_pot: expected \[1, 4\] float64, got \[1, 5\]"):
            run(native_buffer(x), native_buffer(y), 1.0, blas, 0.5, native_buffer(out), native_buffer(w),
                native_buffer(out))
