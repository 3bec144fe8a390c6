"""Writes logme_rank_deficient.npz: N > D feature sets of rank below D (dead ReLU units,
duplicated, zero and constant columns, a low-rank product) and a full-rank one, with the scores
the official LogME code gives them. Run with the official code importable (thuml/LogME, commit
56551ca; it needs numba):

    python tests/golden/make_logme_rank_deficient.py /path/to/thuml/LogME

Data only: the official code is imported from its own checkout, not copied here.
"""
import sys
from pathlib import Path

import numpy as np


def cases() -> dict:
    rng = np.random.default_rng(20261206)
    out = {}
    N, D, C = 400, 40, 6
    y = rng.integers(0, C, N)
    F = rng.standard_normal((C, D))[y] + rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) / 4
    out["fullrank"] = (F, y)
    N, Din, H, C = 500, 24, 64, 5  # a random ReLU layer with 14 units that never fire
    y = rng.integers(0, C, N)
    X = rng.standard_normal((C, Din))[y] + rng.standard_normal((N, Din))
    W, b = rng.standard_normal((Din, H)) / np.sqrt(Din), rng.standard_normal(H) * 0.3
    b[:14] = -50.0
    out["deadrelu"] = (np.maximum(X @ W + b, 0), y)
    N, D, C = 360, 36, 4
    y = rng.integers(0, C, N)
    F = rng.standard_normal((C, D))[y] + rng.standard_normal((N, D))
    out["duplicated"] = (np.concatenate([F, F[:, :9], 2 * F[:, 3:5]], axis=1), y)
    N, D, C = 300, 30, 5
    y = rng.integers(0, C, N)
    F = rng.standard_normal((C, D))[y] + rng.standard_normal((N, D))
    F[:, [2, 7, 19]] = 0.0
    F[:, 11] = 1.5
    out["zerocols"] = (F, y)
    N, D, r, C = 320, 48, 20, 4
    y = rng.integers(0, C, N)
    out["lowrank"] = ((rng.standard_normal((C, r))[y] + rng.standard_normal((N, r))) @ rng.standard_normal((r, D)), y)
    return {name: (F.astype(np.float32), y.astype(np.int64)) for name, (F, y) in out.items()}


def main(official: str) -> None:
    sys.path.insert(0, official)
    from LogME import LogME
    from sklearn.datasets import load_digits

    arrays = {}
    digits = load_digits()  # recomputed by the test from scikit-learn: only the outputs are stored
    for name, (F, y) in list(cases().items()) + [("digits", (digits.data, digits.target))]:
        model = LogME()
        arrays[f"{name}/logme_cls"] = np.float64(model.fit(F, y))
        arrays[f"{name}/alphas"] = np.ravel(model.alphas).astype(np.float64)
        arrays[f"{name}/betas"] = np.ravel(model.betas).astype(np.float64)
        if name != "digits":
            arrays[f"{name}/features"], arrays[f"{name}/labels"] = F, y
            targets = np.stack([F[:, :3].sum(1) + 0.1 * np.arange(len(y)) % 7, y * 1.0], axis=1)
            model = LogME(regression=True)
            arrays[f"{name}/logme_reg"] = np.float64(model.fit(F, targets))
            arrays[f"{name}/reg_targets"] = targets
        print(name, F.shape, float(arrays[f"{name}/logme_cls"]))
    np.savez_compressed(Path(__file__).with_name("logme_rank_deficient.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
