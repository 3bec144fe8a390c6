import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _kit import golden_file, peer
from transferops.transferability import LogMEStream, gbc, hscore, leep, logme, nce, sfda, tmi, transrate

CASES = ["logme_n600_d128_k10", "logme_n200_d512_k7"]


@pytest.fixture(scope="module")
def golden():
    facts = {c["file"].removesuffix(".npz"): c for c in json.loads(golden_file("logme_golden.json").read_text())["cases"]}
    return {name: (dict(np.load(golden_file(f"{name}.npz"))), facts[name]) for name in CASES}


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("task", ["cls", "reg"])
def test_logme_official_reproduces_the_official_code(golden, case, task, backend):
    """Scores within 1e-8 relative of thuml/LogME's LogME.fit, alpha, beta and the posterior
    mean weights too (the N=200 < D=512 case included, with its rank defect), on every
    float64 backend."""
    d, facts = golden[case]
    labels, regression = (d["labels"], False) if task == "cls" else (d["reg_targets"], True)
    score, params = logme(d["features"], labels, regression=regression, compat="official", return_params=True,
                          backend=backend)
    assert score.dtype == torch.float64 and score.dim() == 0
    assert _rel(score, facts[f"logme_{task}"]) < 1e-8
    assert _rel(params["alpha"], d[f"logme_{task}_alphas"].ravel()) < 1e-8
    assert _rel(params["beta"], d[f"logme_{task}_betas"].ravel()) < 1e-8
    assert _rel(params["m"], d[f"logme_{task}_ms"]) < 1e-8


RANK_DEFICIENT = ["fullrank", "deadrelu", "duplicated", "zerocols", "lowrank", "digits"]


@pytest.fixture(scope="module")
def rank_deficient():
    path = Path(__file__).with_name("golden") / "logme_rank_deficient.npz"
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", RANK_DEFICIENT)
def test_logme_official_reproduces_the_official_code_on_rank_deficient_features(rank_deficient, case, backend):
    """N > D with dead ReLU units, duplicated, zero and constant columns, a low-rank product and
    scikit-learn's digits pixels (constant pixels): the official code keeps their null directions
    (rounding-level singular values clear its 1e-10 cut), so its scores equal the corrected ones;
    official mode matches it to 1e-8 (it was 2% off on digits, 58% on dead units, 10x on the
    low-rank product), the stream too. Golden data: tests/golden/make_logme_rank_deficient.py."""
    g = rank_deficient
    if case == "digits":
        peer("sklearn")
        from sklearn.datasets import load_digits

        F, y = load_digits(return_X_y=True)
    else:
        F, y = g[f"{case}/features"], g[f"{case}/labels"]
    assert F.shape[0] > F.shape[1]
    score, params = logme(F, y, compat="official", return_params=True, backend=backend)
    assert _rel(score, g[f"{case}/logme_cls"]) < 1e-8
    assert _rel(params["alpha"], g[f"{case}/alphas"]) < 1e-8 and _rel(params["beta"], g[f"{case}/betas"]) < 1e-8
    assert _rel(logme(F, y, backend=backend), g[f"{case}/logme_cls"]) < 1e-8
    if case != "digits":
        reg = logme(F, g[f"{case}/reg_targets"], regression=True, compat="official", backend=backend)
        assert _rel(reg, g[f"{case}/logme_reg"]) < 1e-8
    if backend == "native":
        stream = LogMEStream(compat="official")
        for rows in np.array_split(np.arange(len(y)), 3):
            stream.update(F[rows], y[rows])
        assert _rel(stream.score(), g[f"{case}/logme_cls"]) < 1e-8


def test_logme_corrected_keeps_the_rank_term(golden):
    """Full rank (N > D): both modes agree. Rank k < D: corrected adds (D - k) log(alpha) back,
    8.964 -> about 0.869 on the golden case (the README's figure)."""
    d, facts = golden["logme_n600_d128_k10"]
    assert _rel(logme(d["features"], d["labels"]), facts["logme_cls"]) < 1e-8
    d, facts = golden["logme_n200_d512_k7"]
    corrected, params = logme(d["features"], d["labels"], return_params=True)
    assert abs(float(corrected) - 0.869) < 1e-3 and facts["logme_cls"] > 8.9
    # The defect is exactly the missing term: official - corrected = mean over classes of
    # (D - N) log(alpha) / (2N).
    D, N = d["features"].shape[1], d["features"].shape[0]
    official = logme(d["features"], d["labels"], compat="official")
    gap = float(((D - N) * torch.log(params["alpha"]) / (2 * N)).mean())
    assert abs(float(official - corrected) - gap) < 1e-9


