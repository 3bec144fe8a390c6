"""Transferability scores from statistics accumulated over chunks of samples: what
:func:`transferops.rank_models` feeds every layer of every model into, so that no [N, D]
feature array is ever held. Memory per feature set: O(D^2 + C D) (TransRate: O(C D^2)).

Every statistic is a float64 sum over samples of x - x0, x0 the mean of the first chunk: the
centered moments the H-scores, GBC and TransRate need then lose no digits to a large common
mean (transformer features often have one), and LogME's raw Gram matrix and class sums are
recovered from them exactly (F^T F = G0 + x0 s^T + s x0^T + n x0 x0^T with s = sum(x - x0)).

Each score equals the batch function of :mod:`transferops.transferability` (or
:mod:`transferops.transferability_collapse`) on the stacked features up to float64 rounding;
tests/test_rank_models.py checks it to 1e-10.
"""
from __future__ import annotations

import torch

from . import transferability as tr

# Scores computed from the statistics, and what each needs beyond counts and class sums.
STREAMED = {"logme": {"gram"}, "hscore": {"gram"}, "hscore_shrinkage": {"gram", "fourth"}, "gbc": {"class_sq"},
            "gbc_log": {"class_sq"}, "transrate": {"class_gram"}, "etran": {"energy"}, "ncti": {"gram"}}
# Scores that need a second pass over the samples, given the first pass's statistics.
SECOND_PASS = {"ncti"}
# Scores that need every sample's features, or the model's predictions: not from statistics.
NOT_STREAMED = {"sfda": "its second fit needs every sample again (ConfMix)",
                "tmi": "its nearest-neighbour entropy needs every sample",
                "leep": "it takes source-class probabilities, not features",
                "nce": "it takes source-model labels, not features",
                "otce": "it couples two datasets by optimal transport"}


def check_scores(scores) -> tuple[str, ...]:
    """The score names, checked: each one :data:`STREAMED` can compute."""
    if isinstance(scores, str):
        scores = (scores,)
    scores = tuple(scores)
    if not scores:
        raise ValueError("scores: expected at least one score name")
    for name in scores:
        if name in NOT_STREAMED:
            raise ValueError(f"scores: {name} cannot be computed in one streaming pass: {NOT_STREAMED[name]}; "
                             "score stored features with transferops.transferability instead")
        if name not in STREAMED:
            raise ValueError(f"scores: expected names among {sorted(STREAMED)}, got {name!r}")
    if len(set(scores)) != len(scores):
        raise ValueError(f"scores: {list(scores)} names a score twice")
    return scores


