"""``transferops rank``: the table of scores from feature files, and a user's mistake in a file
as one ``error:`` line that names the file, exit status 2, never a traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from transferops.cli import main

N = 50


def _files(tmp_path, features=None, labels=None) -> tuple[str, str]:
    """f.npy (N x 8 features) and y.npy (3 classes), or the arrays given."""
    rng = np.random.default_rng(0)
    f, y = tmp_path / "f.npy", tmp_path / "y.npy"
    np.save(f, rng.standard_normal((N, 8)) if features is None else features)
    np.save(y, np.arange(N) % 3 if labels is None else labels)
    return str(f), str(y)


def _error(capsys, argv) -> str:
    """The error line of ``transferops rank argv``, after checking that it is the only output
    on stderr, that nothing was printed on stdout (the check ran before any scoring) and that
    the status is 2."""
    assert main(["rank", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("transferops rank: error: "), err
    return err.strip()


def test_cli_ranks_models_by_quality(tmp_path, capsys):
    """Three extractors of decreasing quality (class signal drowned in more noise) in three file
    formats: every score ranks them in that order; the JSON holds the same table."""
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, 5, (400,), generator=g)
    signal = torch.nn.functional.one_hot(y, 5).float() @ torch.randn(5, 32, generator=g)
    paths = []
    for i, (noise, fmt) in enumerate([(0.3, "npy"), (1.5, "pt"), (6.0, "npz")]):
        f = (signal + noise * torch.randn(400, 32, generator=g)).numpy()
        p = tmp_path / f"m{i}.{fmt}"
        if fmt == "npy":
            np.save(p, f)
        elif fmt == "pt":
            torch.save({"features": torch.from_numpy(f)}, p)
        else:
            np.savez(p, features=f)
        paths.append(str(p))
    np.save(tmp_path / "y.npy", y.numpy())
    out = tmp_path / "rank.json"
    assert main(["rank", "--labels", str(tmp_path / "y.npy"), *reversed(paths), "--json", str(out),
                 "--csv", str(tmp_path / "rank.csv")]) == 0
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["m0.npy", "m1.pt", "m2.npz"]
    for score in ("logme", "hscore", "hscore_shrinkage", "gbc", "transrate", "sfda"):
        assert rows[0][score] > rows[1][score] > rows[2][score], score
    assert rows[0]["tmi"] < rows[1]["tmi"] < rows[2]["tmi"]  # it rewards within-class spread, noise included
    assert "m0.npy" in capsys.readouterr().out
    assert (tmp_path / "rank.csv").read_text().splitlines()[1].startswith("m0.npy,400,32,")
    np.save(tmp_path / "short.npy", y.numpy()[:10])
    err = _error(capsys, ["--labels", str(tmp_path / "short.npy"), paths[0]])
    assert f"{paths[0]}: features: 400 rows, but {tmp_path / 'short.npy'} holds 10 labels" in err


def test_cli_takes_integer_bool_and_column_inputs(tmp_path, capsys):
    """Integer or bool features count as numbers, labels [N, 1] as [N], labels as whole floats."""
    rng = np.random.default_rng(1)
    f, y = _files(tmp_path, features=rng.integers(0, 5, (N, 6)), labels=(np.arange(N) % 3.0)[:, None])
    np.save(tmp_path / "b.npy", rng.standard_normal((N, 6)) > 0)
    assert main(["rank", "--labels", y, f, str(tmp_path / "b.npy"), "--scores", "logme", "gbc"]) == 0
    assert "f.npy" in capsys.readouterr().out


def _with(a: np.ndarray, entries: dict) -> np.ndarray:
    for index, value in entries.items():
        a[index] = value
    return a


def _case(name, *, features=None, labels=None, write=None, argv=(), names=("f",), want):
    return pytest.param(features, labels, write, list(argv), names, want, id=name)


@pytest.mark.parametrize("features, labels, write, argv, names, want", [
    # 1. labels that are not numbers
    _case("string-labels", labels=np.array(["cat", "dog"] * (N // 2)), names=("y",),
          want="y.npy: labels: expected integer class ids (or real targets), got strings (dtype <U3): map the "
               "classes to integers 0..C-1 first"),
    _case("object-labels", labels=np.array(["cat", "dog"] * (N // 2), dtype=object), names=("y",),
          want="y.npy: cannot read as .npy: an array of Python objects (dtype object), which is not loaded"),
    _case("fractional-labels", labels=np.arange(N) % 3 + 0.5, names=("y",),
          want="y.npy: labels: expected integer class ids, got 0.5 at index 0"),
    _case("one-class", labels=np.zeros(N, dtype=int), names=("y",),
          want="y.npy: labels: expected at least two classes, got only class 0"),
    _case("labels-2d", labels=(np.arange(2 * N) % 3).reshape(N, 2), names=("y",),
          want="y.npy: labels: expected class ids [N], got shape (50, 2) (real targets [N, K] need --regression)"),
    _case("labels-3d-regression", labels=np.zeros((N, 1, 1)), argv=["--regression"], names=("y",),
          want="y.npy: labels: expected regression targets [N] or [N, K], got shape (50, 1, 1)"),
    _case("labels-for-tmi", labels=np.arange(N) % 25, argv=["--scores", "tmi"], names=("y",),
          want="y.npy: tmi: labels: tmi needs a class with more than k = 3 samples, the largest has 2"),
    # 2. a missing labels file
    _case("missing-labels", write="rm-labels", names=("y",), want="y.npy: labels: no such file"),
    _case("missing-features", write="rm-features", want="f.npy: features: no such file"),
    # 3. N mismatch (both files named), NaN
    _case("n-mismatch", features=np.zeros((40, 8)), names=("f", "y"),
          want="f.npy: features: 40 rows, but {y} holds 50 labels (expected one per row)"),
    _case("nan", features=_with(np.arange(N * 8.0).reshape(N, 8), {(3, 2): np.nan, (7, 5): np.inf}),
          want="f.npy: features: expected finite values, found NaN or Inf in 2 entries (the first at row 3, "
               "column 2)"),
    _case("huge", features=np.full((N, 8), 1e100), want="f.npy: features: values too large (largest magnitude 1e+100"),
    # 4. not [N, D]
    _case("3d-features", features=np.zeros((N, 4, 2)),
          want="f.npy: features: expected [N, D] (one model per file), got shape (50, 4, 2)"),
    _case("complex-features", write="complex-pt",
          want="f.pt: features: expected real numbers, got torch.complex64"),
    _case("not-tensors", write="garbage-pt",
          want="f.pt: cannot read as .pt: expected tensors saved by torch.save (pickled Python objects are not "
               "loaded)"),
    # 5. an output that cannot be written: refused before any scoring
    _case("json-folder-missing", argv=["--json", "{tmp}/nowhere/r.json"], names=(),
          want="{tmp}/nowhere/r.json: --json: cannot write: folder '{tmp}/nowhere' does not exist"),
    _case("csv-folder-missing", argv=["--csv", "{tmp}/nowhere/r.csv"], names=(),
          want="{tmp}/nowhere/r.csv: --csv: cannot write: folder '{tmp}/nowhere' does not exist"),
    _case("json-is-a-folder", argv=["--json", "{tmp}"], names=(),
          want="{tmp}: --json: cannot write: it is a folder; expected a file name"),
])
def test_a_mistake_in_a_file_is_one_error_line_naming_it(tmp_path, capsys, features, labels, write, argv, names, want):
    f, y = _files(tmp_path, features, labels)
    if write == "rm-labels":
        (tmp_path / "y.npy").unlink()
    elif write == "rm-features":
        (tmp_path / "f.npy").unlink()
    elif write == "complex-pt":
        f = str(tmp_path / "f.pt")
        torch.save(torch.randn(N, 8, dtype=torch.complex64), f)
    elif write == "garbage-pt":
        f = str(tmp_path / "f.pt")
        (tmp_path / "f.pt").write_bytes(b"not a pickle")
    argv = [a.format(tmp=tmp_path) for a in argv]
    err = _error(capsys, ["--labels", y, f, *argv])
    want = want.format(tmp=tmp_path, y=y)
    # The file is named as given on the command line (here a full path).
    first = {"f": f, "y": y}[names[0]] if names else str(tmp_path)
    assert err.startswith(f"transferops rank: error: {first}"), err
    assert want in err, err
    for name in names:
        assert {"f": f, "y": y}[name] in err, err


def test_the_installed_command_prints_one_line(tmp_path):
    """The real entry point (python -m transferops.cli): string labels are one error line, 2."""
    f, y = _files(tmp_path, labels=np.array(["cat", "dog"] * (N // 2)))
    res = subprocess.run([sys.executable, "-m", "transferops.cli", "rank", "--labels", y, f],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    assert res.stderr == (f"transferops rank: error: {y}: labels: expected integer class ids (or real targets), "
                          "got strings (dtype <U3): map the classes to integers 0..C-1 first\n")


def test_rank_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["rank", "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Rank candidate pretrained models for a labeled target task" in text
    assert "Higher is better for every score." in text
    assert "all but logme need class ids" in text and "--regression (the only score that takes them)" in text
    assert "the paper first reduces them to 64 dimensions with PCA, which this command does not do; pass " \
           "reduced features for that" in text
    for score in ("logme", "hscore", "hscore_shrinkage", "gbc", "transrate", "sfda", "tmi"):
        assert f" {score} " in text, score


def test_every_listed_score_runs_on_feature_files(tmp_path, capsys):
    """--scores accepts what --models streams too: gbc_log, etran and ncti (normalized over
    the files given) on feature files equal the library's functions; the streamed names are
    spelt out in the CLI (its --help imports no torch) and must match the library's."""
    import json

    import transferops as to
    from transferops.cli_rank import MODEL_SCORES
    from transferops.transferability_stats import STREAMED

    assert set(MODEL_SCORES) == set(STREAMED)
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (120,), generator=g)
    feats = [torch.randn(120, 6, generator=g, dtype=torch.float64) + s * y[:, None] for s in (0.2, 1.0)]
    paths = []
    for i, f in enumerate(feats):
        np.save(tmp_path / f"f{i}.npy", f.numpy())
        paths.append(str(tmp_path / f"f{i}.npy"))
    np.save(tmp_path / "y.npy", y.numpy())
    out = tmp_path / "r.json"
    assert main(["rank", *paths, "--labels", str(tmp_path / "y.npy"), "--scores", "ncti", "gbc_log", "etran",
                 "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())}
    want = to.ncti(feats, y)
    for i, f in enumerate(feats):
        r = rows[f"f{i}.npy"]
        assert r["ncti"] == pytest.approx(float(want[i]), abs=1e-12)
        assert r["gbc_log"] == pytest.approx(float(to.gbc(f, y, log=True)), rel=1e-12)
        assert r["etran"] == pytest.approx(float(to.etran(f)), rel=1e-12)


def test_outputs_replace_a_symlink_instead_of_following_it(tmp_path):
    """--json and --csv are written to a temporary file created exclusively beside the path,
    then renamed over it: a symlink planted at the path is replaced, its target untouched, and
    no temporary file is left."""
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (60,), generator=g)
    np.save(tmp_path / "f.npy", (torch.randn(60, 5, generator=g) + y[:, None]).numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.json").symlink_to(outside)
    (out / "r.csv").symlink_to(outside)
    assert main(["rank", str(tmp_path / "f.npy"), "--labels", str(tmp_path / "y.npy"), "--scores", "logme",
                 "--json", str(out / "r.json"), "--csv", str(out / "r.csv")]) == 0
    assert outside.read_text() == "keep me"
    assert not (out / "r.json").is_symlink() and json.loads((out / "r.json").read_text())[0]["model"] == "f.npy"
    assert not (out / "r.csv").is_symlink() and (out / "r.csv").read_text().startswith("model,")
    assert sorted(p.name for p in out.iterdir()) == ["r.csv", "r.json"]
