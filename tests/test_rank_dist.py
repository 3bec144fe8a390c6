"""Ranking across processes: LogMEStream and rank_models with group= (each rank feeds its own
shard of the samples, an empty one included) equal the one-process scores to 1e-10 relative,
the same on every rank; ``transferops rank`` under torchrun splits the candidates over the
ranks, writes one JSON equal to the one-process run, and fails on every rank, naming the rank,
when one rank's file is bad."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transferops import _dist
from transferops.transferability import LogMEStream
from transferops.transferability_models import rank_models
from transferops.transferability_stats import STREAMED
from _ranks import run_ranks
from test_rank_models import folders  # noqa: F401 (the fixture: small transformers folders)

N = 97
WIDTHS = (5, 12, 30)  # official LogME streams only N > D: 37 rows > 30
CHUNK = 16
# Row ranges per rank: an empty shard (rank 1 of the first), odd sizes, a class (id 1000)
# that only the last rows hold.
SHARDS = {2: [[(0, 37), (37, 37)], [(0, 60), (60, 97)]], 3: [[(0, 41), (41, 41), (41, 97)]]}


def _samples():
    """Features of three models [N, D_m], class ids (odd ones, one only in rows 60..96),
    regression targets [N, 2], and inputs [N, 24] for rank_models' modules."""
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([-3, 7, 42, 1000])
    y = torch.cat([ids[torch.arange(60) % 3], ids[torch.arange(37) % 4]])
    signal = torch.nn.functional.one_hot(torch.bucketize(y, ids), 4).double() @ torch.randn(4, 40, generator=g,
                                                                                            dtype=torch.float64)
    feats = [(signal[:, :D] + torch.randn(N, D, generator=g, dtype=torch.float64) + 3.0) for D in WIDTHS]
    targets = torch.randn(N, 2, generator=g, dtype=torch.float64) + feats[0][:, :2]
    inputs = signal[:, :24] + torch.randn(N, 24, generator=g, dtype=torch.float64) + 2.0
    return feats, y, targets, inputs


class _Net(torch.nn.Module):
    """One output per layer: tanh of a linear map of the one before, float64."""

    def __init__(self, widths, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        dims = (24, *widths)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, dtype=torch.float64) for a, b in zip(dims, dims[1:]))

    def forward(self, x):
        outs = []
        for layer in self.layers:
            x = torch.tanh(layer(x))
            outs.append(x)
        return outs


def _models():
    # Widths that do not grow: features of full rank, whose H-scores are well conditioned.
    return {"a": _Net((10, 6), 0), "b": _Net((20,), 1), "c": _Net((16, 9, 4), 2)}


STREAMS = {  # name: (LogMEStream arguments, which targets, several models?)
    "classes": (dict(), "labels", True),
    "official": (dict(compat="official"), "labels", True),
    "one-model": (dict(), "labels", False),
    "regression": (dict(regression=True), "targets", True),
    "regression-1d-official": (dict(regression=True, compat="official"), "targets1", True),
}


def _streamed(rows: list[tuple[int, int]], group):
    """{case: (scores, params of the first model)} of every LogMEStream case, this process
    feeding the rows ``rows`` in chunks, and rank_models' rows with every streamed score."""
    feats, y, targets, inputs = _samples()
    out = {}
    for case, (kwargs, which, many) in STREAMS.items():
        stream = LogMEStream(group=group, **kwargs)
        target = {"labels": y, "targets": targets, "targets1": targets[:, 0]}[which]
        for lo, hi in rows:
            for a in range(lo, hi, CHUNK):
                b = min(hi, a + CHUNK)
                stream.update([f[a:b] for f in feats] if many else feats[1][a:b], target[a:b])
        scores, params = stream.score(return_params=True)
        out[case] = (scores, params[0] if many else params)
    index = torch.cat([torch.arange(lo, hi) for lo, hi in rows])
    result = rank_models(_models(), inputs[index], y[index], scores=tuple(STREAMED), layers="all", batch_size=CHUNK,
                         progress=False, group=group)
    out["rank_models"] = result.rows
    return out


def _shard(rank, world, config):
    """Every rank's results for its shard of ``SHARDS[world][config]``, then a check that a
    mistake on one rank fails every rank, naming it."""
    group = torch.distributed.group.WORLD
    _dist.announce(group)
    got = _streamed([SHARDS[world][config][rank]], group)
    feats, y, _, inputs = _samples()
    try:  # rank 1 passes one label too few
        rank_models(_models(), inputs[:10], y[:10 - (rank == 1)], scores=("logme",), progress=False, group=group)
    except _dist.RankFailure as e:
        got["failure"] = str(e)
    try:  # every rank's second model has another width
        stream = LogMEStream(group=group).update([feats[0][:9], feats[rank][:9]], y[:9])
        stream.score()
    except ValueError as e:
        got["widths"] = str(e)
    return _plain(got)