class FeatureStats:
    """The statistics of one feature set (one layer of one model) over the samples seen so far,
    with their class indices 0..C-1 (C fixed up front: the labels are known before the pass).
    ``needs``: the statistics beyond n, counts and class sums (see :data:`STREAMED`)."""

    def __init__(self, dim: int, classes: int, needs: set, device, *, lowest: int = 1):
        f64 = dict(dtype=torch.float64, device=device)
        self.n, self.dim = 0, dim
        self.shift = None  # x0 [D]
        self.dtype = None  # the features' own
        self.counts = torch.zeros(classes, **f64)
        self.class_sums = torch.zeros(classes, dim, **f64)  # sum over the class of x - x0
        self.gram = torch.zeros(dim, dim, **f64) if needs & {"gram", "fourth"} else None
        self.class_sq = torch.zeros(classes, dim, **f64) if "class_sq" in needs else None
        self.class_gram = torch.zeros(classes, dim, dim, **f64) if "class_gram" in needs else None
        # Ledoit-Wolf needs sum_i |x_i - mu|^4: from sum |z|^4, sum |z|^2 z and the Gram (z = x - x0).
        self.fourth = torch.zeros((), **f64) if "fourth" in needs else None
        self.sq_weighted = torch.zeros(dim, **f64) if "fourth" in needs else None
        # ETran averages the ``lowest`` samples' energies: the smallest so far, at most that many.
        self.energy = torch.zeros(0, **f64) if "energy" in needs else None
        self.lowest = lowest

    def update(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Add rows ``x`` [b, D] (any float dtype) with class indices ``y`` [b] (int64);
        ``dtype``: the precision the features were computed in, if not x's own."""
        if self.shift is None:
            self.dtype = dtype or x.dtype
            self.shift = x.to(torch.float64).mean(0)
        x = x.to(torch.float64)
        if self.energy is not None:  # of the raw features, which the energy score takes as logits
            both = torch.cat([self.energy, torch.logsumexp(x, dim=1)])
            self.energy = both.topk(min(self.lowest, both.numel()), largest=False).values
        z = x - self.shift
        self.n += x.shape[0]
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.class_sums.index_add_(0, y, z)
        if self.gram is not None:
            self.gram.addmm_(z.T, z)
        if self.class_sq is not None:
            self.class_sq.index_add_(0, y, z * z)
        if self.class_gram is not None:
            for c in map(int, torch.unique(y)):  # the classes in this chunk, one scalar read each
                zc = z[y == c]
                self.class_gram[c].addmm_(zc.T, zc)
        if self.fourth is not None:
            sq = (z * z).sum(1)
            self.fourth += (sq * sq).sum()
            self.sq_weighted += sq @ z

    # ---- across processes -----------------------------------------------------------------------

    def sums(self) -> list[torch.Tensor]:
        """The statistics that are sums over samples (relative to :attr:`shift`), in a fixed
        order: those of two sets of samples with the same shift add up to those of their union."""
        return [t for t in (self.counts, self.class_sums, self.gram, self.class_sq, self.class_gram, self.fourth,
                            self.sq_weighted) if t is not None]

    def move_shift(self, x0: torch.Tensor) -> None:
        """Re-express every sum relative to ``x0`` [D] instead of :attr:`shift` (in place), so that
        statistics of other processes, moved to the same x0, can be added. With d = x0' - x0 (the
        old shift less the new) each sample's x - x0 = z + d, and each sum expands exactly in the
        old ones: sum (z + d)(z + d)^T = G + s d^T + d s^T + n d d^T, and so on. Statistics of no
        sample (all zero) just take the new shift."""
        x0 = x0.to(dtype=torch.float64, device=self.counts.device)
        if self.shift is None or self.n == 0:
            self.shift = x0
            return
        d = self.shift - x0
        dd = float(d @ d)
        s = self.class_sums.sum(0)
        if self.fourth is not None:  # before the Gram matrix and z's sums move
            trace, gd, sd = float(torch.trace(self.gram)), self.gram @ d, float(s @ d)
            # |z + d|^2 = |z|^2 + 2 z.d + |d|^2, squared and summed term by term
            self.fourth += (4 * float(d @ gd) + self.n * dd * dd + 4 * float(self.sq_weighted @ d) + 2 * dd * trace
                            + 4 * dd * sd)
            self.sq_weighted += trace * d + 2 * gd + 2 * sd * d + dd * s + self.n * dd * d
        if self.gram is not None:
            self.gram += torch.outer(s, d) + torch.outer(d, s) + self.n * torch.outer(d, d)
        if self.class_sq is not None:
            self.class_sq += 2 * d * self.class_sums + self.counts[:, None] * (d * d)
        if self.class_gram is not None:
            sd_c = self.class_sums[:, :, None] * d
            self.class_gram += sd_c + sd_c.mT + self.counts[:, None, None] * torch.outer(d, d)
        self.class_sums += self.counts[:, None] * d
        self.shift = x0

    # ---- derived moments ----------------------------------------------------------------------

    def _present(self) -> torch.Tensor:
        return self.counts > 0

    def centered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu - x0 [D], the centered scatter sum_i (x_i - mu)(x_i - mu)^T [D, D])."""
        s = self.class_sums.sum(0)
        m = s / self.n
        return m, self.gram - torch.outer(s, m)

    def class_moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts, class means, class sums of x - x0) of the classes that occur, in id order."""
        keep = self._present()
        counts, sums = self.counts[keep], self.class_sums[keep]
        return counts, sums / counts[:, None] + self.shift, sums

    def noise(self) -> float:
        """The variance the features' rounding alone gives a direction (see
        transferops.transferability._noise_variance): from their mean square entry, tr(F^T F) / (N D)."""
        s = self.class_sums.sum(0)
        trace = float(torch.trace(self.gram)) + 2 * float(self.shift @ s) + self.n * float(self.shift @ self.shift)
        return tr._noise_variance(self.dtype, trace / (self.n * self.dim))

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LogME's F^T F [D, D] and F^T Y [D, C] of the raw features (float64, on the statistics'
        device)."""
        s = self.class_sums.sum(0)
        x0 = self.shift
        G = self.gram + torch.outer(x0, s) + torch.outer(s, x0) + self.n * torch.outer(x0, x0)
        B = self.class_sums[self._present()] + self.counts[self._present()][:, None] * x0
        return G, B.T


# ---- the scores -----------------------------------------------------------------------------------


def _logme(st: FeatureStats, compat: str, backend: str) -> float:
    """LogME from the Gram matrix, as :class:`~transferops.transferability.LogMEStream`
    finishes, on the backend logme() would choose for the statistics' device; a forced native
    backend takes the D x D statistics to the CPU (deliberately: it asked for the CPU solver)."""
    from ._backend import forced_backend
    from ._logme import logme_from_grams, logme_op

    G, B = st.raw()
    counts = st.counts[st._present()]
    if forced_backend(backend) == "native":
        G, B, counts = G.cpu(), B.cpu(), counts.cpu()
    chosen, _ = logme_op.select(backend, G.device, torch.float64, name="logme")
    N, D = st.n, st.dim
    if compat == "official" and N <= D:
        raise ValueError(f"compat='official' streams only when N > D (N = {N}, D = {D}); use compat='corrected'")
    scores, _ = logme_from_grams(chosen, [G], [B], counts, N, compat, False)
    return float(scores[0])


def _between(st: FeatureStats) -> torch.Tensor:
    """sum_c n_c (mu_c - mu)(mu_c - mu)^T [D, D]."""
    counts, means, _ = st.class_moments()
    d = means - (st.class_sums.sum(0) / st.n + st.shift)
    return (d * counts[:, None]).T @ d


def _hscore(st: FeatureStats, shrinkage: bool) -> float:
    N = st.n
    mu, scatter = st.centered()
    cov_g = _between(st) / (N - 1)
    if not shrinkage:
        return float(tr._hscore_trace(scatter / (N - 1), cov_g, N, st.noise()))
    # sum_i |x_i - mu|^4 with z = x - x0 and d = mu - x0: |z - d|^2 = |z|^2 - 2 z.d + |d|^2.
    dd = float(mu @ mu)
    S = st.class_sums.sum(0)
    zd2 = float(mu @ (st.gram @ mu))  # sum (z.d)^2
    z2 = float(torch.trace(st.gram))  # sum |z|^2
    fourth = (float(st.fourth) - 4 * float(st.sq_weighted @ mu) + 4 * zd2 + 2 * dd * z2 - 4 * dd * float(S @ mu)
              + N * dd * dd)
    cov_f, a = tr._ledoit_wolf_from(scatter / N, fourth, N)
    return float(tr._hscore_trace(cov_f, (1 - a) * cov_g, N, st.noise()))


def _gbc(st: FeatureStats, log: bool) -> float:
    keep = st._present()
    counts, means, sums = st.class_moments()
    var = st.class_sq[keep] / counts[:, None] - (sums / counts[:, None]) ** 2
    return float(tr._gbc_from_moments(means, var, "diagonal", log))


def _transrate(st: FeatureStats, eps: float = 1e-4) -> float:
    keep = st._present()
    mu, scatter = st.centered()
    counts, _, sums = st.class_moments()
    rates = []
    for n_c, s_c, G_c in zip(counts, sums, st.class_gram[keep]):
        # rows of the class centered by the global mean: sum (z - d)(z - d)^T
        Z = G_c - torch.outer(s_c, mu) - torch.outer(mu, s_c) + n_c * torch.outer(mu, mu)
        rates.append(tr._rate_of_scatter(Z, n_c, eps))
    return float(tr._rate_of_scatter(scatter, st.n, eps) - sum(rates) / len(rates))


class Posteriors:
    """NCTI's second pass over one feature set: the LDA fit from the first pass's statistics
    (:func:`transferops.transferability_collapse._ncti_fit`), then per sample its posteriors p,
    summed into S_ncc's sum_i p_i[y_i] and, per class c, the R factor of the stacked posteriors
    P_c [n_c, C] (a QR update per chunk: R_c^T R_c = P_c^T P_c, and R_c has P_c's singular
    values to rounding, which a Gram matrix's square roots would not keep below 1e-8)."""

    def __init__(self, st: FeatureStats, what: str, pca_dim: int = 64):
        from .transferability_collapse import _ncti_fit

        keep = st._present()
        mu, scatter = st.centered()
        self.shift = st.shift + mu
        self.weights, self.intercept, self.seli = _ncti_fit(st.counts[keep], st.class_sums[keep], scatter, pca_dim,
                                                            what, st.noise())
        C = int(keep.sum())
        self.ncc = torch.zeros((), dtype=torch.float64, device=scatter.device)
        self.R = [torch.zeros(0, C, dtype=torch.float64, device=scatter.device) for _ in range(C)]
        self.n = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        P = torch.softmax((x.to(torch.float64) - self.shift) @ self.weights + self.intercept, dim=1)
        self.ncc += P[torch.arange(P.shape[0], device=P.device), y].sum()
        self.n += P.shape[0]
        for c in map(int, torch.unique(y)):
            self.R[c] = torch.linalg.qr(torch.cat([self.R[c], P[y == c]]), mode="r").R

    def terms(self) -> torch.Tensor:
        """(S_ncc, S_seli, S_vc) as :func:`transferops.transferability_collapse.ncti` has them."""
        nuclear = sum(torch.linalg.svdvals(R).sum() for R in self.R)
        return torch.stack([self.ncc / self.n, self.seli, torch.log(nuclear)])


def check_backend(scores, backend: str) -> None:
    """Raise before any pass if a score cannot run on ``backend``. LogME runs where the
    statistics are, on the models' devices that only the pass shows: here a forced backend is
    checked for what does not depend on them (native, which takes the Gram matrix to the CPU,
    and a backend logme lacks); triton's device is checked when the score is taken."""
    from ._backend import forced_backend
    from ._logme import logme_op

    forced = forced_backend(backend)
    for name in scores:
        if name != "logme":
            tr.torch_backend(backend, name)
        elif forced is not None and (forced == "native" or forced not in logme_op.impls):
            logme_op.select(backend, torch.device("cpu"), torch.float64, name="logme")


def score(st: FeatureStats, name: str, *, compat: str = "corrected", backend: str = "auto") -> float:
    """Score ``name`` (one of :data:`STREAMED`) of the feature set behind ``st``."""
    if st.n < 2 or int(st._present().sum()) < 2:
        raise ValueError(f"labels: expected at least 2 samples of at least two classes, got {st.n} samples")
    if name == "logme":
        return _logme(st, compat, backend)
    tr.torch_backend(backend, name)
    if name in ("hscore", "hscore_shrinkage"):
        return _hscore(st, name == "hscore_shrinkage")
    if name in ("gbc", "gbc_log"):
        return _gbc(st, name == "gbc_log")
    if name == "transrate":
        return _transrate(st)
    if name == "etran":
        return float(st.energy.mean())
    if name == "ncti":
        raise ValueError("ncti: normalized across the candidates, from each one's Posteriors(st).terms()")
    raise ValueError(f"scores: expected names among {sorted(STREAMED)}, got {name!r}")


def needs(scores) -> set:
    """The statistics the named scores need together."""
    return set().union(*(STREAMED[s] for s in scores))
