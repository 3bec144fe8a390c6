"""Transferability scores on untrusted labels and numeric arguments: class ids are remapped to
their distinct values in every score (an id of 10**12 costs what an id of 1 does), any integer
dtype names them the same, and what is not an integer class id is a clear error naming it."""
import numpy as np
import pytest
import torch

from transferops.transferability import LogMEStream, gbc, hscore, leep, logme, nce, otce, sfda, tmi, transrate

N = 90


def _data():
    g = torch.Generator().manual_seed(5)
    y = torch.arange(N) % 3
    F = torch.randn(3, 6, generator=g, dtype=torch.float64)[y] + torch.randn(N, 6, generator=g, dtype=torch.float64)
    probs = torch.softmax(F[:, :4] * 2, dim=1)
    source = torch.randint(0, 4, (N,), generator=g)
    return F, y, probs, source


def _scores():
    """name -> score(labels, source_labels): every score that takes class ids, the ids given
    to it as they come."""
    F, _, probs, source = _data()

    def stream(labels):
        s = LogMEStream()
        for lo, hi in ((0, 7), (7, 40), (40, N)):  # the first chunk sees two of the three classes
            s.update(F[lo:hi], labels[lo:hi])
        return s.score()

    return {
        "logme_native": lambda y, z: logme(F, y, backend="native"),
        "logme_reference": lambda y, z: logme(F, y, backend="reference"),
        "logme_official": lambda y, z: logme(F, y, compat="official"),
        "logme_stream": lambda y, z: stream(y),
        "leep": lambda y, z: leep(probs, y),
        "nce": lambda y, z: nce(z, y),
        "hscore": lambda y, z: hscore(F, y),
        "hscore_shrinkage": lambda y, z: hscore(F, y, shrinkage=True),
        "gbc": lambda y, z: gbc(F, y),
        "transrate": lambda y, z: transrate(F, y),
        "sfda": lambda y, z: sfda(F, y),
        "tmi": lambda y, z: tmi(F, y),
        "otce": lambda y, z: otce(F[:50], z[:50], F[50:], y[50:], eps=0.5),
    }


SCORES = list(_scores())


def _relabel(t: torch.Tensor, ids) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)[t]


@pytest.mark.parametrize("score", SCORES)
def test_huge_and_negative_ids_score_as_ids_0_to_c(score):
    """{0, 1, 2} renamed {5, 10**12, 17} or {-3, 0, -10**12}: the same score, computed over
    three classes (ids 0..max would be 10**12 one-hot columns, 8 TB at N = 90)."""
    _, y, _, source = _data()
    call = _scores()[score]
    want = call(y, source)
    for ids, source_ids in (([5, 10**12, 17], [9, 2**62, -1, 4]), ([-3, 0, -10**12], [0, 1, 2, 3])):
        got = call(_relabel(y, ids), _relabel(source, source_ids))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("score", SCORES)
def test_every_integer_dtype_names_classes_the_same(score):
    _, y, _, source = _data()
    call = _scores()[score]
    want = call(y, source)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64):
        torch.testing.assert_close(call(y.to(dtype), source.to(dtype)), want, rtol=1e-12, atol=1e-12)
    for dtype in (np.uint16, np.uint32, np.uint64, np.int64):
        torch.testing.assert_close(call(y.numpy().astype(dtype), source.numpy().astype(dtype)), want,
                                   rtol=1e-12, atol=1e-12)


def test_bool_labels_are_two_classes():
    F, y, _, _ = _data()
    binary = y == 1
    torch.testing.assert_close(logme(F, binary), logme(F, binary.long()), rtol=1e-12, atol=0)
    torch.testing.assert_close(gbc(F, binary.numpy()), gbc(F, binary.long()), rtol=1e-12, atol=0)


def test_logme_params_follow_the_ids_order():
    """Per-class parameters come in the order of the ids, in logme and in the stream alike,
    whatever order the ids first occur in."""
    F, y, _, _ = _data()
    ids = _relabel(y, [10**12, -7, 40])  # sorted: -7, 40, 10**12 = original classes 1, 2, 0
    _, want = logme(F, y, return_params=True)
    _, got = logme(F, ids, return_params=True)
    torch.testing.assert_close(got["alpha"], want["alpha"][[1, 2, 0]], rtol=1e-12, atol=0)
    stream = LogMEStream()
    for lo, hi in ((0, 1), (1, 2), (2, N)):  # 10**12 first, then -7
        stream.update(F[lo:hi], ids[lo:hi])
    _, streamed = stream.score(return_params=True)
    torch.testing.assert_close(streamed["alpha"], got["alpha"], rtol=1e-9, atol=0)
    assert float((streamed["m"] - got["m"]).abs().max()) <= 1e-8 * float(got["m"].abs().max())


def test_otce_joint_is_over_the_ids_that_occur():
    F, y, _, source = _data()
    _, parts = otce(F[:50], _relabel(source, [0, 10**12, 3, 2])[:50], F[50:], _relabel(y, [7, 1, 10**9])[50:],
                    eps=0.5, return_parts=True)
    assert parts["joint"].shape == (4, 3)