def _evidence_direct(F: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> float:
    """The LogME evidence at (alpha, beta) from its definition with D x D matrices (no
    spectrum): A = alpha I + beta F^T F, m = beta A^-1 F^T y."""
    N, D = F.shape
    A = alpha * torch.eye(D, dtype=torch.float64) + beta * F.T @ F
    m = beta * torch.linalg.solve(A, F.T @ y)
    return float((D / 2 * np.log(alpha) + N / 2 * np.log(beta) - 0.5 * torch.logdet(A)
                  - beta / 2 * ((y - F @ m) ** 2).sum() - alpha / 2 * (m * m).sum() - N / 2 * np.log(2 * np.pi)) / N)


@pytest.mark.parametrize("N,D", [(300, 40), (40, 90)])
def test_logme_corrected_is_the_evidence_at_its_fixed_point(N, D):
    """Independent check of the corrected mode: at the returned alpha, beta, the evidence
    computed from its definition (a D x D solve and log-determinant) agrees with ours to the
    fixed point's own tolerance, for N > D and N < D alike."""
    g = torch.Generator().manual_seed(3)
    F = torch.randn(N, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64) / D
    y = torch.randint(0, 3, (N,), generator=g)
    _, params = logme(F, y, return_params=True)
    for c in range(3):
        target = (y == c).double()
        direct = _evidence_direct(F, target, float(params["alpha"][c]), float(params["beta"][c]))
        assert abs(direct - float(params["evidence"][c])) < 1e-3 * max(1.0, abs(direct))


def _correlated_features(N: int, D: int, K: int, seed: int, *, rank: int | None = None):
    """Class signal plus correlated noise, optionally of rank < min(N, D) (repeated columns)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (N,), generator=g)
    F = torch.randn(K, D, generator=g)[y] + torch.randn(N, D, generator=g) @ torch.randn(D, D, generator=g) / D**0.5
    if rank is not None:
        F = F[:, torch.arange(D) % rank]
    return F, y


@pytest.mark.parametrize("compat", ["corrected", "official"])
@pytest.mark.parametrize("N,D,K,rank,regression", [
    (257, 31, 5, None, False), (37, 90, 3, None, False), (64, 64, 4, None, False), (301, 40, 6, 13, False),
    (19, 60, 2, 7, False), (101, 17, 3, None, True),
])
def test_logme_native_matches_reference(compat, N, D, K, rank, regression):
    """The tridiagonal path (no eigenvectors) against the eigendecomposition reference: scores,
    alpha, beta, the evidence per target and the posterior mean weights, on N > D, N < D,
    N = D, rank-deficient features and regression targets; float32 and non-contiguous input."""
    F, y = _correlated_features(N, D, K, N * D, rank=rank)
    labels = torch.randn(N, K, dtype=torch.float64) @ torch.randn(K, K, dtype=torch.float64) if regression else y
    wide = torch.zeros(N, 2 * D)
    wide[:, ::2] = F
    for feats in (F, wide[:, ::2]):
        ref_score, ref = logme(feats, labels, regression=regression, compat=compat, return_params=True,
                               backend="reference")
        score, got = logme(feats, labels, regression=regression, compat=compat, return_params=True, backend="native")
        assert score.dtype == torch.float64 and score.dim() == 0
        torch.testing.assert_close(score, ref_score, rtol=1e-9, atol=0)
        for key in ("alpha", "beta", "evidence"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-9, atol=0, msg=key)
        # m's entries are sums with cancellation: compare relative to its largest entry
        assert float((got["m"] - ref["m"]).abs().max()) <= 1e-8 * float(ref["m"].abs().max())


def test_logme_native_runs_models_of_different_widths_in_one_call():
    feats = [_correlated_features(150, d, 4, d)[0] for d in (8, 150, 300)]
    y = _correlated_features(150, 8, 4, 8)[1]
    """Three models: a pair reduced side by side on two threads, then one alone."""
    (got, got_params), (want, want_params) = (logme(feats, y, backend=b, return_params=True)
                                              for b in ("native", "reference"))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    for p, q in zip(got_params, want_params):
        torch.testing.assert_close(p["alpha"], q["alpha"], rtol=1e-9, atol=0)
        assert float((p["m"] - q["m"]).abs().max()) <= 1e-8 * float(q["m"].abs().max())


def test_logme_batches_models_and_accepts_every_float_dtype():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(120, d, generator=g) for d in (16, 200, 16)]
    y = torch.randint(0, 4, (120,), generator=g)
    each = torch.stack([logme(f, y) for f in feats])
    torch.testing.assert_close(logme(feats, y), each, rtol=0, atol=0)
    torch.testing.assert_close(logme(torch.stack([feats[0], feats[2]]), y), each[[0, 2]], rtol=0, atol=0)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        x = feats[0].to(dtype)
        torch.testing.assert_close(logme(x, y), logme(x.double(), y), rtol=0, atol=0)
    assert logme(feats[0].numpy(), y.numpy()).dtype == torch.float64


def test_logme_degenerate_but_valid_inputs_give_finite_scores():
    """Constant features (rank 1), ids with a gap (0 and 2: two classes), a single regression
    target: finite, documented results, never NaN."""
    y = torch.tensor([0, 0, 2, 2, 0, 2])
    assert torch.isfinite(logme(torch.ones(6, 5), y))
    assert torch.isfinite(logme(torch.randn(6, 3), y))
    assert torch.isfinite(logme(torch.randn(6, 3), torch.randn(6), regression=True))


@pytest.mark.parametrize("call,error,match", [
    (lambda: logme(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), [0, 1]), ValueError, "features: expected finite"),
    (lambda: logme(torch.randn(5, 3), [0, 1, 0]), ValueError, "labels: expected 5 labels"),
    (lambda: logme(torch.randn(4, 3), [0, 1, float("nan"), 0]), ValueError, "labels: expected integer class ids, got nan"),
    (lambda: logme(torch.randn(4, 3), torch.tensor([0.0, 1.5, 1.0, 0.0])), ValueError, "labels: expected integer"),
    (lambda: logme(torch.randn(4, 3), [1, 1, 1, 1]), ValueError, "labels: expected at least two classes"),
    (lambda: logme(torch.randn(1, 3), [0]), ValueError, "at least 2 samples"),
    (lambda: logme([torch.randn(4, 3), torch.randn(5, 3)], [0, 1, 0, 1]), ValueError, r"features\[1\]: 5 samples"),
    (lambda: logme(torch.randn(4, 3), [0, 1, 0, 1], compat="icml"), ValueError, "compat: expected one of"),
    (lambda: logme(torch.randn(4, 3), torch.randn(3, 2), regression=True), ValueError, "labels: expected regression"),
    (lambda: leep(torch.randn(4, 3), [0, 1, 0, 1]), ValueError, "source_probs: expected rows of probabilities"),
    (lambda: gbc(torch.randn(4, 3), [0, 1, 0, 1], gaussian_type="full"), ValueError, "gaussian_type: expected one of"),
    (lambda: gbc(torch.randn(4, 3), [0, 0, 0, 0]), ValueError, "labels: expected at least two classes"),
    (lambda: transrate(torch.randn(4, 3), [0, 1, 0, 1], eps=0), ValueError, "eps: expected a positive number"),
    (lambda: transrate(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), [0, 1]), ValueError, "features: expected finite"),
    (lambda: tmi(torch.randn(8, 3), [0, 1] * 4, k=0), ValueError, "k: expected a positive integer"),
    (lambda: tmi(torch.randn(8, 3), [0, 1] * 4, min_dist=0.0), ValueError, "min_dist: expected a positive number"),
    (lambda: tmi(torch.randn(6, 3), [0, 1] * 3), ValueError, "labels: tmi needs a class with more than k = 3"),
    (lambda: sfda(torch.randn(8, 3), [0, 1] * 4, shrinkage=0.0), ValueError, "shrinkage: expected None"),
    (lambda: sfda(torch.tensor([[1.0, 2.0]] * 3 + [[0.0, 5.0]] * 3), [0] * 3 + [1] * 3), ValueError,
     "features: sfda needs features that vary within the classes"),
])
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("case", CASES)
def test_leep_and_nce_reproduce_the_official_code(golden, case):
    d, facts = golden[case]
    assert _rel(leep(d["source_probs"], d["labels"]), facts["leep"]) < 1e-10
    assert _rel(nce(d["source_probs"].argmax(1), d["labels"]), facts["nce"]) < 1e-10
    probs = torch.from_numpy(d["source_probs"])
    both = leep([probs, probs.flip(1)], d["labels"])
    assert both.shape == (2,) and _rel(both[0], facts["leep"]) < 1e-10


def test_nce_by_hand():
    """Z perfectly predicts Y: H(Y|Z) = 0. Z independent of a balanced binary Y: -log 2."""
    y = torch.tensor([0, 1, 0, 1])
    assert float(nce(torch.tensor([5, 3, 5, 3]), y)) == 0.0
    assert abs(float(nce(torch.tensor([0, 0, 1, 1]), y)) + np.log(2)) < 1e-15


@pytest.mark.parametrize("case", CASES)
def test_hscore_matches_its_definition(golden, case):
    """tr(pinv(cov f) cov(E[f|y])) computed with numpy's cov and pinv."""
    d, _ = golden[case]
    f, y = d["features"].astype(np.float64), d["labels"]
    g = np.zeros_like(f)
    for c in range(int(y.max()) + 1):
        if (y == c).any():
            g[y == c] = f[y == c].mean(0)
    want = np.trace(np.linalg.pinv(np.cov(f, rowvar=False), rcond=1e-15) @ np.cov(g, rowvar=False))
    assert _rel(hscore(d["features"], y), want) < 1e-8


def test_regularized_hscore_matches_scikit_learn(golden):
    sklearn = peer("sklearn.covariance")
    d, _ = golden["logme_n600_d128_k10"]
    f, y = d["features"].astype(np.float64), d["labels"]
    lw = sklearn.LedoitWolf().fit(f)
    g = np.zeros_like(f)
    for c in range(int(y.max()) + 1):
        g[y == c] = f[y == c].mean(0)
    want = np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * np.cov(g, rowvar=False)))
    assert _rel(hscore(d["features"], y, shrinkage=True), want) < 1e-8


