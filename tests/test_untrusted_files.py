"""Checkpoints, configs and output folders as an attacker or a careless user makes them: every
case is refused with one clear error naming the file or argument, nothing outside a
checkpoint's folder is read, nothing is written outside the output folder, and no output is
left half-written. Cases where a hang or a signal is the point run in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _kit import peer
from transferops._outdir import OutputError, OutputFolder
from transferops._safetensors import INDEX, Checkpoint, CheckpointError
from transferops.cli import main
from transferops.merging import merge, merge_files

PARSERS = ["native", "python"]


def _state(gen, scale=1.0):
    return {"a.w": torch.randn(6, 5, generator=gen) * scale, "b.w": torch.randn(7, generator=gen) * scale,
            "pos": torch.arange(4)}


def _header_file(path: Path, header: dict | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture
def trio(tmp_path, gen):
    """base + two fine-tunes as single safetensors files in their own folders, and the states."""
    peer("safetensors")
    from safetensors.torch import save_file

    states = [_state(gen)] + [_state(gen, 0.1) for _ in range(2)]
    paths = []
    for i, sd in enumerate(states):
        if i:
            sd = {k: (states[0][k] + v if v.is_floating_point() else v) for k, v in sd.items()}
            states[i] = sd
        (tmp_path / f"m{i}").mkdir()
        save_file(sd, tmp_path / f"m{i}" / "model.safetensors")
        paths.append(tmp_path / f"m{i}")
    return paths, states


def _cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, err)


# ---- files outside the checkpoint ---------------------------------------------------------


def _sharded(folder: Path, state: dict, names: list[str]) -> None:
    """``state`` split over shard files called ``names`` (relative to ``folder``), with an index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k] for k in keys[i::len(names)]}
        target = Path(name) if os.path.isabs(name) else folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(part, target)
        weight_map.update({k: name for k in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("parser", PARSERS)
def test_index_cannot_name_files_outside_its_folder(tmp_path, gen, parser):
    peer("safetensors")
    state = _state(gen)
    _sharded(tmp_path / "dotdot", state, ["a.safetensors", "../elsewhere/x.safetensors"])
    with pytest.raises(CheckpointError, match=r"shard file '../elsewhere/x.safetensors' lies outside"):
        Checkpoint(tmp_path / "dotdot", parser=parser)
    _sharded(tmp_path / "abs", state, ["a.safetensors", str(tmp_path / "abs_target" / "x.safetensors")])
    with pytest.raises(CheckpointError, match="lies outside"):
        Checkpoint(tmp_path / "abs", parser=parser)
    # A symlink inside the folder that leads out of it.
    _sharded(tmp_path / "link", state, ["a.safetensors", "b.safetensors"])
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "link" / "b.safetensors").read_bytes())
    (tmp_path / "link" / "b.safetensors").unlink()
    (tmp_path / "link" / "b.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match="'b.safetensors' links outside"):
        Checkpoint(tmp_path / "link", parser=parser)
    # A link that stays inside is fine.
    (tmp_path / "link" / "b.safetensors").unlink()
    (tmp_path / "link" / "real.bin").write_bytes((tmp_path / "outside.safetensors").read_bytes())
    (tmp_path / "link" / "b.safetensors").symlink_to("real.bin")
    with Checkpoint(tmp_path / "link", parser=parser) as c:
        assert all(torch.equal(c.read(k).view(state[k].shape), state[k]) for k in state)


def test_hugging_face_cache_snapshot_reads_its_blobs(tmp_path, gen):
    """models--org--name/snapshots/<rev>/ files link to ../../blobs/<hash>, as the hub's cache
    lays them out: allowed, and nothing else outside."""
    peer("safetensors")
    state = _state(gen)
    repo = tmp_path / "models--org--tiny"
    staging = tmp_path / "staging"
    _sharded(staging, state, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(staging.iterdir())):
        (repo / "blobs" / f"hash{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"hash{i}")
    with Checkpoint(snap) as c:
        assert sorted(c.tensors) == sorted(state)
        assert torch.equal(c.read("a.w").view(6, 5), state["a.w"])


def test_non_checkpoint_contents_are_not_leaked(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    value = struct.unpack("<Q", secret.read_bytes()[:8])[0]
    with pytest.raises(CheckpointError) as e:
        Checkpoint(secret)
    assert str(value) not in str(e.value) and "not a safetensors file" in str(e.value)


def test_fifo_shard_is_refused_without_blocking(tmp_path, gen):
    peer("safetensors")
    _sharded(tmp_path / "ck", _state(gen), ["a.safetensors", "b.safetensors"])
    (tmp_path / "ck" / "b.safetensors").unlink()
    os.mkfifo(tmp_path / "ck" / "b.safetensors")
    prog = ("import sys\nfrom transferops._safetensors import Checkpoint, CheckpointError\n"
            "try:\n    Checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", prog, str(tmp_path / "ck")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "b.safetensors: shard is not a regular file" in res.stdout, res


# ---- headers the safetensors library refuses ----------------------------------------------


def _bad_headers():
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    yield "negative shape", {"t": dict(ok, shape=[-2, -1])}, 8, "non-negative integer"
    yield "wrapping product", {"t": dict(ok, shape=[2**62, 4, 0 + 2])}, 8, "does not fit"
    yield "float shape", {"t": dict(ok, shape=[4.9])}, 8, ""
    yield "bool shape", {"t": dict(ok, shape=[True, 2])}, 8, ""
    yield "overlapping offsets", {"t": ok, "u": dict(ok, data_offsets=[4, 12])}, 12, "overlaps"
    yield "gap", {"t": dict(ok, data_offsets=[4, 12])}, 12, "gap"
    yield "data left over", {"t": ok}, 16, "cover 8 of the data's 16"
    yield "duplicate name", b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' \
                            b'"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, "'t' twice"
    yield "duplicate field", b'{"t":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}}', 8, "twice"
    yield "utf-16", json.dumps({"t": ok}).encode("utf-16"), 8, ""
    yield "metadata list", {"__metadata__": ["a"], "t": ok}, 8, "__metadata__"
    yield "metadata numbers", {"__metadata__": {"a": 1}, "t": ok}, 8, "__metadata__"
    yield "unknown dtype", {"t": dict(ok, dtype="F128")}, 8, "dtype"
    yield "unknown key", {"t": dict(ok, extra=1)}, 8, ""
    yield "NaN offset", b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,NaN]}}', 8, ""
    yield "Infinity dim", b'{"t":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}', 8, ""
    yield "huge integer", b'{"t":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', 8, ""
    yield "deep nesting", b'{"t":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0, ""
    yield "lone surrogate", b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, ""
    yield "trailing data", b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} x', 8, ""
    yield "not an object", b'[1, 2]', 8, "not a JSON object"


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("case", list(_bad_headers()), ids=lambda c: c[0])
def test_header_refused_like_safetensors(tmp_path, parser, case):
    what, header, data_bytes, needle = case
    path = _header_file(tmp_path / "x.safetensors", header, bytes(data_bytes))
    with pytest.raises(CheckpointError, match="x.safetensors: ") as e:
        Checkpoint(path, parser=parser)
    assert needle in str(e.value)
    if what in ("duplicate name", "unknown key"):
        return  # the safetensors library takes the last of two names and ignores unknown keys
    safetensors = pytest.importorskip("safetensors.torch")
    with pytest.raises(Exception):  # the library refuses it too
        safetensors.load_file(path)