@pytest.mark.parametrize("bad,match", [
    ([0.0, 1.5], "labels: expected integer class ids, got 1.5 at index 1"),
    ([0.0, float("nan")], "labels: expected integer class ids, got nan at index 1"),
    ([float("inf"), 1.0], "labels: expected integer class ids, got inf at index 0"),
    ([1e30, 1.0], "labels: expected integer class ids, got 1e\\+30 at index 0"),
])
@pytest.mark.parametrize("score", ["logme", "leep", "hscore", "transrate", "sfda", "tmi"])
def test_non_integer_labels_are_a_value_error_naming_labels(score, bad, match):
    F, y, probs, _ = _data()
    labels = y.double()
    labels[:2] = torch.tensor(bad, dtype=torch.float64)
    call = {"logme": logme, "hscore": hscore, "transrate": transrate, "sfda": sfda, "tmi": tmi,
            "leep": lambda f, y: leep(probs, y)}[score]
    with pytest.raises(ValueError, match=match):
        call(F, labels)


def test_source_labels_are_checked_as_labels():
    _, y, _, source = _data()
    z = source.double()
    z[4] = 0.5
    with pytest.raises(ValueError, match="^source_labels: expected integer class ids, got 0.5 at index 4"):
        nce(z, y)
    with pytest.raises(ValueError, match=r"^source_labels\[1\]: expected integer class ids, got 0.5"):
        nce([source, z], y)
    with pytest.raises(ValueError, match=r"^source_labels\[1\]: expected 90 labels"):
        nce([source, source[:-1]], y)


@pytest.mark.parametrize("labels,error,match", [
    (torch.zeros(N, dtype=torch.complex64), TypeError, "labels: expected integer class ids, got torch.complex64"),
    (np.array(["a", "b"] * (N // 2)), TypeError, "labels: expected integer class ids, got ndarray"),
    ([2**64] + [0] * (N - 1), TypeError, "labels: expected integer class ids, got list"),
    ([3] * N, ValueError, "labels: expected at least two classes, got only class 3"),
])
def test_labels_that_are_not_class_ids_name_labels(labels, error, match):
    F, _, _, _ = _data()
    with pytest.raises(error, match=match):
        logme(F, labels)


@pytest.mark.parametrize("call,error,match", [
    (lambda F, y: transrate(F, y, eps=True), TypeError, "eps: expected a finite number, got bool"),
    (lambda F, y: transrate(F, y, eps=float("nan")), ValueError, "eps: expected a finite number, got nan"),
    (lambda F, y: transrate(F, y, eps=-1.0), ValueError, "eps: expected a positive number"),
    (lambda F, y: tmi(F, y, min_dist=float("inf")), ValueError, "min_dist: expected a finite number"),
    (lambda F, y: tmi(F, y, min_dist=True), TypeError, "min_dist: expected a finite number"),
    (lambda F, y: sfda(F, y, shrinkage=True), TypeError, "shrinkage: expected a finite number"),
    (lambda F, y: sfda(F, y, shrinkage=float("nan")), ValueError, "shrinkage: expected a finite number"),
])
def test_numeric_arguments_are_checked(call, error, match):
    F, y, _, _ = _data()
    with pytest.raises(error, match=match):
        call(F, y)


def test_numpy_scalars_are_numbers():
    F, y, _, _ = _data()
    assert float(transrate(F, y, eps=np.float32(0.5))) == pytest.approx(float(transrate(F, y, eps=0.5)), rel=1e-6)
    assert float(sfda(F, y, shrinkage=np.float64(0.3))) == float(sfda(F, y, shrinkage=0.3))


def test_every_score_takes_backend():
    """One public function per op, the same ``backend=`` on each: the torch scores run as
    'reference' (and 'auto'); another backend, asked for by argument or by use_backend, raises
    BackendUnavailable naming the score; an unknown name is a ValueError."""
    import transferops as to

    F, y, probs, source = _data()
    calls = {
        "leep": lambda b: to.leep(probs, y, backend=b), "nce": lambda b: to.nce(source, y, backend=b),
        "hscore": lambda b: to.hscore(F, y, backend=b), "gbc": lambda b: to.gbc(F, y, backend=b),
        "transrate": lambda b: to.transrate(F, y, backend=b), "sfda": lambda b: to.sfda(F, y, backend=b),
        "tmi": lambda b: to.tmi(F, y, backend=b), "ncti": lambda b: to.ncti(F, y, backend=b),
        "etran": lambda b: to.etran(F, backend=b), "logme": lambda b: to.logme(F, y, backend=b),
    }
    for name, call in calls.items():
        assert float(call("reference")) == pytest.approx(float(call("auto")), rel=1e-12), name
        if name != "logme":
            with pytest.raises(to.BackendUnavailable, match=f"{name}: backend 'native' cannot run"):
                call("native")
            with to.use_backend("cuda"), pytest.raises(to.BackendUnavailable, match=f"{name}: backend 'cuda'"):
                call("auto")
        with pytest.raises(ValueError, match="backend: expected one of"):
            call("fast")