def test_regularized_hscore_shrinks_towards_the_mean_eigenvalue():
    """Many more features than samples: the empirical covariance is singular and the
    shrinkage coefficient is strictly between 0 and 1; the score stays finite and below the
    unregularized one's dimension bound (C - 1)."""
    from transferops.transferability import _ledoit_wolf_from

    g = torch.Generator().manual_seed(1)
    f = torch.randn(20, 60, generator=g, dtype=torch.float64)
    fc = f - f.mean(0)
    cov, a = _ledoit_wolf_from(fc.T @ fc / 20, float(((fc * fc).sum(1) ** 2).sum()), 20)
    assert 0 < a < 1
    assert torch.linalg.eigvalsh(cov).min() > 0
    y = torch.arange(20) % 3
    assert 0 < float(hscore(f, y, shrinkage=True)) < 2


@pytest.mark.parametrize("compat", ["corrected", "official"])
@pytest.mark.parametrize("N,D,regression", [(230, 40, False), (60, 90, False), (150, 12, True)])
def test_logme_stream_matches_logme_on_the_whole(compat, N, D, regression):
    """Chunks of uneven sizes (one of them missing classes) against one call on all rows."""
    if compat == "official" and N <= D:
        pytest.skip("official streams only N > D (tested as an error below)")
    from transferops.transferability import LogMEStream

    F, y = _correlated_features(N, D, 4, N + D)
    labels = torch.randn(N, 2, dtype=torch.float64) if regression else y
    if not regression:
        labels = torch.where(torch.arange(N) < 20, y % 2, y)  # the first chunk sees classes 0 and 1 only
    other = torch.randn(N, 7)
    stream = LogMEStream(regression=regression, compat=compat)
    for lo, hi in [(0, 20), (20, 21), (21, N)]:
        stream.update([F[lo:hi], other[lo:hi]], labels[lo:hi])
    scores, params = stream.score(return_params=True)
    want, want_params = logme([F, other], labels, regression=regression, compat=compat, return_params=True)
    torch.testing.assert_close(scores, want, rtol=1e-9, atol=0)
    for got, ref in zip(params, want_params):
        torch.testing.assert_close(got["alpha"], ref["alpha"], rtol=1e-8, atol=0)
        assert float((got["m"] - ref["m"]).abs().max()) <= 1e-8 * float(ref["m"].abs().max())


