"""GBC in log-sum-exp form, NCTI and ETran's energy score, each against a computation written
out here from the papers' equations (NumPy loops, float64), independent of the library's."""
import math

import numpy as np
import pytest
import torch
from scipy import linalg

from _kit import peer
from transferops.transferability import gbc
from transferops.transferability_collapse import etran, ncti

# ---- GBC -------------------------------------------------------------------------------------


def _gbc_log_overlap(F: np.ndarray, y: np.ndarray, spherical: bool) -> float:
    """log sum_{c != c'} exp(-D_B(c, c')) (Pándy et al., eqs. 3-5), pair by pair: the exponent's
    maximum taken out and the terms summed exactly by math.fsum, so no term underflows."""
    stats = []
    for c in np.unique(y):
        rows = F[y == c]
        var = np.maximum(((rows - rows.mean(0)) ** 2).mean(0), 1e-4)
        stats.append((rows.mean(0), np.full(1, var.mean()) if spherical else var))
    exponents = []
    for a, (mu1, v1) in enumerate(stats):
        for b, (mu2, v2) in enumerate(stats):
            if a != b:
                v = (v1 + v2) / 2
                distance = math.fsum((mu1 - mu2) ** 2 / np.broadcast_to(v, mu1.shape)) / 8 + 0.5 * math.fsum(
                    np.log(v) - 0.5 * np.log(v1) - 0.5 * np.log(v2))
                exponents.append(-distance)
    top = max(exponents)
    return top + math.log(math.fsum(math.exp(e - top) for e in exponents))


def _gbc_previous_formula(F: np.ndarray, y: np.ndarray) -> float:
    """The formula this module had before: every class against all, its own term exp(0) = 1
    included and then subtracted."""
    classes = np.unique(y)
    means = np.stack([F[y == c].mean(0) for c in classes])
    var = np.maximum(np.stack([F[y == c].var(0) for c in classes]), 1e-4)
    total = 0.0
    for c in range(len(classes)):
        avg = (var[c] + var) / 2
        distance = ((means[c] - means) ** 2 / avg).sum(1) / 8 + 0.5 * (
            np.log(avg).sum(1) - 0.5 * np.log(var[c]).sum() - 0.5 * np.log(var).sum(1))
        coefficient = np.exp(-distance)
        total = total + coefficient.sum() - coefficient[c]
    return -total


def _separated(separation: float, D: int = 4):
    """Three classes of 8 samples whose means lie ``separation`` apart along the diagonal; each
    sample sits +-sigma_c from its mean in every feature (sigma_c = 1, 1.5, 2), so every
    mean and variance is exact in float64 and D_B grows as separation^2."""
    sigma = np.array([1.0, 1.5, 2.0])
    y = np.repeat(np.arange(3), 8)
    signs = np.tile(np.array([1.0, -1.0]), 12)[:, None] * np.where(np.arange(D) % 2 == 0, 1.0, -1.0)
    F = (np.arange(3)[y] * separation)[:, None] + sigma[y][:, None] * signs
    return F, y


def _separation_for(log_target: float, D: int = 4) -> float:
    # Adjacent classes dominate: D_B ~ D separation^2 / (8 v), v their mean variance (<= 3.125).
    return math.sqrt(8 * 3.125 * -log_target / D)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("magnitude", [1e-3, 1e-30, 1e-100, 1e-200, 1e-300])
def test_gbc_keeps_its_digits_down_to_1e_300(magnitude, spherical):
    """|GBC| from 1e-3 to 1e-300 (D_B ~ 7..690) within 1e-10 of the pairs c != c' summed in log
    space; the previous formula (self term added and subtracted) gives -0 below ~1e-16."""
    F, y = _separated(_separation_for(math.log(magnitude)))
    want = _gbc_log_overlap(F, y, spherical)
    assert 1e-306 < math.exp(want) < 1e-2  # the case spans what it says
    kind = "spherical" if spherical else "diagonal"
    got = gbc(torch.from_numpy(F), y, gaussian_type=kind)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(float(got) + math.exp(want)) <= 1e-10 * math.exp(want)
    got_log = gbc(torch.from_numpy(F), y, gaussian_type=kind, log=True)
    assert abs(float(got_log) + want) <= 1e-12 * abs(want)
    assert abs(float(got_log) + math.log(-float(got))) <= 1e-12 * abs(want)  # -log(-GBC)
    if magnitude < 1e-16 and not spherical:
        assert _gbc_previous_formula(F, y) == 0.0


