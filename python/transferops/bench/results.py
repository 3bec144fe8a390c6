"""Benchmark results as data: one JSON Lines file per machine kind, appended to by every
recorded run, read back by ``transferops bench --compare`` and ``--headline``.

A run appends one ``run`` line (its whole metadata) and one ``row`` line per timed callable to
``<results>/<machine kind>.jsonl``; every row line repeats the run's id, date, commit, mode,
machine and versions, so it reads alone. The fields, and how a machine kind is named, are
described in bench/results/README.md of the repository.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from collections import defaultdict
from pathlib import Path

import torch

import transferops

from .harness import HOT_PATHS, _fmt_ratio, _fmt_time, run_meta

# What a row line must hold for --compare and --headline to read it.
ROW_KEYS = ("run", "date", "quick", "machine_kind", "hot_path", "op", "size", "backend_or_peer", "kind",
            "device", "dtype", "p50")
CASE_KEY = ("op", "size", "backend_or_peer", "dtype", "device")  # one timed callable of one case
HEADLINE_OPS_PER_HOT_PATH = 2


class ResultsError(Exception):
    """A results file that is missing, empty or malformed; the message names the file (and line)."""


def _slug(text: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz' -> 'intel-xeon-platinum-8480'."""
    text = re.sub(r"\((r|tm)\)|@.*|\b\d+-core\b|\b(cpu|processor)\b", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def machine_kind(meta: dict, device: str) -> str:
    """The results file's stem for ``device``'s rows of a run with metadata ``meta`` (run_meta()):
    ``cuda-<GPU name>`` for CUDA rows; for CPU rows ``cpu-<CPU model>-<cores>core-<isa>``, the
    ISA being the one the native CPU kernels ran (``transferops info``'s native_cpu_isa: the best
    this build compiled and this CPU runs), ``nonative`` where the native module did not load."""
    if device.startswith("cuda"):
        return "cuda-" + _slug(meta["devices"][device])
    machine, isa = meta["machine"], meta["transferops_info"]["native_cpu_isa"] or "nonative"
    return f"cpu-{_slug(machine['cpu'])}-{machine['cores']}core-{isa}"


def this_machine(device: str | None = None) -> list[str]:
    """The machine kinds of this machine's runs: its CPU's, and its GPU's where CUDA is present
    (``device`` keeps one of them)."""
    devices = [device] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    meta = run_meta(devices, quick=False)
    return [machine_kind(meta, d) for d in devices]


def checkout_root() -> Path | None:
    """The git checkout of transferops to record into: the one this transferops is imported from
    (an editable install), else the working directory where it is one (a wheel installed from
    the checkout one works in); None otherwise."""
    package = Path(transferops.__file__).resolve().parent
    for root in (package.parents[1], Path.cwd().resolve()):
        if (root / "python" / "transferops" / "__init__.py").is_file() and (root / ".git").exists():
            return root
    return None


def default_results_dir() -> Path | None:
    """bench/results/ of the checkout, or None when transferops is not run from one."""
    root = checkout_root()
    return root / "bench" / "results" if root else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes to tracked files) of the checkout; (None, None) outside one."""
    root = checkout_root()

    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    if root is None:
        return None, None
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def run_id(date: str, commit: str | None) -> str:
    """'2026-12-04T21:32:00+00:00', '126d19a...' -> '2026-12-04T213200Z-126d19a'."""
    stamp = date[:19].replace(":", "") + "Z"
    return f"{stamp}-{commit[:7]}" if commit else stamp


def run_lines(rows: list[dict], meta: dict, hot_paths: list[str | None], *, run: str, commit: str | None,
              dirty: bool | None) -> dict[str, list[dict]]:
    """{machine kind: [run line, row lines...]} of one run; ``hot_paths[i]`` is ``rows[i]``'s
    hot path (None for the floors)."""
    common = {"run": run, "date": meta["date"], "commit": commit, "dirty": dirty, "quick": meta["quick"]}
    out: dict[str, list[dict]] = defaultdict(list)
    for row, hot_path in zip(rows, hot_paths):
        kind = machine_kind(meta, row["device"])
        out[kind].append({"record": "row", **common, "machine_kind": kind, "hot_path": hot_path, **row,
                          "machine": meta["machine"], "device_name": meta["devices"][row["device"]],
                          "versions": meta["versions"]})
    for kind, lines in out.items():
        lines.insert(0, {"record": "run", **common, "machine_kind": kind, "rows": len(lines),
                         "hot_paths": sorted({r["hot_path"] for r in lines if r["hot_path"]}), "meta": meta})
    return dict(out)


def append(path: Path, lines: list[dict]) -> None:
    """Append ``lines`` to ``path`` in one write to a file opened with O_APPEND: a reader (or a
    killed run) sees all of them or none; a short write is cut back off."""
    data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        written = os.write(fd, data)
        if written != len(data):
            os.ftruncate(fd, start)
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes), not recorded")
        os.fsync(fd)
    finally:
        os.close(fd)


def record(rows: list[dict], meta: dict, hot_paths: list[str | None], results_dir: str | Path) -> list[Path]:
    """Append a run to its machine kinds' files in ``results_dir``; returns the files."""
    commit, dirty = git_state()
    paths = []
    for kind, lines in run_lines(rows, meta, hot_paths, run=run_id(meta["date"], commit), commit=commit,
                                 dirty=dirty).items():
        paths.append(Path(results_dir) / f"{kind}.jsonl")
        append(paths[-1], lines)
    return paths


