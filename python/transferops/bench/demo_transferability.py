"""Do the transferability scores pick the extractor that transfers best? A demo on scikit-learn's
digits (1,797 8x8 images shipped inside the package: nothing is downloaded).

Eight feature extractors of clearly different quality embed the images: the pixels, pooled or
PCA-truncated pixels, pixels drowned in noise, random ReLU features, and the hidden layer of an
MLP pretrained on a *source task* (digits 0-4 only) and of the same MLP untrained. Every score
ranks them from the target training split; the truth is each extractor's linear-probe accuracy
on the held-out split. Printed: the scores, the accuracies, and each score's rank correlation
(Kendall's tau) with the accuracy.

    python -m transferops.bench.demo_transferability [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import transferops as to

SEED = 0
SCORES = {
    "logme": lambda f, y: to.logme(f, y),
    "hscore": lambda f, y: to.hscore(f, y),
    "hscore_shrinkage": lambda f, y: to.hscore(f, y, shrinkage=True),
    "gbc": lambda f, y: to.gbc(f, y),
    "transrate": lambda f, y: to.transrate(f, y),
    "sfda": lambda f, y: to.sfda(f, y),
    "tmi": lambda f, y: to.tmi(f, y),
}


def _mlp(hidden: int, g: torch.Generator) -> torch.nn.Sequential:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def _pretrained(X: torch.Tensor, y: torch.Tensor, g: torch.Generator, steps: int = 300) -> torch.nn.Sequential:
    """An MLP trained on the source task: the classes 0-4 of the given images."""
    net = _mlp(128, g)
    source = y < 5
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[source]), y[source]).backward()
        opt.step()
    return net


def extractors(X_all: torch.Tensor, X_source: torch.Tensor, y_source: torch.Tensor) -> dict:
    """name -> features of ``X_all``: fixed functions of the pixels, or networks fit on the
    source split only (never on the target labels)."""
    g = torch.Generator().manual_seed(SEED)
    mean = X_source.mean(0)
    _, _, V = torch.linalg.svd(X_source - mean, full_matrices=False)
    project = torch.randn(64, 512, generator=g) / 8
    pretrained, untrained = _pretrained(X_source, y_source, g), _mlp(128, g)
    with torch.no_grad():
        return {
            "pixels": X_all,
            "mlp-pretrained-0to4": torch.relu(pretrained[0](X_all)),
            "random-relu-512": torch.relu((X_all - mean) @ project),
            "mlp-untrained": torch.relu(untrained[0](X_all)),
            "pooled-4x4": torch.nn.functional.avg_pool2d(X_all.view(-1, 1, 8, 8), 2).flatten(1),
            "pca-4": (X_all - mean) @ V[:4].T,
            "pca-2": (X_all - mean) @ V[:2].T,
            "pixels+noise": X_all + 3.0 * torch.randn(X_all.shape, generator=g),
        }


def linear_probe_accuracy(train: torch.Tensor, y_train: np.ndarray, test: torch.Tensor, y_test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train.numpy())
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train.numpy()), y_train)
    return float(probe.score(scaler.transform(test.numpy()), y_test))


def run() -> dict:
    from scipy.stats import kendalltau
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    index = np.arange(len(y))
    train, test = train_test_split(index, test_size=0.5, random_state=SEED, stratify=digits.target)
    # The "pretrained" extractor learns on a source split disjoint from the target train/test data.
    source, train = train[: len(train) // 3], train[len(train) // 3:]
    feats = extractors(X, X[source], y[source])
    rows = []
    for name, F in feats.items():
        row = {"extractor": name, "D": int(F.shape[1]),
               "accuracy": linear_probe_accuracy(F[train], digits.target[train], F[test], digits.target[test])}
        for score, fn in SCORES.items():
            t0 = time.perf_counter()
            row[score] = float(fn(F[train], y[train]))
            row[f"{score}_s"] = time.perf_counter() - t0
        rows.append(row)
    accuracy = [r["accuracy"] for r in rows]
    tau = {score: float(kendalltau([r[score] for r in rows], accuracy).statistic) for score in SCORES}
    return {"rows": rows, "kendall_tau": tau, "n_train": int(len(train)), "n_test": int(len(test))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the table and correlations as JSON")
    args = parser.parse_args(argv)
    result = run()
    rows = sorted(result["rows"], key=lambda r: -r["accuracy"])
    print(f"digits: {result['n_train']} target training images scored, linear probes tested on {result['n_test']}")
    header = f"{'extractor':<20} {'D':>4} {'probe acc':>9} " + " ".join(f"{s:>16}" for s in SCORES)
    print(header)
    for r in rows:
        print(f"{r['extractor']:<20} {r['D']:>4} {r['accuracy']:>9.3f} " + " ".join(f"{r[s]:>16.4g}" for s in SCORES))
    print(f"{'Kendall tau vs acc':<36}" + " ".join(f"{result['kendall_tau'][s]:>16.2f}" for s in SCORES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
