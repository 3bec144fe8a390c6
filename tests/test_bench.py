"""The benchmark harness: a benchmark of a wrong answer must be flagged, and results must be
written whole."""
import json

import pytest
import torch

from transferops.bench import harness


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

    demo_adapters.main(["--steps", "3"])
    out = capsys.readouterr().out
    for name in ("transferops", "eager"):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{name}:"))
        assert "ms/step" in line and "saved for backward" in line and "peak memory of the steps" in line, line
