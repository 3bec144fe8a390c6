"""A seeded fuzzer of checkpoint headers and shard indexes: 10,000 mutations of a valid sharded
checkpoint (JSON values, bytes, length fields, truncation, shard names pointing out of the
folder, symlinks, FIFOs), each read by the native and the Python header parsers. Each must
either raise CheckpointError or give the same tensors from files inside the folder, readable
to the end; anything else (another exception, a hang, a file outside read) fails. It runs in
a subprocess, so that a hang is a timeout, not a stuck test run."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

CASES = 10_000
BUDGET_S = 60

WEIRD = [-1, -0.0, 0, 1, 1.5, 4.9, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, None, True, False, "", "F32", "x",
         [], [1], [2, 2], [-1, 2], [0, 0], {}, {"a": 1}, [[1]], "\ud800", "é"]
NAMES = ["../outside.safetensors", "/OUTSIDE", "", ".", "sub/../a.safetensors", "a.safetensors/",
         "link.safetensors", "fifo.safetensors", "missing.safetensors", "b.safetensors", "a.safetensors",
         "dir.safetensors", 3, None, ["a"], "a.safetensors\x00", "../" * 30 + "etc/passwd"]


def _file(tensors: dict, meta=True) -> tuple[dict, bytes]:
    """A header dict and the data of ``tensors``: name -> (code, shape, itemsize)."""
    header, offset = ({"__metadata__": {"format": "pt"}} if meta else {}), 0
    for name, (code, shape, item) in tensors.items():
        n = item
        for d in shape:
            n *= d
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return header, bytes(range(256)) * (offset // 256) + bytes(offset % 256)


def _encode(header) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8", "surrogatepass")
    return raw


def _mutate_header(rng: random.Random, header: dict) -> bytes | dict:
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    kind = rng.randrange(8)
    if kind == 0 and names:  # a field's value
        e = h[rng.choice(names)]
        e[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(WEIRD)
    elif kind == 1 and names:  # a field removed or added
        e = h[rng.choice(names)]
        if rng.random() < 0.5:
            e.pop(rng.choice(list(e)), None)
        else:
            e[rng.choice(["extra", "dtype2"])] = rng.choice(WEIRD)
    elif kind == 2 and names:  # offsets moved
        e = h[rng.choice(names)]
        if isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
            e["data_offsets"][rng.randrange(2)] += rng.choice([-8, -4, -1, 1, 2, 4, 8, 2**40])
    elif kind == 3 and names:  # a shape changed
        e = h[rng.choice(names)]
        e["shape"] = [rng.choice([0, 1, 2, 3, 4, 2**32, 2**62, -1]) for _ in range(rng.randrange(4))]
    elif kind == 4:  # metadata
        h["__metadata__"] = rng.choice(WEIRD)
    elif kind == 5 and names:  # a duplicate or a weird top-level value
        if rng.random() < 0.5:
            raw = json.dumps(h)
            k = rng.choice(names)
            return raw.replace("{", "{" + json.dumps(k) + ": " + json.dumps(h[k]) + ", ", 1).encode()
        h[rng.choice(names)] = rng.choice(WEIRD)
    raw = _encode(h)
    if kind >= 6:  # bytes: flips, insertions, deletions, other encodings
        b = bytearray(raw)
        for _ in range(rng.randrange(1, 4)):
            op, i = rng.randrange(4), rng.randrange(len(b) + 1)
            if op == 0 and i < len(b):
                b[i] = rng.randrange(256)
            elif op == 1:
                b[i:i] = bytes([rng.choice(b'{}[]",:0123456789-.eE \\u\xff\xc3\x80')])
            elif op == 2:
                del b[i:i + rng.randrange(1, 8)]
            else:
                b = b.replace(b"{", b"[" * rng.randrange(1, 3000) + b"{", 1)
        raw = bytes(b) if rng.random() < 0.95 else raw.decode("utf-8", "surrogatepass").encode("utf-16")
    return raw


def _write(path: Path, rng: random.Random, header, data: bytes) -> None:
    raw = _mutate_header(rng, header) if rng.random() < 0.6 else _encode(header)
    length = len(raw)
    r = rng.random()
    if r < 0.08:
        length = rng.choice([0, 1, 7, length - 1, length + 1, len(raw) + len(data) + 1, 2**63, 2**64 - 1])
    elif r < 0.16:
        data = data[:rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + b"\0" * rng.randrange(1, 9)
    blob = struct.pack("<Q", length) + raw + data
    if rng.random() < 0.03:
        blob = blob[:rng.randrange(9)]
    path.write_bytes(blob)


def _mutate_index(rng: random.Random, index: dict) -> bytes:
    ix = json.loads(json.dumps(index))
    kind = rng.randrange(5)
    wm = ix["weight_map"]
    if kind == 0:
        wm[rng.choice(list(wm))] = rng.choice(NAMES)
    elif kind == 1:
        ix["weight_map"] = rng.choice(WEIRD + [list(wm)])
    elif kind == 2:
        wm[rng.choice(["ghost", "a.w"])] = rng.choice(NAMES)
    elif kind == 3:
        return b"[" * rng.randrange(1, 5000) + b"]" * rng.randrange(0, 5000)
    else:
        raw = bytearray(json.dumps(ix).encode())
        i = rng.randrange(len(raw))
        raw[i] = rng.randrange(256)
        return bytes(raw)
    return json.dumps(ix).encode()


SHARDS = {"a.safetensors": {"a.w": ("F32", [3, 4], 4), "a.b": ("BF16", [5], 2), "s": ("I64", [], 8)},
          "b.safetensors": {"b.w": ("F16", [2, 0, 3], 2), "b.x": ("U8", [7], 1), "b.y": ("F64", [1, 2], 8)}}
INDEX = "model.safetensors.index.json"


def _folder(root: Path, outside: Path) -> Path:
    """root/ck with what every case holds besides its shards and index: a subfolder, a link out
    of the folder, a folder and a FIFO named like shards. Made once; each case rewrites the
    shards and the index (new files: removing and making four folders a case took 40% of the
    run)."""
    folder = root / "ck"
    folder.mkdir(parents=True)
    (folder / "sub").mkdir()
    os.symlink(outside, folder / "link.safetensors")
    (folder / "dir.safetensors").mkdir()
    os.mkfifo(folder / "fifo.safetensors")
    return folder


def _case(rng: random.Random, folder: Path, outside: Path) -> Path:
    """A checkpoint ``folder`` (from _folder) with new shards and index, mutated, or its first
    shard alone."""
    for name in (*SHARDS, INDEX):  # the previous case's: new files, never ones rewritten in place
        (folder / name).unlink(missing_ok=True)
    for name, tensors in SHARDS.items():
        header, data = _file(tensors, meta=rng.random() < 0.7)
        if rng.random() < 0.5:
            _write(folder / name, rng, header, data)
        else:
            (folder / name).write_bytes(struct.pack("<Q", len(_encode(header))) + _encode(header) + data)
    index = {"metadata": {}, "weight_map": {t: f for f, ts in SHARDS.items() for t in ts}}
    if rng.random() < 0.1:
        return folder / "a.safetensors"
    raw = _mutate_index(rng, index) if rng.random() < 0.5 else json.dumps(index).encode()
    (folder / INDEX).write_bytes(raw.replace(b"/OUTSIDE", str(outside).encode()))
    return folder


def _summary(c) -> dict:
    return {name: (str(i.dtype), i.shape, str(i.path), i.start, i.nbytes, i.numel) for name, i in c.tensors.items()}


def fuzz(seed: int, cases: int, workdir: Path) -> tuple[int, int, list[str]]:
    """(accepted, refused, failures) of ``cases`` mutations."""
    from transferops._safetensors import Checkpoint, CheckpointError

    rng = random.Random(seed)
    outside = workdir / "outside.safetensors"
    header, data = _file({"a.w": ("F32", [3, 4], 4)})
    outside.write_bytes(struct.pack("<Q", len(_encode(header))) + _encode(header) + data)
    accepted = refused = 0
    failures = []
    ck = _folder(workdir / "c", outside)
    folder = os.path.realpath(ck)
    for i in range(cases):
        target = _case(rng, ck, outside)
        results = []
        for parser in ("native", "python"):
            try:
                with Checkpoint(target, parser=parser) as c:
                    for s in c.sources:
                        assert os.path.commonpath([folder, s]) == folder, f"read {s} outside {folder}"
                    for name in c.tensors:
                        c.read(name)
                    results.append(_summary(c))
            except CheckpointError as e:
                results.append(("refused", type(e).__name__))
            except Exception:
                failures.append(f"case {i} ({parser}): {traceback.format_exc()}")
                results.append(None)
        if results[0] != results[1]:
            failures.append(f"case {i}: the parsers disagree: {results[0]!r} vs {results[1]!r}")
        elif isinstance(results[0], dict):
            accepted += 1
        else:
            refused += 1
        if len(failures) > 20:
            break
    return accepted, refused, failures


@pytest.mark.slow
def test_ten_thousand_mutated_checkpoints(tmp_path):
    pytest.importorskip("transferops._native")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, str(tmp_path), "20261204", str(CASES)], capture_output=True,
                         text=True, timeout=4 * BUDGET_S)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-5000:] + res.stdout[-5000:]
    accepted, refused = map(int, res.stdout.split()[:2])
    print(f"{CASES} mutations in {elapsed:.1f} s: {accepted} accepted, {refused} refused")
    assert accepted + refused == CASES
    assert accepted > CASES // 20 and refused > CASES // 2  # the mutations reach both outcomes
    assert elapsed < BUDGET_S


def test_mutations_quick(tmp_path):
    """A few hundred of the same mutations in-process: the quick tier's share."""
    pytest.importorskip("transferops._native")
    accepted, refused, failures = fuzz(7, 300, tmp_path)
    assert not failures, "\n".join(failures[:3])
    assert accepted and refused


if __name__ == "__main__":
    accepted, refused, failures = fuzz(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[1]))
    print(accepted, refused)
    for f in failures:
        print(f, file=sys.stderr)
    sys.exit(1 if failures else 0)