@pytest.mark.parametrize("spherical", [False, True])
def test_gbc_log_stays_finite_and_ordered_where_gbc_underflows(spherical):
    """D_B from ~700 to ~5000: GBC reaches -0 (exp(-745) is the last subnormal), log=True stays
    finite, equals the log-space reference, and grows with the separation as GBC would."""
    kind = "spherical" if spherical else "diagonal"
    logs, plain = [], []
    for log_target in (-700.0, -760.0, -1000.0, -5000.0):
        F, y = _separated(_separation_for(log_target))
        got = gbc(torch.from_numpy(F), y, gaussian_type=kind, log=True)
        assert math.isfinite(float(got))
        assert abs(float(got) + _gbc_log_overlap(F, y, spherical)) <= 1e-12 * abs(float(got))
        logs.append(float(got))
        plain.append(float(gbc(torch.from_numpy(F), y, gaussian_type=kind)))
    assert logs == sorted(logs) and len(set(logs)) == len(logs)
    assert plain[0] < 0 and plain[-1] == 0.0  # representable first, underflowed at the end


@pytest.mark.parametrize("spherical", [False, True])
def test_gbc_agrees_with_the_previous_formula_where_it_is_large(spherical):
    """Overlapping classes, |GBC| ~ 1: the c != c' sum in log space and the previous formula
    agree to rounding; several models at once give each model's score."""
    g = torch.Generator().manual_seed(5)
    y = torch.arange(45) % 4
    F = torch.randn(4, 6, generator=g, dtype=torch.float64)[y] * 0.5 + torch.randn(45, 6, generator=g,
                                                                                    dtype=torch.float64)
    kind = "spherical" if spherical else "diagonal"
    got = gbc(F, y, gaussian_type=kind)
    assert 0.1 < -float(got) < 12
    if not spherical:
        want = _gbc_previous_formula(F.numpy(), y.numpy())
        assert abs(float(got) - want) <= 1e-13 * abs(want)
    assert abs(float(got) + math.exp(_gbc_log_overlap(F.numpy(), y.numpy(), spherical))) <= 1e-13 * abs(float(got))
    both = gbc(torch.stack([F, 2 * F]), y, gaussian_type=kind, log=True)
    assert both.shape == (2,)
    assert float(both[0]) == pytest.approx(-math.log(-float(got)), rel=1e-13)


def test_gbc_log_must_be_a_bool():
    with pytest.raises(TypeError, match="log: expected a bool"):
        gbc(torch.randn(6, 2), [0, 1] * 3, log=1)


# ---- NCTI ------------------------------------------------------------------------------------


def _nuclear(A: np.ndarray) -> float:
    return float(np.linalg.svd(A, compute_uv=False).sum())


def _ncti_terms_by_hand(X: np.ndarray, y: np.ndarray, pca_dim: int = 64) -> np.ndarray:
    """(S_ncc, S_seli, log sum_c ||P_c||_*) of one model, written out: PCA by SVD, LDA by
    scipy's generalized eigensolver, posteriors sample by sample from Mahalanobis distances."""
    N, D = X.shape
    classes = np.unique(y)
    C = len(classes)
    Xc = X - X.mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    d = min(pca_dim, D, N - C)
    H = Xc @ Vt[:d].T
    shrinkage = max(math.exp(-(s[:d] ** 2 / (N - 1))[:32].sum()), 1e-10)
    priors = np.array([np.mean(y == c) for c in classes])
    means = np.stack([H[y == c].mean(0) for c in classes])
    within = sum(p * np.cov(H[y == c].T, bias=True).reshape(d, d) for p, c in zip(priors, classes))
    total = np.cov(H.T, bias=True).reshape(d, d)
    if shrinkage > 1e-10:  # the authors' LDA(solver="eigen", shrinkage=s)
        def shrink(S):
            return (1 - shrinkage) * S + shrinkage * np.trace(S) / d * np.eye(d)
        cov, between = shrink(within), shrink(total) - shrink(within)
    else:  # their LDA(solver="svd"): unbiased pooled covariance
        cov, between = within * N / (N - C), total - within
    evals, evecs = linalg.eigh(between, cov)
    W = evecs[:, np.argsort(evals)[::-1][:min(C - 1, d)]]
    Z = H @ W
    seli = _nuclear(Z - Z.mean(0))
    inverse = np.linalg.inv(cov)
    P = np.zeros((N, C))
    for i in range(N):
        logits = [-0.5 * (H[i] - means[c]) @ inverse @ (H[i] - means[c]) + math.log(priors[c]) for c in range(C)]
        top = max(logits)
        P[i] = [math.exp(v - top) for v in logits]
        P[i] /= P[i].sum()
    ncc = np.mean([P[i, np.searchsorted(classes, y[i])] for i in range(N)])
    vc = math.log(sum(_nuclear(P[y == c]) for c in classes))
    return np.array([ncc, seli, vc])