def _plain(obj):
    """``obj`` with its tensors as numpy arrays: what a spawned rank can hand back by value
    (a tensor crosses the queue as a shared-memory handle, gone once the rank exits)."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=1e-10, atol=0), f"{what}: {a} vs {b}"


def _compare(got: dict, want: dict):
    for case in STREAMS:
        _close(got[case][0], want[case][0], case)
        for key in ("alpha", "beta", "m", "evidence"):
            _close(got[case][1][key], want[case][1][key], f"{case} {key}")
    assert [(r["model"], r["layer"], r["dim"]) for r in got["rank_models"]] == \
        [(r["model"], r["layer"], r["dim"]) for r in want["rank_models"]]
    for g, w in zip(got["rank_models"], want["rank_models"]):
        for s in STREAMED:
            _close(g[s], w[s], f"rank_models {g['model']} layer {g['layer']} {s}")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_scores_equal_one_process(world):
    """Every streamed score (LogME classes and regression targets, both compat modes, with
    params; rank_models' logme, hscore, hscore_shrinkage, gbc, gbc_log, transrate, etran and
    ncti on three models of 1 to 3 layers of widths 4..20) over shards of 37 + 0, 60 + 37
    and 41 + 0 + 56 rows equals one process fed all the rows, on every rank alike."""
    for config in range(len(SHARDS[world])):
        outcomes = run_ranks(_shard, world, config, timeout=90)
        want = _streamed(SHARDS[world][config], None)
        for got in outcomes:
            _compare(got, want)
            assert got["failure"] == "rank 1 failed: labels: expected 10 labels (one per sample), got 9"
            assert got["widths"].startswith("group: rank 1 fed models of widths [5, 12], rank 0 [5, 5]")
        for got in outcomes[1:]:  # bit for bit the same on every rank
            assert got["rank_models"] == outcomes[0]["rank_models"]
            for case in STREAMS:
                assert np.array_equal(got[case][0], outcomes[0][case][0])


def test_group_needs_torch_distributed():
    for call in (lambda: LogMEStream(group=object()),
                 lambda: rank_models(_models(), torch.zeros(4, 24, dtype=torch.float64), [0, 1, 0, 1], group=object())):
        with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
            call()


# ---- transferops rank under torchrun --------------------------------------------------------------


def _torchrun(args, cwd, timeout=90):
    """``torchrun --standalone --nproc-per-node 2 --no-python transferops rank ARGS`` (the
    installed command next to this interpreter)."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                           str(bin_dir / "transferops"), "rank", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_under_torchrun_splits_the_files_and_agrees_on_failure(tmp_path, capsys, monkeypatch):
    from transferops.cli import main

    feats, y, _, _ = _samples()
    files = []
    for name, f in zip("abc", feats):
        np.save(tmp_path / f"{name}.npy", f.numpy())
        files.append(f"{name}.npy")
    np.save(tmp_path / "y.npy", y.numpy())
    scores = ["logme", "hscore", "gbc", "transrate", "sfda", "ncti"]
    args = ["--labels", "y.npy", *files, "--scores", *scores]
    monkeypatch.chdir(tmp_path)
    assert main(["rank", *args, "--json", "one.json"]) == 0
    one_table = capsys.readouterr().out

    run = _torchrun([*args, "--json", "two.json"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("rank  model") == 1  # the first rank's table only
    assert [line.split()[:2] for line in run.stdout.splitlines()] == [line.split()[:2] for line in one_table.splitlines()]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert [r["model"] for r in two] == [r["model"] for r in one]
    for a, b in zip(two, one):
        for s in scores:
            _close(a[s], b[s], f"{a['model']} {s}")

    (tmp_path / "c.npy").write_bytes(b"not an array")
    owner = _dist.split_balanced([(tmp_path / f).stat().st_size for f in files], 2)[2]
    run = _torchrun([*args, "--json", "bad.json"], tmp_path)
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert run.returncode != 0 and not (tmp_path / "bad.json").exists() and run.stdout == ""
    assert len(errors) == 2, run.stderr
    for e in errors:
        assert e.startswith(f"transferops rank: error: rank {owner} failed: c.npy: cannot read as .npy"), run.stderr
    # torchrun's own report: both ranks exited with status 2 (none was stopped by its SIGTERM),
    # and the only traceback is torchrun's, none from the ranks
    assert run.stderr.count("exitcode  : 2") == 2 and "transferops/cli" not in run.stderr, run.stderr


def _cli_models(rank, world, argv):
    """``transferops rank argv`` on this rank as torchrun starts it (WORLD_SIZE set, the group
    joined): what it printed and returned."""
    import contextlib
    import io

    from transferops.cli import main

    os.environ["WORLD_SIZE"] = str(world)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_cli_models_split_over_ranks_equal_one_process(folders, tmp_path):  # noqa: F811 (the fixture)
    """--models under torchrun: each rank runs its share of the folders (split by their
    weights' bytes), and the first rank prints the table and writes the JSON of every layer,
    NCTI normalized over all the candidates, equal to the one-process run."""
    from test_rank_models import texts_and_labels
    from transferops.cli import main

    texts, y = texts_and_labels(40)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": int(c)}) + "\n"
                                              for t, c in zip(texts, y)))
    models = [str(folders[m]) for m in ("bert-32x2", "gpt2-48x3", "llama-40x2")]
    argv = ["rank", "-q", "--models", *models, "--data", str(tmp_path / "t.jsonl"), "--layers", "all",
            "--scores", "logme", "gbc_log", "ncti"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same forward passes, bit for bit
    try:
        assert main([*argv, "--json", str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    (code0, out0), (code1, out1) = run_ranks(_cli_models, 2, [*argv, "--json", str(tmp_path / "two.json")],
                                             timeout=90)
    assert code0 == code1 == 0 and "rank  model" in out0 and out1 == ""
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["ranking"] == one["ranking"] and two["best"] == one["best"]
    assert [(r["model"], r["layer"]) for r in two["rows"]] == [(r["model"], r["layer"]) for r in one["rows"]]
    for a, b in zip(two["rows"], one["rows"]):
        for s in ("logme", "gbc_log", "ncti"):
            _close(a[s], b[s], f"{a['model']} layer {a['layer']} {s}")