def test_header_too_big_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b"{" + b" " * 100_000_000)
    with pytest.raises(CheckpointError, match="100000000-byte limit"):
        Checkpoint(path)


@pytest.mark.slow
def test_million_tensor_header_parses_in_seconds(tmp_path):
    """1.3M tensors, a 98 MB header: under 5 s with the native parser (2 s on a 2-core CI-class
    machine), linear in the header's size."""
    from transferops.bench.bench_checkpoints import _write_tiny_tensors

    path = tmp_path / "h.safetensors"
    _write_tiny_tensors(path, 1_300_000, 1, 0)
    t0 = time.perf_counter()
    with Checkpoint(path) as c:
        elapsed = time.perf_counter() - t0
        assert len(c.tensors) == 1_300_000
        want = np.random.default_rng(0).standard_normal(1000, dtype=np.float32)[999]
        assert c.read("l999.w").item() == want
    print(f"1.3M-tensor header: {elapsed:.2f} s")
    assert elapsed < 5


# ---- the output folder ---------------------------------------------------------------------


def test_output_equal_to_or_inside_an_input_is_refused(trio, tmp_path, capsys):
    paths, _ = trio
    args = ["merge", "--method", "task_arithmetic", "--base", paths[0], paths[1], paths[2], "-q"]
    for out in (paths[0], paths[1], paths[2] / "sub", tmp_path):
        code, err = _cli(args + ["-o", out, "--overwrite"], capsys)
        assert code == 2, out
        _one_error_line(err, f"output {out}")
    assert sorted(p.name for p in paths[0].iterdir()) == ["model.safetensors"]
    assert not (paths[2] / "sub").exists()