def read(path: str | Path) -> list[dict]:
    """The lines of a results file, checked; ResultsError names the file and the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e.strerror or e}") from None
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ResultsError(f"{path}:{n}: malformed line: {e}") from None
        why = None
        if not isinstance(obj, dict) or obj.get("record") not in ("run", "row"):
            why = 'expected an object with "record": "run" or "row"'
        elif obj["record"] == "row" and (missing := [k for k in ROW_KEYS if k not in obj]):
            why = f"a row without {', '.join(missing)}"
        elif obj["record"] == "row" and not isinstance(obj["p50"], (int, float)):
            why = "p50 is not a number"
        if why:
            raise ResultsError(f"{path}:{n}: malformed line: {why}")
        lines.append(obj)
    if not any(line["record"] == "row" for line in lines):
        raise ResultsError(f"{path}: holds no rows")
    return lines


def _columns(table: list[tuple[str, ...]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in table]


def compare(path: str | Path) -> str:
    """Each case's last two runs in ``path`` side by side: p50 before and after, the change of
    the p50, and the ratio to the best peer before and after. Cases are grouped by their pair
    of runs (in the file's order, which is the order they were recorded in); a case timed once
    shows no change."""
    rows = [line for line in read(path) if line["record"] == "row"]
    history: dict[tuple, list[dict]] = {}
    for r in rows:
        runs = history.setdefault(tuple(r[k] for k in CASE_KEY), [])
        if runs and runs[-1]["run"] == r["run"]:
            runs[-1] = r  # a case repeated within a run: its last row
        else:
            runs.append(r)
    groups: dict[tuple, list[tuple]] = {}
    for case, runs in history.items():
        before, after = (runs[-2] if len(runs) > 1 else None), runs[-1]
        groups.setdefault((before and before["run"], after["run"]), []).append((before, after))
    order = {run: i for i, run in enumerate(dict.fromkeys(r["run"] for r in rows))}
    out = [str(path)]
    def when(r: dict) -> str:
        return f"{r['run']} ({r['date']}, {'quick' if r['quick'] else 'full'})"

    for (run_a, run_b), pairs in sorted(groups.items(), key=lambda g: (order[g[0][1]], order.get(g[0][0], -1))):
        a, b = pairs[0]
        out.append(f"\n{when(a)} -> {when(b)}" if a else f"\n{when(b)}, timed once")
        table = [("op", "size", "backend", "dtype", "device", "p50 before", "p50 after", "change",
                  "vs peer before", "vs peer after")]
        for a, b in pairs:
            table.append((b["op"], b["size"], b["backend_or_peer"], b["dtype"], b["device"],
                          _fmt_time(a["p50"]) if a else "-", _fmt_time(b["p50"]),
                          f"{100 * (b['p50'] / a['p50'] - 1):+.1f}%" if a else "-",
                          _fmt_ratio(a.get("ratio_to_best_peer")) if a else "-", _fmt_ratio(b.get("ratio_to_best_peer"))))
        out += _columns(table, right={5, 6, 7, 8, 9})
    return "\n".join(out)


def _case_bytes(r: dict) -> int:
    """The least bytes the case reads and writes (the harness's Case.bytes), from a row's GB/s."""
    return round((r.get("gbps") or 0.0) * r["p50"] * 1e9)


def headline_rows(results_dir: str | Path) -> list[dict]:
    """The headline figures, chosen by rule from the full runs of every results file:

    * per hot path and device, its newest full run (quick false);
    * per op in it, its largest case (the most bytes the op must read and write) among those
      timing a transferops backend and a peer that agrees with the expected result; transferops'
      figure is its fastest backend but the reference (the readable spec, not a hot path), the
      peer's the fastest agreeing peer (as the harness's ratio);
    * per hot path and device, the HEADLINE_OPS_PER_HOT_PATH ops whose largest case is largest.

    Among equal sizes the bench's order decides (its first case). Returns dicts {op, size (with
    the dtype), ours, ours_p50, peer, peer_p50, ratio, machine_kind, run, date, bytes, hot_path} in
    the harness's HOT_PATHS order, then largest first.
    """
    files = sorted(Path(results_dir).glob("*.jsonl"))
    if not files:
        raise ResultsError(f"{results_dir}: no results files (*.jsonl)")
    # "dist" times transferops against itself on fewer ranks, no peer: docs/distributed.md has its table
    rows = [r for f in files for r in read(f) if r["record"] == "row" and not r["quick"] and r["hot_path"]
            and r["hot_path"] != "dist" and r["kind"] in ("ours", "peer") and r.get("matches") is not False]
    newest: dict[tuple, str] = {}
    for r in rows:  # dates are UTC ISO 8601: they sort as text
        key = (r["hot_path"], r["device"])
        newest[key] = max(newest.get(key, ""), r["date"] + " " + r["run"])
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        if newest[(r["hot_path"], r["device"])] == r["date"] + " " + r["run"]:
            cases.setdefault((r["hot_path"], r["device"], r["op"], r["size"], r["dtype"]), []).append(r)
    best_of_op: dict[tuple, dict] = {}
    for (hot_path, device, op, size, dtype), here in cases.items():
        ours = [r for r in here if r["kind"] == "ours" and r["backend_or_peer"] != "reference"]
        peers = [r for r in here if r["kind"] == "peer"]
        if not ours or not peers:
            continue
        a, b = min(ours, key=lambda r: r["p50"]), min(peers, key=lambda r: r["p50"])
        entry = {"op": op, "size": size if dtype in size.split() else f"{size} {dtype}",
                 "ours": a["backend_or_peer"], "ours_p50": a["p50"], "peer": b["backend_or_peer"].removeprefix("peer:"),
                 "peer_p50": b["p50"], "ratio": b["p50"] / a["p50"], "machine_kind": a["machine_kind"],
                 "run": a["run"], "date": a["date"][:10], "bytes": _case_bytes(a), "hot_path": hot_path}
        key = (hot_path, device, op)
        if key not in best_of_op or entry["bytes"] > best_of_op[key]["bytes"]:
            best_of_op[key] = entry
    chosen = []
    for hot_path, device in dict.fromkeys(k[:2] for k in best_of_op):
        ops = [e for k, e in best_of_op.items() if k[:2] == (hot_path, device)]
        chosen += sorted(ops, key=lambda e: -e["bytes"])[:HEADLINE_OPS_PER_HOT_PATH]
    rank = {stem: i for i, stem in enumerate(HOT_PATHS)}
    return sorted(chosen, key=lambda e: (rank.get(e["hot_path"], len(rank)), -e["bytes"]))


def headline(results_dir: str | Path) -> str:
    """headline_rows() as the Markdown table README.md holds between its headline markers."""
    chosen = headline_rows(results_dir)
    if not chosen:
        raise ResultsError(f"{results_dir}: no full run compares transferops with a peer")
    out = ["| op | size | transferops | best peer | ratio | machine |", "|---|---|---|---|---|---|"]
    for e in chosen:
        out.append(f"| {e['op']} | {e['size']} | {_fmt_time(e['ours_p50'])} ({e['ours']}) | "
                   f"{_fmt_time(e['peer_p50'])} ({e['peer']}) | {_fmt_ratio(e['ratio'])} | {e['machine_kind']} |")
    runs = ", ".join(dict.fromkeys(f"{e['hot_path']} {e['date']}" for e in chosen))
    caption = (f"Median times of the newest full run (not `--quick`) of each hot path: {runs}. Best peer: "
               "the fastest other implementation timed on the same inputs that agrees with the reference "
               "(a peer library, eager torch, or one call per model for a batched op). Ratio: the "
               "best peer's time over transferops' (above 1: transferops is faster). Machine: CPU, cores and "
               "the ISA the native kernels ran, the results file bench/results/<machine>.jsonl. Generated by "
               "`transferops bench --headline`.")
    return "\n".join(out + [""] + textwrap.wrap(caption, 95, break_on_hyphens=False))
