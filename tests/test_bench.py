"""The benchmark harness: a benchmark of a wrong answer must be flagged, and results must be
written whole, appended run by run, and read back (--compare, --headline)."""
import io
import json
import os
import sys
import tomllib
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from transferops import cli
from transferops.bench import harness, results

ROOT = Path(__file__).resolve().parents[1]


def _floors():
    return harness.Floors(copy_bps=10e9, gemm_flops={torch.float32: 100e9})


def test_run_case_checks_ratios_and_flags_a_wrong_peer():
    x = torch.arange(1000, dtype=torch.float32)
    case = harness.Case(op="toy", size="n=1000", dtype=torch.float32, bytes=8000,
                        ours={"reference": lambda: x * 2, "native": lambda: x + x},
                        peers={"peer:right": lambda: 2 * x, "peer:wrong": lambda: x * 3, "peer:absent": None})
    notes, warnings = [], []
    rows = {r.backend_or_peer: r for r in harness.run_case(case, "cpu", _floors(), harness.QUICK, notes, warnings)}
    assert set(rows) == {"reference", "native", "peer:right", "peer:wrong"}
    assert rows["native"].matches is True and rows["peer:wrong"].matches is False
    assert any("peer:wrong" in w for w in warnings) and any("peer:absent" in n for n in notes)
    best = rows["peer:right"].p50  # the wrong peer sets no bar
    assert rows["native"].ratio_to_best_peer == pytest.approx(best / rows["native"].p50)
    assert rows["native"].floor_fraction == pytest.approx(8000 / 10e9 / rows["native"].p50)
    assert rows["native"].p20 <= rows["native"].p50 <= rows["native"].p80


def test_gpu_bars_are_judged_on_their_case_and_reported_when_missing(tmp_path):
    """A case names its GPU bars; the report lists every bar: met, not met, or not run and why."""
    import transferops

    x = torch.arange(100, dtype=torch.float32)

    def unavailable():
        raise transferops.BackendUnavailable("logme has no triton implementation")
    merge = harness.Case(op="merge", size="n=100", dtype=torch.float32, bytes=800, bars=("merge-copy",),
                         ours={"reference": lambda: x * 2, "triton": lambda: x + x}, peers={})
    logme = harness.Case(op="logme M=20", size="n=100", dtype=torch.float32, bytes=800, bars=("logme-20",),
                         ours={"reference": lambda: x, "triton": unavailable}, peers={"peer:p": "needs a GPU"})
    judged, notes, warnings = [], [], []
    slow_floors = harness.Floors(copy_bps=1.0, gemm_flops={torch.float32: 1.0})  # an 800 s floor: met
    for case in (merge, logme):
        harness.run_case(case, "cpu", slow_floors, harness.QUICK, notes, warnings, judged)
    assert not warnings and "peer:p unavailable (needs a GPU)" in notes
    m, lg = judged
    assert (m["bar"], m["backend"], m["met"]) == ("merge-copy", "triton", True) and m["value"] > 0.7
    assert lg["met"] is None and lg["figure"] == "not run: triton skipped: logme has no triton implementation"
    part = tmp_path / "part.json"
    harness.write_json([], {"hot_paths": ["merging", "transferability"], "complete": True, "bars": judged,
                            "devices": {"cpu": "a CPU"}}, str(part))
    out = io.StringIO()
    harness.report([str(part), str(tmp_path / "absent.json")], json_path=str(tmp_path / "all.json"), out=out)
    text = out.getvalue()
    assert "[met] merge (TIES" in text and "[NOT RUN] LogME of 20 models" in text, text
    assert "not run: no results of the ot bench" in text and "absent.json" in text
    assert "bars: 1 met, 0 not met, 4 not run or not judged" in text
    assert json.loads((tmp_path / "all.json").read_text())["meta"]["bars"] == judged


def test_time_fn_stops_at_its_budget():
    calls = []
    t = harness.time_fn(lambda: calls.append(1), warmup=2, repeats=1000, device="cpu", budget_s=0.0, min_repeats=4)
    assert t["repeats"] == 4 and len(calls) == 6


