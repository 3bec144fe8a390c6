"""Do the transferability scores pick the extractor that transfers best? A demo on scikit-learn's
digits (1,797 8x8 images shipped inside the package: nothing is downloaded).

Eight feature extractors of clearly different quality embed the images: the pixels, pooled or
PCA-truncated pixels, pixels drowned in noise, random ReLU features, and the hidden layer of an
MLP pretrained on a *source task* (digits 0-4 only) and of the same MLP untrained. Every score
ranks them from the target training split; the truth is each extractor's linear-probe accuracy
on the held-out split. Printed: the scores, the accuracies, and each score's rank correlation
(Kendall's tau) with the accuracy; with --markdown only the Kendall taus, as the Markdown table
that docs/transferability.md quotes (a test checks that the two agree).

Everything is float64 and drawn from generators seeded with SEED, and the global RNG state is
left as it was: the same numbers on every run, whatever ran before, up to float64 rounding.

    python -m transferops.bench.demo_transferability [--json FILE] [--markdown]
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
    "etran": lambda f, y: to.etran(f),
}
# Scored over all the extractors at once: NCTI normalizes its terms across the candidates.
SET_SCORES = {"ncti": lambda fs, y: to.ncti(fs, y)}


def _mlp(hidden: int, g: torch.Generator) -> torch.nn.Sequential:
    """A float64 MLP initialized from ``g``; the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        return torch.nn.Sequential(torch.nn.Linear(64, hidden, dtype=torch.float64), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, 10, dtype=torch.float64))


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
    project = torch.randn(64, 512, generator=g, dtype=torch.float64) / 8
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
            "pixels+noise": X_all + 3.0 * torch.randn(X_all.shape, generator=g, dtype=torch.float64),
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
    X = torch.tensor(digits.data, dtype=torch.float64) / 16
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
    for score, fn in SET_SCORES.items():
        t0 = time.perf_counter()
        values = fn([F[train] for F in feats.values()], y[train]).tolist()
        for row, value in zip(rows, values):
            row[score], row[f"{score}_s"] = value, (time.perf_counter() - t0) / len(rows)
    accuracy = [r["accuracy"] for r in rows]
    tau = {score: float(kendalltau([r[score] for r in rows], accuracy).statistic) for score in {**SCORES, **SET_SCORES}}
    return {"rows": rows, "kendall_tau": tau, "n_train": int(len(train)), "n_test": int(len(test))}


def markdown_table(result: dict) -> str:
    """The Kendall taus of ``run()`` as a Markdown table, one score a row, two decimals."""
    lines = ["| score | Kendall tau vs probe accuracy |", "|---|---:|"]
    for score, tau in result["kendall_tau"].items():
        text = f"{tau:.2f}"
        lines.append(f"| `{score}` | {'0.00' if text == '-0.00' else text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the table and correlations as JSON")
    parser.add_argument("--markdown", action="store_true",
                        help="print only the Kendall taus, as a Markdown table (docs/transferability.md's)")
    args = parser.parse_args(argv)
    result = run()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        print(markdown_table(result))
        return 0
    rows = sorted(result["rows"], key=lambda r: -r["accuracy"])
    print(f"digits: {result['n_train']} target training images scored, linear probes tested on {result['n_test']}")
    names = [*SCORES, *SET_SCORES]
    header = f"{'extractor':<20} {'D':>4} {'probe acc':>9} " + " ".join(f"{s:>16}" for s in names)
    print(header)
    for r in rows:
        print(f"{r['extractor']:<20} {r['D']:>4} {r['accuracy']:>9.3f} " + " ".join(f"{r[s]:>16.4g}" for s in names))
    print(f"{'Kendall tau vs acc':<36}" + " ".join(f"{result['kendall_tau'][s]:>16.2f}" for s in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