def test_logme_stream_bad_input():
    from transferops.transferability import LogMEStream

    stream = LogMEStream(compat="official")
    with pytest.raises(ValueError, match="at least 2 samples"):
        stream.score()
    stream.update(torch.randn(5, 8), [0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="features: expected models of widths \\[8\\]"):
        stream.update(torch.randn(5, 9), [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="at least two classes over all updates"):
        stream.score()
    stream.update(torch.randn(3, 8), [1, 1, 0])
    with pytest.raises(ValueError, match=r"compat='official' streams only when N > D \(N = 8, D = 8\)"):
        stream.score()
    with pytest.raises(ValueError, match="features: expected finite"):
        stream.update(torch.full((2, 8), float("inf")), [0, 1])
    with pytest.raises(ValueError, match="compat: expected one of"):
        LogMEStream(compat="icml")


def _gbc_by_definition(F: np.ndarray, y: np.ndarray, spherical: bool) -> float:
    """GBC with explicit covariance matrices, class by class (the paper's eqs. 3-5)."""
    stats = {}
    for c in np.unique(y):
        rows = F[y == c]
        var = np.maximum(rows.var(0), 1e-4)
        stats[c] = (rows.mean(0), np.eye(F.shape[1]) * (var.mean() if spherical else var))
    total = 0.0
    for a in stats:
        for b in stats:
            if a == b:
                continue
            (mu1, S1), (mu2, S2) = stats[a], stats[b]
            S = (S1 + S2) / 2
            diff = mu1 - mu2
            if spherical:  # the authors' code keeps one log term of the scalar variances
                log_term = np.log(S[0, 0]) - 0.5 * np.log(S1[0, 0]) - 0.5 * np.log(S2[0, 0])
            else:
                log_term = np.log(np.linalg.det(S) / np.sqrt(np.linalg.det(S1) * np.linalg.det(S2)))
            total += np.exp(-(diff @ np.linalg.inv(S) @ diff / 8 + 0.5 * log_term))
    return -total


@pytest.mark.parametrize("spherical", [False, True])
def test_gbc_matches_its_definition(spherical):
    g = torch.Generator().manual_seed(11)
    y = torch.randint(1, 6, (90,), generator=g)  # class 0 absent: GBC uses the classes that occur
    y[0] = 5
    F = torch.randn(6, 7, generator=g, dtype=torch.float64)[y] * 0.8 + torch.randn(90, 7, generator=g, dtype=torch.float64)
    F[:, 3] = 1.0  # a constant feature: variance floored, not log(0)
    got = gbc(F, y, gaussian_type="spherical" if spherical else "diagonal")
    want = _gbc_by_definition(F.numpy(), y.numpy(), spherical)
    assert abs(float(got) - want) <= 1e-10 * abs(want)
    assert got.dtype == torch.float64 and float(got) < 0


def _transrate_by_definition(Z: np.ndarray, y: np.ndarray, eps: float) -> float:
    """TransRate with D x D log-determinants, class by class (the paper's eq. 6 as its authors'
    code evaluates it)."""
    def rate(X):
        if len(X) == 0:
            return 0.0
        return 0.5 * np.linalg.slogdet(np.eye(X.shape[1]) + X.T @ X / (len(X) * eps))[1]
    Z = Z - Z.mean(0)
    classes = np.unique(y)
    return rate(Z) - sum(rate(Z[y == c]) for c in classes) / len(classes)


@pytest.mark.parametrize("N,D", [(200, 12), (30, 50)])
def test_transrate_matches_its_definition(N, D):
    g = torch.Generator().manual_seed(N)
    y = torch.randint(0, 4, (N,), generator=g)
    y[y == 2] = 3  # ids 0, 1, 3: C = 3, the ids that occur
    F = torch.randn(4, D, generator=g, dtype=torch.float64)[y] + torch.randn(N, D, generator=g, dtype=torch.float64)
    for eps in (1e-4, 0.5):
        want = _transrate_by_definition(F.numpy(), y.numpy(), eps)
        assert abs(float(transrate(F, y, eps=eps)) - want) <= 1e-9 * abs(want)
    many = transrate([F, F[:, :5].float()], y)
    assert many.shape == (2,) and float(many[0]) == float(transrate(F, y))


def _tmi_by_definition(Z: np.ndarray, y: np.ndarray, k: int, min_dist: float) -> float:
    """The Kozachenko-Leonenko estimate per class from scipy's KD-tree (max norm), averaged as
    the authors' code does, over the ids that occur; fewer than 2 samples give 0, 2..k give no value."""
    from scipy.spatial import cKDTree
    from scipy.special import digamma

    terms = []
    for c in np.unique(y):
        X = Z[y == c]
        n, d = X.shape
        if n < 2:
            terms.append(0.0)
        elif n > k:
            eps = np.maximum(cKDTree(X).query(X, k + 1, p=np.inf)[0][:, -1], min_dist)
            terms.append(n / len(y) * (digamma(n) - digamma(k) + d / n * np.log(2 * eps).sum()))
    return float(np.mean(terms))


@pytest.mark.parametrize("k,min_dist", [(3, 1.0), (1, 1e-3), (5, 0.5)])
def test_tmi_matches_its_definition(k, min_dist, monkeypatch):
    """Ids with gaps, classes of one sample, of 2..k samples, with duplicated rows (distance 0, clamped),
    distances held a few rows at a time; several models at once."""
    monkeypatch.setattr("transferops.transferability._DISTANCE_BLOCK", 500)
    g = torch.Generator().manual_seed(k)
    y = torch.cat([torch.full((n,), c) for c, n in [(1, 1), (2, k if k > 1 else 2), (3, 40), (4, 57), (5, 130)]])
    y = y[torch.randperm(y.numel(), generator=g)]
    F = 2 * torch.randn(6, 7, generator=g, dtype=torch.float64)[y] + torch.randn(y.numel(), 7, generator=g,
                                                                                 dtype=torch.float64)
    F[y == 4] = F[y == 4][torch.arange(57) % 20]  # repeated rows
    for f in (F, F[:, :3] * 0.3):
        want = _tmi_by_definition(f.numpy(), y.numpy(), k, min_dist)
        assert abs(float(tmi(f, y, k=k, min_dist=min_dist)) - want) <= 1e-12 * abs(want)
    many = tmi([F, F[:, :3].float()], y, k=k, min_dist=min_dist)
    assert many.shape == (2,) and float(many[0]) == float(tmi(F, y, k=k, min_dist=min_dist))


def _sfda_by_definition(X: np.ndarray, y: np.ndarray) -> float:
    """SFDA as its authors compute it: generalized eigenvectors of (S_b, shrunk S_w) with S_b =
    shrunk S_t - shrunk S_w, classifier means V V^T, ConfMix, a second fit (labels 0..C-1)."""
    from scipy.linalg import eigh

    def shrink(S, s):
        return (1 - s) * S + s * np.trace(S) / len(S) * np.eye(len(S))

    def fit(X, s):
        C = int(y.max()) + 1
        means = np.stack([X[y == c].mean(0) for c in range(C)])
        priors = np.bincount(y) / len(y)
        Sw = sum(priors[c] * np.cov(X[y == c].T, bias=True) for c in range(C))
        if s is None:
            v = Sw.sum(1)
            for _ in range(3):
                u = Sw @ v / np.linalg.norm(Sw @ v)
                v = Sw @ u / np.linalg.norm(Sw @ u)
            s = max(np.exp(-5 * v @ Sw @ u), 1e-10)
        _, V = eigh(shrink(np.cov(X.T, bias=True), s) - shrink(Sw, s), shrink(Sw, s))
        coef = means @ V @ V.T
        logits = X @ coef.T - 0.5 * np.sum(means * coef, 1) + np.log(priors)
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True), s, means

    rows = np.arange(len(y))
    p, s, means = fit(X, None)
    q = (np.exp(p) / np.exp(p).sum(1, keepdims=True))[rows, y][:, None]
    others = (means.sum(0) - means) / (len(means) - 1)
    p, _, _ = fit(q * X + (1 - q) * others[y], s)
    return float(p[rows, y].mean())


@pytest.mark.parametrize("N,D,scale", [(300, 20, 1.0), (120, 40, 0.1), (500, 8, 3.0)])
def test_sfda_matches_its_definition(N, D, scale):
    """Against the authors' eigenvector formulation; scale moves the adaptive shrinkage from
    ~1e-10 (large within-class variance) to ~0.9 (small)."""
    g = torch.Generator().manual_seed(N + D)
    y = torch.randint(0, 5, (N,), generator=g)
    F = scale * (torch.randn(5, D, generator=g, dtype=torch.float64)[y] + torch.randn(N, D, generator=g,
                                                                                    dtype=torch.float64))
    want = _sfda_by_definition(F.numpy(), y.numpy())
    got = sfda(F, y)
    assert abs(float(got) - want) <= 1e-9 * want and 0 < float(got) < 1
    relabeled = torch.tensor([7, 2, 9, 0, 4])[y]  # classes are the ids that occur, in any order
    assert abs(float(sfda(F, relabeled)) - want) <= 1e-9 * want
    many = sfda([F, F[:, :3].float()], y)
    assert many.shape == (2,) and float(many[0]) == float(got)


def test_demo_ranks_extractors_like_their_linear_probes():
    """The digits demo: eight extractors; LogME, the H-scores, GBC and SFDA order them nearly as
    their held-out linear-probe accuracy does. docs/transferability.md quotes the demo's table of
    Kendall taus (``--markdown``) between marker comments: it must be what the code gives now
    (regenerate it with ``python -m transferops.bench.demo_transferability --markdown``)."""
    peer("sklearn")
    from transferops.bench.demo_transferability import markdown_table, run

    result = run()
    assert len(result["rows"]) == 8
    for score in ("logme", "hscore", "hscore_shrinkage", "gbc", "sfda"):
        assert result["kendall_tau"][score] >= 0.6, (score, result["kendall_tau"])
    doc = (Path(__file__).resolve().parents[1] / "docs" / "transferability.md").read_text()
    begin, end = "<!-- demo_transferability:begin -->\n", "\n<!-- demo_transferability:end -->"
    assert doc.count(begin) == 1 and doc.count(end) == 1
    quoted = doc[doc.index(begin) + len(begin):doc.index(end)]
    assert quoted == markdown_table(result), "docs/transferability.md: regenerate the demo's table with " \
        "python -m transferops.bench.demo_transferability --markdown"


def test_otce_matches_a_plan_built_by_pot():
    """The label joint and conditional entropy from POT's own plan (sinkhorn_log at the same eps),
    and, as eps shrinks, from the exact coupling (ot.emd) the paper uses."""
    ot = peer("ot")
    from transferops.transferability import otce

    g = torch.Generator().manual_seed(9)
    ys, yt = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 4, (30,), generator=g)
    Xs = torch.randn(40, 5, generator=g, dtype=torch.float64) + ys[:, None]
    Xt = torch.randn(30, 5, generator=g, dtype=torch.float64) + yt[:, None] * 0.7

    def by_hand(P):
        joint = np.zeros((3, 4))
        np.add.at(joint, (ys.numpy()[:, None], yt.numpy()[None, :]), P)
        cond = joint / joint.sum(1, keepdims=True)
        return float(np.sum(joint[joint > 0] * np.log(cond[joint > 0])))

    M = ot.dist(Xs.numpy(), Xt.numpy())
    a, b = np.full(40, 1 / 40), np.full(30, 1 / 30)
    score, parts = otce(Xs, ys, Xt, yt, eps=0.5, tol=1e-12, return_parts=True)
    P = ot.sinkhorn(a, b, M, 0.5, method="sinkhorn_log", stopThr=1e-13, numItermax=100000)
    assert abs(float(score) - by_hand(P)) < 1e-9
    assert abs(float(parts["domain_difference"]) - float((P * M).sum())) < 1e-9
    exact = by_hand(ot.emd(a, b, M))
    assert abs(float(otce(Xs, ys, Xt, yt, eps=0.1, tol=1e-6)) - exact) < 0.05 * abs(exact)