def test_time_interleaved_alternates_and_stops_each_on_its_own():
    """Rounds call each running callable once, in a rotating order; a slow one stops after 3
    calls and no warmup while the others go on to their own minimum."""
    log = []
    t = harness.time_interleaved({k: (lambda k=k: log.append(k)) for k in "abc"}, warmup=1, repeats=1000,
                                 device="cpu", budget_s=0.0, min_repeats=5, slow={"c"})
    assert log[:2] == ["a", "b"]  # warmups; c takes none
    assert log[2:11] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert log[11:] == ["b", "a", "a", "b"]
    assert {k: v["repeats"] for k, v in t.items()} == {"a": 5, "b": 5, "c": 3}


def test_write_json_is_whole_or_absent(tmp_path):
    path = tmp_path / "r.json"
    harness.write_json([{"op": "toy"}], {"date": "today"}, str(path))
    assert json.loads(path.read_text()) == {"meta": {"date": "today"}, "rows": [{"op": "toy"}]}
    with pytest.raises(TypeError):
        harness.write_json([{"op": object()}], {}, str(path))
    assert json.loads(path.read_text())["rows"] == [{"op": "toy"}]  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # and no temporary is left


def test_print_table_lists_every_row(capsys):
    row = harness.Row("toy", "n=1", "native", "ours", "cpu", "f32", 1e-3, 2e-3, 3e-3, 5, gbps=1.0,
                      floor_fraction=0.5, ratio_to_best_peer=12.5, matches=True)
    from dataclasses import asdict

    harness.print_table([asdict(row)], out=None)
    out = capsys.readouterr().out
    assert "toy" in out and "2 ms" in out and "12.5x" in out and "50.0%" in out


def test_unknown_hot_path_is_an_error():
    with pytest.raises(ValueError, match="only: unknown hot path"):
        harness.run(only=["nope"])


def test_adapters_demo_trains_both_side_by_side(capsys):
    from transferops.bench import demo_adapters

    demo_adapters.main(["--steps", "1"])  # each run in a child process: a step there costs a second
    out = capsys.readouterr().out
    for name in ("transferops", "eager"):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{name}:"))
        assert "ms/step" in line and "saved for backward" in line and "peak memory of the steps" in line, line


def _meta(date: str, *, quick: bool = False, isa: str | None = "avx2", gpu: str | None = None) -> dict:
    devices = {"cpu": "AMD EPYC 7B13 64-Core Processor", **({"cuda": gpu} if gpu else {})}
    return {"date": date, "quick": quick,
            "machine": {"platform": "Linux", "cpu": devices["cpu"], "cores": 2, "torch_threads": 2},
            "devices": devices, "versions": {"torch": "2.13.0", "transferops": "0.1.0"},
            "transferops_info": {"native_cpu_isa": isa},
            "elapsed_s": 1.0, "notes": [], "warnings": []}


def _row(op, size, backend, p50, *, kind=None, device="cpu", dtype="f32", nbytes=1e9, ratio=None, matches=None):
    kind = kind or ("peer" if backend.startswith("peer:") else "ours")
    return asdict(harness.Row(op, size, backend, kind, device, dtype, p50 * 0.9, p50, p50 * 1.1, 5,
                              gbps=nbytes / p50 / 1e9, ratio_to_best_peer=ratio, matches=matches))


def _append_run(path: Path, run: str, meta: dict, rows: list[dict], hot_path: str = "merging") -> None:
    hot = [None if r["op"].startswith("floor:") else hot_path for r in rows]
    (lines,) = results.run_lines(rows, meta, hot, run=run, commit="0123456789abcdef", dirty=False).values()
    results.append(path, lines)


def test_machine_kind_names_cpu_cores_isa_and_gpu():
    meta = _meta("2026-01-01T00:00:00+00:00", gpu="NVIDIA H200")
    assert results.machine_kind(meta, "cpu") == "cpu-amd-epyc-7b13-2core-avx2"
    assert results.machine_kind(meta, "cuda") == "cuda-nvidia-h200"
    meta["machine"]["cpu"] = "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz"
    meta["transferops_info"]["native_cpu_isa"] = "avx512"
    assert results.machine_kind(meta, "cpu") == "cpu-intel-xeon-platinum-8480-2core-avx512"
    meta["transferops_info"]["native_cpu_isa"] = None  # the native module did not load
    assert results.machine_kind(meta, "cpu").endswith("-nonative")