def _ncti_by_hand(models, y, pca_dim: int = 64) -> np.ndarray:
    terms = np.stack([_ncti_terms_by_hand(X, y, pca_dim) for X in models])
    span = terms.max(0) - terms.min(0)
    normalized = np.where(span > 0, (terms - terms.min(0)) / np.where(span > 0, span, 1), 0)
    return normalized[:, 0] + normalized[:, 1] - normalized[:, 2]


def _blobs(N, D, C, spread, scale, seed):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(N) % C)
    return scale * (rng.normal(size=(C, D))[y] * 1.5 + spread * rng.normal(size=(N, D))), y


@pytest.mark.parametrize("scale", [0.3, 30.0], ids=["shrunk", "unshrunk"])
@pytest.mark.parametrize("N,D,C,pca_dim", [(60, 5, 3, 64), (61, 7, 3, 5), (37, 11, 4, 64)])
def test_ncti_matches_its_equations(N, D, C, pca_dim, scale):
    """Terms and scores of three models within 1e-9 of the hand computation, on both of the
    authors' LDA fits (shrinkage above its 1e-10 floor, and at it: no shrinkage)."""
    models = [_blobs(N, D, C, spread, scale, seed=7)[0] for spread in (1.0, 0.6, 1.4)]  # same centres
    y = _blobs(N, D, C, 1.0, scale, seed=7)[1]
    scores, terms = ncti(torch.from_numpy(np.stack(models)), torch.from_numpy(y), pca_dim=pca_dim, return_terms=True)
    want_terms = np.stack([_ncti_terms_by_hand(X, y, pca_dim) for X in models])
    assert scores.dtype == terms.dtype == torch.float64 and scores.shape == (3,) and terms.shape == (3, 3)
    np.testing.assert_allclose(terms.numpy(), want_terms, rtol=1e-9)
    np.testing.assert_allclose(scores.numpy(), _ncti_by_hand(models, y, pca_dim), rtol=1e-9, atol=1e-9)


def test_ncti_on_a_list_of_widths_and_a_strided_view():
    """Models of different widths in a list, one of them a non-contiguous view: as the hand
    computation and as the same features made contiguous."""
    X1, y = _blobs(60, 5, 3, 1.0, 1.0, seed=1)
    wide, _ = _blobs(60, 18, 3, 0.8, 1.0, seed=2)
    view = torch.from_numpy(wide)[:, ::2]  # [60, 9], stride 2
    assert not view.is_contiguous()
    got = ncti([torch.from_numpy(X1), view], y)
    np.testing.assert_allclose(got.numpy(), _ncti_by_hand([X1, wide[:, ::2]], y), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, ncti([torch.from_numpy(X1), view.contiguous()], y), rtol=1e-12, atol=1e-12)


def test_ncti_reproduces_the_authors_pca_and_lda_pipeline():
    """scikit-learn's PCA and LDA(solver="eigen", shrinkage=s), as the authors' code calls them:
    the same three terms (the shrunk case; scikit-learn 1.9 changed the svd solver's scaling)."""
    PCA = peer("sklearn.decomposition").PCA
    LDA = peer("sklearn.discriminant_analysis").LinearDiscriminantAnalysis
    X, y = _blobs(61, 7, 3, 1.0, 0.3, seed=4)
    pca = PCA(n_components=5, svd_solver="full")
    H = pca.fit_transform(X)
    shrinkage = max(math.exp(-pca.explained_variance_[:32].sum()), 1e-10)
    assert shrinkage > 1e-10
    lda = LDA(solver="eigen", shrinkage=shrinkage).fit(H, y)
    Z = lda.transform(H)
    P = lda.predict_proba(H)
    want = [P[np.arange(61), y].mean(), _nuclear(Z - Z.mean(0)), math.log(sum(_nuclear(P[y == c]) for c in range(3)))]
    _, terms = ncti(torch.from_numpy(X), y, pca_dim=5, return_terms=True)
    np.testing.assert_allclose(terms.numpy(), want, rtol=1e-9)