def test_output_folder_must_be_empty_unless_overwrite(trio, tmp_path, capsys, gen):
    paths, states = trio
    out = tmp_path / "out"
    # An earlier sharded merge in the folder: its shards and index must not survive.
    _sharded(out, _state(gen), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    (out / "notes").mkdir()
    args = ["merge", "--method", "task_arithmetic", "--base", paths[0], paths[1], paths[2], "-o", out, "-q"]
    code, err = _cli(args, capsys)
    assert code == 2
    _one_error_line(err, "is not empty", "--overwrite")
    code, err = _cli(args + ["--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    from safetensors.torch import load_file

    want = merge(states[0], states[1:], method="task_arithmetic")
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_planted_symlinks_are_never_followed(trio, tmp_path, capsys):
    paths, _ = trio
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in (".model.safetensors.partial", "model.safetensors", INDEX):
        (out / name).symlink_to(victim)
    args = ["merge", "--method", "task_arithmetic", "--base", paths[0], paths[1], "-o", out, "-q"]
    assert _cli(args, capsys)[0] == 2
    code, err = _cli(args + ["--overwrite"], capsys)
    assert code == 0, err
    assert victim.read_text() == "precious"
    assert not (out / "model.safetensors").is_symlink() and (out / "model.safetensors").is_file()
    # The output folder itself a symlink: refused.
    (tmp_path / "real_out").mkdir()
    (tmp_path / "link_out").symlink_to(tmp_path / "real_out")
    code, err = _cli(["merge", "--method", "task_arithmetic", "--base", paths[0], paths[1], "-o",
                      tmp_path / "link_out", "-q"], capsys)
    assert code == 2
    _one_error_line(err, "symbolic link")
    assert not any((tmp_path / "real_out").iterdir())


def test_concurrent_merge_into_one_folder_is_refused(trio, tmp_path, capsys):
    paths, _ = trio
    out = tmp_path / "out"
    holder = OutputFolder(out)  # another merge, mid-way
    try:
        code, err = _cli(["merge", "--method", "task_arithmetic", "--base", paths[0], paths[1], "-o", out, "-q"],
                         capsys)
        assert code == 2
        _one_error_line(err, "another merge is writing")
    finally:
        holder.abort()
    assert not out.exists()  # made by the holder, empty, removed by its abort
    with pytest.raises(OutputError, match="another merge"):
        with_lock = OutputFolder(tmp_path / "o2")
        try:
            OutputFolder(tmp_path / "o2")
        finally:
            with_lock.abort()


def test_failed_merge_leaves_no_output_and_stale_staging_is_cleaned(trio, tmp_path):
    paths, _ = trio
    out = tmp_path / "out"
    out.mkdir()
    (out / ".transferops-staging-deadbeefdeadbeef").mkdir()  # a killed writer's
    (out / ".transferops-staging-deadbeefdeadbeef" / "model.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="lam"):
        merge_files(paths[0], [paths[1]], out, method="task_arithmetic", lam=float("nan"))
    merge_files(paths[0], [paths[1]], out, method="task_arithmetic")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]


_SLOW_MERGE = """
import sys, time
import transferops.merging_models as mm
real = mm._merge_tensor
def slow(*a, **k):
    print("merging", flush=True)
    time.sleep(0.2)
    return real(*a, **k)
mm._merge_tensor = slow
from transferops.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signals_clean_up_and_print_one_line(trio, tmp_path, sig):
    paths, _ = trio
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, "merge", "--method", "task_arithmetic", "--base",
                             str(paths[0]), str(paths[1]), "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "merging"
        assert any(p.name.startswith(".transferops-staging-") for p in out.iterdir())
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert err.strip() == f"transferops merge: interrupted by {sig}", err
    assert not out.exists()


# ---- arguments and configs -----------------------------------------------------------------


def test_nan_lam_is_refused_everywhere(trio, tmp_path, capsys):
    paths, states = trio
    nan = float("nan")
    for backend in ("reference", "native"):
        with pytest.raises(ValueError, match="lam: expected a finite number"):
            merge(states[0], states[1:], method="task_arithmetic", lam=nan, backend=backend)
    code, err = _cli(["merge", "--method", "task_arithmetic", "--lam", "nan", "--base", paths[0], paths[1], "-o",
                      tmp_path / "o", "-q"], capsys)
    assert code == 2
    _one_error_line(err, "lam")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: task_arithmetic\nbase: {paths[0]}\nmodels: [{paths[1]}]\nparameters: {{lam: .nan}}\n")
    code, err = _cli(["merge", "--config", cfg, "-o", tmp_path / "o", "-q"], capsys)
    assert code == 2
    _one_error_line(err, "c.yaml", "lam")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_out_requiring_grad_is_refused_on_every_backend(trio, backend):
    _, states = trio
    out = {k: torch.zeros_like(v).requires_grad_(v.is_floating_point()) for k, v in states[0].items()}
    with pytest.raises(ValueError, match=r"out\['a.w'\]: requires grad"):
        merge(states[0], states[1:], method="task_arithmetic", out=out, backend=backend)


def _config_cases(base, model):
    yield "malformed.yaml", "method: ties\nmodels: [\n", "not a valid YAML"
    yield "tag.yaml", "method: !!python/object/apply:os.system ['true']\n", "not a valid YAML"
    yield "list.yaml", "- a\n- b\n", "expected a mapping"
    yield "models_str.yaml", f"method: task_arithmetic\nbase: {base}\nmodels: {model}\n", "models"
    yield "weight_str.yaml", f"method: task_arithmetic\nbase: {base}\nmodels: [{{path: {model}, weight: abc}}]\n", \
        "models[0].weight"
    yield "weight_list.yaml", f"method: task_arithmetic\nbase: {base}\nmodels: [{{path: {model}, weight: [[1]]}}]\n", \
        "models[0].weight"
    yield "lam_abc.yaml", f"method: task_arithmetic\nbase: {base}\nmodels: [{model}]\nparameters: {{lam: abc}}\n", \
        "lam"
    yield "seed_float.yaml", f"method: dare_ties\nbase: {base}\nmodels: [{model}]\n" \
                             "parameters: {density: 0.5, seed: 1.5}\n", "seed"
    yield "epsilon_str.yaml", f"method: della\nbase: {base}\nmodels: [{model}]\n" \
                              "parameters: {density: 0.5, seed: 1, epsilon: x}\n", "epsilon"
    # An alias chain whose expansion doubles at each level: the path must be a string, and is
    # refused before anything expands it.
    chain = "  - {path: &a0 [x, x]}\n" + "".join(f"  - {{path: &a{i} [*a{i - 1}, *a{i - 1}]}}\n" for i in range(1, 40))
    yield "alias_bomb.yaml", f"method: task_arithmetic\nbase: {base}\nmodels:\n" + chain, "models[0].path"
    yield "nested.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", ""


def test_bad_configs_are_one_error_line(trio, tmp_path, capsys):
    peer("yaml")
    paths, _ = trio
    for name, text, needle in _config_cases(paths[0], paths[1]):
        (tmp_path / name).write_text(text)
        t0 = time.perf_counter()
        code, err = _cli(["merge", "--config", tmp_path / name, "-o", tmp_path / "o", "-q"], capsys)
        assert code == 2, (name, err)
        _one_error_line(err, needle)
        assert time.perf_counter() - t0 < 5, name
    assert not (tmp_path / "o").exists()


def test_bad_arguments_and_indexes_are_one_error_line(trio, tmp_path, capsys):
    paths, _ = trio
    merge_args = ["merge", "--method", "task_arithmetic", "--base", paths[0], paths[1], "-o", tmp_path / "o", "-q"]
    for flag in (["--max-memory", "inf"], ["--max-memory=-1GB"], ["--shard-size", "nan"]):
        with pytest.raises(SystemExit) as e:  # argparse's own: usage and exit 2
            main([str(a) for a in merge_args + flag])
        assert e.value.code == 2
        assert "expected a positive size" in capsys.readouterr().err
    for weights in (["--weights", "1", "2"],):
        code, err = _cli(merge_args + weights, capsys)
        assert code == 2
        _one_error_line(err, "weights")
    # Broken indexes in a base folder.
    base = tmp_path / "bad_base"
    base.mkdir()
    (base / "model.safetensors").write_bytes((paths[0] / "model.safetensors").read_bytes())
    for text, needle in (('{"weight_map": ["a"]}', "weight_map"), ('{"weight_map": null}', "weight_map"),
                         ("[" * 100_000 + "]" * 100_000, "nests too deeply"), ("{", "not valid JSON"),
                         ('{"weight_map": {"a.w": "model.safetensors", "a.w": "x"}}', "twice")):
        (base / INDEX).write_text(text)
        code, err = _cli(["merge", "--method", "task_arithmetic", "--base", base, paths[1], "-o", tmp_path / "o",
                          "-q"], capsys)
        assert code == 2, text
        _one_error_line(err, INDEX, needle)
    assert not (tmp_path / "o").exists()


def test_rank_refuses_garbage_and_pickles(tmp_path, capsys):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(20) % 3)
    (tmp_path / "junk.safetensors").write_bytes(b"\x07" * 64)
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps(Evil(), protocol=2))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "feats.txt").write_text("1 2 3")
    np.save(tmp_path / "flat.npy", np.zeros(20))
    for name, needle in (("junk.safetensors", "junk.safetensors"), ("pickle.pt", "pickle.pt"),
                         ("objects.npy", "objects.npy"), ("feats.txt", "expected a .npy"),
                         ("flat.npy", "expected [N, D]"), ("missing.npy", "missing.npy")):
        code, err = _cli(["rank", tmp_path / name, "--labels", labels], capsys)
        assert code == 2, name
        _one_error_line(err, needle)


def test_written_checkpoints_load_in_safetensors(trio, tmp_path):
    """What merge_files writes is read back by the safetensors library and by our strict
    reader, sharded or not."""
    paths, states = trio
    from safetensors.torch import load_file

    for shard in (10**9, 100):
        out = tmp_path / f"o{shard}"
        merge_files(paths[0], paths[1:], out, method="ties", density=0.5, shard_size=shard)
        got = {}
        for f in sorted(out.glob("*.safetensors")):
            got.update(load_file(f))
        with Checkpoint(out) as c:
            assert sorted(c.tensors) == sorted(got)
        want = merge(states[0], states[1:], method="ties", density=0.5)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_held_signals_deliver_after_the_body():
    from transferops._outdir import held_signals

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append("handler"))
    try:
        import transferops._outdir as od

        saved = od._SIGNALS
        od._SIGNALS = (signal.SIGUSR1,)
        try:
            with held_signals():
                os.kill(os.getpid(), signal.SIGUSR1)
                seen.append("body")
        finally:
            od._SIGNALS = saved
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == ["body", "handler"]