def test_record_appends_runs_as_whole_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "git_state", lambda: ("0123456789abcdef", True))
    rows = [_row("floor:copy", "64 MiB", "torch", 1e-3, kind="floor"), _row("ties", "P=1M", "native", 2e-3)]
    first = results.record(rows, _meta("2026-01-01T10:00:00+00:00"), [None, "merging"], tmp_path)
    second = results.record(rows, _meta("2026-01-02T10:00:00+00:00"), [None, "merging"], tmp_path)
    assert first == second == [tmp_path / "cpu-amd-epyc-7b13-2core-avx2.jsonl"]
    text = first[0].read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2 * (1 + len(rows))
    lines = [json.loads(line) for line in text.splitlines()]  # each line is one JSON object
    assert lines == results.read(first[0])
    runs = [line for line in lines if line["record"] == "run"]
    assert [r["run"] for r in runs] == ["2026-01-01T100000Z-0123456", "2026-01-02T100000Z-0123456"]
    assert all(r["rows"] == 2 and r["dirty"] is True and r["meta"]["notes"] == [] for r in runs)
    ties = [line for line in lines if line["record"] == "row" and line["op"] == "ties"]
    assert [r["date"] for r in ties] == ["2026-01-01T10:00:00+00:00", "2026-01-02T10:00:00+00:00"]
    assert ties[0]["commit"] == "0123456789abcdef" and ties[0]["hot_path"] == "merging"
    assert ties[0]["machine"]["cores"] == 2 and ties[0]["versions"]["torch"] == "2.13.0"
    assert {k: ties[0][k] for k in rows[1]} == rows[1]


def test_a_run_on_cpu_and_gpu_goes_to_two_files(tmp_path):
    rows = [_row("ties", "P=1M", "native", 2e-3), _row("ties", "P=1M", "cuda", 1e-4, device="cuda")]
    lines = results.run_lines(rows, _meta("2026-01-01T00:00:00+00:00", gpu="NVIDIA H200"), ["merging"] * 2,
                              run="r", commit=None, dirty=None)
    assert sorted(lines) == ["cpu-amd-epyc-7b13-2core-avx2", "cuda-nvidia-h200"]
    assert [line["record"] for line in lines["cuda-nvidia-h200"]] == ["run", "row"]
    assert lines["cuda-nvidia-h200"][1]["device_name"] == "NVIDIA H200"


def test_append_leaves_no_part_of_a_short_write(tmp_path, monkeypatch):
    path = tmp_path / "k.jsonl"
    results.append(path, [{"record": "run", "run": "a"}])
    before = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:10]))
    with pytest.raises(OSError, match="short write"):
        results.append(path, [{"record": "run", "run": "b"}, {"record": "run", "run": "c"}])
    assert path.read_bytes() == before


def test_run_records_each_row_with_its_hot_path(tmp_path, monkeypatch):
    """run(results_dir=...) end to end, on a toy hot path and toy floors."""
    toy = types.ModuleType("transferops.bench.bench_toy")
    x = torch.arange(100, dtype=torch.float32)
    toy.cases = lambda quick, device: [harness.Case(op="toy", size="n=100", dtype=torch.float32, bytes=800,
                                                    ours={"reference": lambda: x * 2}, peers={"peer:p": lambda: x + x})]
    monkeypatch.setitem(sys.modules, "transferops.bench.bench_toy", toy)
    monkeypatch.setattr(harness, "HOT_PATHS", ("toy",))
    floor = harness.Row("floor:copy", "1 MiB", "torch", "floor", "cpu", "f32", 1e-3, 1e-3, 1e-3, 3, gbps=1.0)
    monkeypatch.setattr(harness, "measure_floors", lambda device, quick, s: (_floors(), [floor]))
    out = io.StringIO()
    harness.run(quick=True, device="cpu", results_dir=str(tmp_path), out=out)
    (path,) = tmp_path.iterdir()
    assert f"recorded in {path}" in out.getvalue()
    lines = results.read(path)
    assert [(r["record"], r.get("op"), r.get("hot_path")) for r in lines] == [
        ("run", None, None), ("row", "floor:copy", None), ("row", "toy", "toy"), ("row", "toy", "toy")]
    assert lines[0]["hot_paths"] == ["toy"] and lines[0]["quick"] is True