def test_ncti_ranks_a_more_collapsed_model_higher():
    """The same class centres with less and less within-class spread: NCTI increases."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(60) % 3
    centres = torch.randn(3, 5, generator=g, dtype=torch.float64) * 3
    models = [centres[y] + spread * torch.randn(60, 5, generator=g, dtype=torch.float64)
              for spread in (2.0, 1.0, 0.5, 0.1)]
    scores = ncti(models, y)
    assert torch.all(scores[1:] > scores[:-1])
    assert float(scores[-1]) == 2.0  # best on S_ncc and S_seli, least class variability


def test_ncti_of_one_model_is_zero_with_its_terms():
    """One model: every term is its own min and max, normalized to 0 (not 0/0)."""
    X, y = _blobs(60, 5, 3, 1.0, 1.0, seed=9)
    score, terms = ncti(torch.from_numpy(X), y, return_terms=True)
    assert score.dim() == 0 and float(score) == 0.0 and terms.shape == (3,)
    np.testing.assert_allclose(terms.numpy(), _ncti_terms_by_hand(X, y), rtol=1e-9)


@pytest.mark.parametrize("call,error,message", [
    (lambda X, y: ncti(X, y, pca_dim=0), ValueError, "pca_dim: expected an int in"),
    (lambda X, y: ncti(X, y, pca_dim=2.5), TypeError, "pca_dim: expected an int"),
    (lambda X, y: ncti(X, y, return_terms="yes"), TypeError, "return_terms: expected a bool"),
    (lambda X, y: ncti(X[0], y), ValueError, "features: expected"),
    (lambda X, y: ncti(X, y[:-1]), ValueError, "labels: expected 60 labels"),
    (lambda X, y: ncti(X, np.zeros(60)), ValueError, "labels: expected at least two classes"),
    (lambda X, y: ncti(X, ["a"] * 60), TypeError, "labels: expected integer class ids"),
    (lambda X, y: ncti(X[:4], [0, 1, 2, 3]), ValueError, "labels: ncti needs more samples than classes"),
    (lambda X, y: ncti(X.fill_(float("nan")), y), ValueError, "features: expected finite"),
    (lambda X, y: ncti([X, 100 * torch.eye(3, dtype=torch.float64)[y]], y), ValueError,
     r"features\[1\]: ncti needs features that vary within the classes"),
])
def test_ncti_rejects_bad_arguments(call, error, message):
    X, y = _blobs(60, 5, 3, 1.0, 1.0, seed=0)
    with pytest.raises(error, match=message):
        call(torch.from_numpy(X), y)


# ---- ETran -----------------------------------------------------------------------------------


def _etran_by_hand(X: np.ndarray, temperature: float, fraction: float) -> float:
    """Each sample's -E(x) = T log sum_j exp(x_j / T), then the mean of the k lowest."""
    energies = []
    for row in X:
        top = max(row / temperature)
        energies.append(temperature * (top + math.log(math.fsum(math.exp(v / temperature - top) for v in row))))
    k = max(1, int(fraction * len(energies) + 1e-9))
    return math.fsum(sorted(energies)[:k]) / k


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("fraction", [0.005, 0.1, 1.0])
@pytest.mark.parametrize("N,D", [(60, 5), (201, 3), (1000, 7)])
def test_etran_matches_its_equation(N, D, temperature, fraction):
    rng = np.random.default_rng(N + D)
    X = rng.normal(size=(N, D)) * 4 + 2
    got = etran(torch.from_numpy(X), temperature=temperature, fraction=fraction)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(_etran_by_hand(X, temperature, fraction), rel=1e-12)


def test_etran_default_is_the_lowest_half_percent_at_temperature_1():
    """N = 1000: the authors' code averages the 5 lowest logsumexp(x) (5 N // 1000)."""
    X = np.random.default_rng(1).normal(size=(1000, 16))
    lse = np.log(np.exp(X).sum(1))
    assert float(etran(torch.from_numpy(X))) == pytest.approx(np.sort(lse)[:5].mean(), rel=1e-12)


def test_etran_batch_list_and_strided_view():
    rng = np.random.default_rng(2)
    big = rng.normal(size=(2, 60, 10))
    view = torch.from_numpy(big)[:, :, ::2]  # [2, 60, 5], not contiguous
    assert not view.is_contiguous()
    want = [_etran_by_hand(big[m, :, ::2], 1.0, 0.1) for m in range(2)]
    got = etran(view, fraction=0.1)
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    narrow = big[1, :, :3].astype(np.float32)  # a float32 model of another width: scored in float64
    listed = etran([view[0], torch.from_numpy(narrow)], fraction=0.1)
    np.testing.assert_allclose(listed.numpy(), [want[0], _etran_by_hand(narrow.astype(np.float64), 1.0, 0.1)],
                               rtol=1e-12)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(temperature=0.0), ValueError, "temperature: expected a positive number"),
    (dict(temperature="1"), TypeError, "temperature: expected a finite number"),
    (dict(fraction=0.0), ValueError, r"fraction: expected a number in \(0, 1\]"),
    (dict(fraction=1.5), ValueError, r"fraction: expected a number in \[0, 1\]"),
    (dict(fraction=float("nan")), ValueError, "fraction: expected a finite number"),
])
def test_etran_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        etran(torch.randn(10, 3), **kwargs)


def test_etran_rejects_bad_features():
    with pytest.raises(ValueError, match="features: expected"):
        etran(torch.randn(10))
    with pytest.raises(ValueError, match=r"features\[1\]: expected finite"):
        etran([torch.randn(10, 3), torch.full((10, 3), float("inf"))])
    with pytest.raises(TypeError, match="features: expected a torch.Tensor"):
        etran("logits")