def _two_runs_and_one(path: Path) -> None:
    _append_run(path, "run-1", _meta("2026-01-01T00:00:00+00:00"),
                [_row("ties", "P=1M", "native", 4e-3, ratio=2.0), _row("ties", "P=1M", "peer:peft", 8e-3, ratio=1.0)])
    _append_run(path, "run-2", _meta("2026-01-02T00:00:00+00:00"),
                [_row("ties", "P=1M", "native", 2e-3, ratio=5.0), _row("ties", "P=1M", "peer:peft", 1e-2, ratio=1.0)])
    _append_run(path, "run-3", _meta("2026-01-03T00:00:00+00:00"),
                [_row("ties", "P=1M", "native", 3e-3, ratio=4.0), _row("dare", "P=1M", "native", 5e-3)])


def test_compare_prints_each_case_last_two_runs(tmp_path, capsys):
    path = tmp_path / "k.jsonl"
    _two_runs_and_one(path)
    assert cli.main(["bench", "--compare", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    native = next(i for i, line in enumerate(out) if line.startswith("run-2 (2026-01-02T00:00:00+00:00, full) -> run-3"))
    assert out[native + 2].split() == ["ties", "P=1M", "native", "f32", "cpu", "2", "ms", "3", "ms", "+50.0%",
                                       "5.00x", "4.00x"]
    peft = next(i for i, line in enumerate(out) if line.startswith("run-1 (") and " -> run-2 (" in line)
    assert out[peft + 2].split()[2:] == ["peer:peft", "f32", "cpu", "8", "ms", "10", "ms", "+25.0%", "1.00x", "1.00x"]
    once = next(i for i, line in enumerate(out) if line.startswith("run-3 (2026-01-03") and "timed once" in line)
    assert out[once + 2].split()[:3] == ["dare", "P=1M", "native"] and out[once + 2].split()[5] == "-"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("", "holds no rows"),
    ('{"record": "run", "run": "a"}\n{"record": "row", "op": \n', ":2: malformed line"),
    ('{"record": "row", "op": "x"}\n', ":1: malformed line: a row without run, date"),
    ('[1, 2]\n', ':1: malformed line: expected an object with "record"'),
])
def test_compare_errors_name_the_file_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "k.jsonl"
    if content is not None:
        path.write_text(content)
    assert cli.main(["bench", "--compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"transferops bench: error: {path}") and message in err, err


def test_results_default_to_the_checkout_and_need_results_without_one(monkeypatch, capsys):
    assert results.default_results_dir() == ROOT / "bench" / "results"
    monkeypatch.setattr(results, "checkout_root", lambda: None)  # an installed wheel
    for args in (["--record", "--quick"], ["--compare"], ["--headline"]):
        assert cli.main(["bench", *args]) == 2
        err = capsys.readouterr().err
        assert f"error: {args[0]} needs --results DIR" in err, err


def test_headline_takes_the_largest_case_of_the_newest_full_run(tmp_path):
    f = tmp_path / "cpu.jsonl"
    _append_run(f, "old", _meta("2026-01-01T00:00:00+00:00"), [
        _row("ties", "P=9M", "native", 1e-3, nbytes=9e9), _row("ties", "P=9M", "peer:peft", 1.0, nbytes=9e9)])
    _append_run(f, "new", _meta("2026-01-02T00:00:00+00:00"), [
        _row("ties", "P=1M", "native", 1e-3, nbytes=1e6), _row("ties", "P=1M", "peer:peft", 2e-3, nbytes=1e6),
        _row("ties", "P=4M", "reference", 8e-3, nbytes=4e6), _row("ties", "P=4M", "native", 4e-3, nbytes=4e6),
        _row("ties", "P=4M", "peer:peft", 1e-2, nbytes=4e6), _row("ties", "P=4M", "peer:wrong", 1e-4, nbytes=4e6,
                                                                   matches=False),
        _row("dare", "P=2M", "native", 1e-3, nbytes=2e6), _row("dare", "P=2M", "peer:peft", 3e-3, nbytes=2e6),
        _row("dare", "P=2M", "reference", 1e-4, nbytes=2e6),  # the spec, not a hot path: never the headline
        _row("tiny", "P=1k", "native", 1e-6, nbytes=1e3), _row("tiny", "P=1k", "peer:x", 1e-5, nbytes=1e3),
        _row("nopeer", "P=8M", "native", 1e-3, nbytes=8e6)])
    _append_run(f, "quick", _meta("2026-01-03T00:00:00+00:00", quick=True), [
        _row("ties", "P=1M", "native", 1.0), _row("ties", "P=1M", "peer:peft", 1.0)])
    _append_run(f, "ot", _meta("2026-01-01T00:00:00+00:00"), [
        _row("sinkhorn", "N=1000", "native", 1e-3), _row("sinkhorn", "N=1000", "peer:pot", 6e-3, dtype="f64"),
        _row("sinkhorn", "N=1000", "peer:pot", 5e-3)], hot_path="ot")
    chosen = results.headline_rows(tmp_path)
    assert [(e["op"], e["size"], e["ours"], e["peer"], e["run"]) for e in chosen] == [
        ("ties", "P=4M f32", "native", "peft", "new"), ("dare", "P=2M f32", "native", "peft", "new"),
        ("sinkhorn", "N=1000 f32", "native", "pot", "ot")]
    assert chosen[0]["ratio"] == pytest.approx(2.5)
    table = results.headline(tmp_path).splitlines()
    assert table[0] == "| op | size | transferops | best peer | ratio | machine |"
    assert table[2] == "| ties | P=4M f32 | 4 ms (native) | 10 ms (peft) | 2.50x | cpu-amd-epyc-7b13-2core-avx2 |"


def test_readme_headline_is_generated_from_the_results():
    """README.md's headline table is `transferops bench --headline`'s output, pasted between
    its markers: regenerate it after recording a full run."""
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- headline -->\n", "\n<!-- /headline -->"
    assert start in readme and end in readme, "README.md lacks the <!-- headline --> markers"
    section = readme.split(start, 1)[1].split(end, 1)[0]
    assert section.strip() == results.headline(ROOT / "bench" / "results")


def test_results_stay_out_of_the_wheel():
    """The wheel ships python/transferops only; results live at the repository root."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]["wheel"]["packages"]
    assert mapping == {"transferops": "python/transferops"}
    assert list((ROOT / "bench" / "results").glob("*.jsonl"))
    assert not [p for p in (ROOT / "python").rglob("*") if p.suffix in (".jsonl", ".json", ".txt")]


def test_peft_demo_trains_both_side_by_side(capsys, monkeypatch):
    """The PEFT demo, tiny, its runs in this process (the adapters demo's test covers the
    child processes): with --dropout 0 the two runs match to float32 rounding; with dropout
    both runs and the ratios print."""
    import re

    from _kit import peer
    from transferops.bench import demo_peft

    peer("peft")
    peer("transformers")
    monkeypatch.setattr(demo_peft, "_in_own_process",
                        lambda run, a: demo_peft.train(run, a.steps, a.hidden, a.layers, a.dropout))
    tiny = ["--steps", "2", "--hidden", "64", "--layers", "1"]
    demo_peft.main([*tiny, "--dropout", "0"])
    out = capsys.readouterr().out
    assert float(re.search(r"max relative loss difference: (\S+)", out).group(1)) <= 1e-5, out
    demo_peft.main([*tiny, "--dropout", "0.1"])
    for text in (out, capsys.readouterr().out):
        for name in demo_peft.RUNS:
            line = next(line for line in text.splitlines() if line.strip().startswith(f"{name}:"))
            assert "ms/step" in line and "adapters' part" in line and "peak memory of the steps" in line, line
        ratios = r"ratios peft\+transferops / peft: step time \S+, peak memory \S+, adapters' part"
        assert re.search(ratios, text), text
