"""Reading and writing safetensors checkpoints in bounded memory.

Readers parse the header and read byte ranges with ``os.pread`` (no mmap, so address-space
limits and page cache stay small); writers stream tensors into a file whose header was laid
out in advance, under a temporary name renamed into place only when complete.
Format: 8-byte little-endian header length, a JSON header mapping names to dtype, shape and
data_offsets (relative to the end of the header), then the raw little-endian data.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt or inconsistent; the message says which."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _read_header(path: Path) -> tuple[dict, int, dict]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 << 20:
                raise CheckpointError(f"{path}: corrupt header length {n} (file has {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    return header, 8 + n, meta


def _file_tensors(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    header, base, meta = _read_header(path)
    size = path.stat().st_size
    out = {}
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            begin, end = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r}: bad header entry {h!r}") from None
        itemsize = torch.tensor([], dtype=dtype).element_size()
        if end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize or begin < 0 or base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {begin}..{end} do not fit its "
                                  f"shape {shape} {h['dtype']} or the file's {size} bytes (truncated?)")
        out[name] = TensorInfo(name, dtype, shape, path, base + begin, end - begin)
    return out, meta


class Checkpoint:
    """A safetensors file, or a folder of shards with ``model.safetensors.index.json`` (or a
    folder holding a single ``*.safetensors``), read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            index = self.path / INDEX
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError) as e:
                    raise CheckpointError(f"{index}: cannot read the shard index: {e}") from None
                files = sorted(set(weight_map.values()))
            else:
                files = sorted(p.name for p in self.path.glob("*.safetensors"))
                if len(files) != 1:
                    raise CheckpointError(f"{self.path}: expected {INDEX} or exactly one *.safetensors, "
                                          f"found {len(files)} .safetensors files")
                weight_map = None
            self.tensors: dict[str, TensorInfo] = {}
            for f in files:
                if not (self.path / f).exists():
                    raise CheckpointError(f"{self.path}: shard {f} named in {INDEX} is missing")
                tensors, _ = _file_tensors(self.path / f)
                for name, info in tensors.items():
                    if weight_map is not None and weight_map.get(name) != f:
                        raise CheckpointError(f"{self.path / f}: tensor {name!r} is not mapped to this shard in {INDEX}")
                    self.tensors[name] = info
            if weight_map is not None and set(weight_map) != set(self.tensors):
                missing = sorted(set(weight_map) - set(self.tensors))[:3]
                raise CheckpointError(f"{self.path}: tensors listed in {INDEX} but absent from the shards: {missing}")
        elif self.path.is_file():
            self.tensors, _ = _file_tensors(self.path)
        else:
            raise CheckpointError(f"{self.path}: no such file or folder")
        self._fds: dict[Path, int] = {}

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of tensor ``name`` in flat order, as a new 1-D tensor."""
        info = self.tensors[name]
        itemsize = info.nbytes // max(info.numel, 1) if info.numel else 1
        count = info.numel - start if count is None else count
        fd = self._fds.get(info.path)
        if fd is None:
            fd = self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        out = torch.empty(count, dtype=info.dtype)
        view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        offset, done = info.start + start * itemsize, 0
        while done < count * itemsize:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{info.path}: tensor {name!r} ends early (file truncated?)")
            done += n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardedWriter:
    """Writes tensors, in a fixed order announced up front, into shards of at most
    ``shard_bytes`` (one tensor never splits) plus an index when there is more than one shard.
    Everything goes to temporary names in ``out_dir``; ``commit`` renames them into place and
    ``abort`` removes them, so a failed merge leaves no partial checkpoint."""

    def __init__(self, out_dir: str | os.PathLike, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 shard_bytes: int, metadata: dict[str, str]):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.tensor([], dtype=dtype).element_size()
            if shards[-1] and used + nbytes > shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, shape, nbytes))
            used += nbytes
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files, self.where, self.weight_map, self.total = [], {}, {}, 0
        for i, shard in enumerate(shards):
            header, offset = {"__metadata__": metadata}, 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                self.weight_map[name] = self.names[i]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            tmp = self.out_dir / f".{self.names[i]}.partial"
            f = open(tmp, "wb")
            f.write(struct.pack("<Q", len(raw)) + raw)
            self.files.append((f, tmp))
            base = 8 + len(raw)
            for name, dtype, shape, nbytes in shard:
                self.where[name] = (i, base + header[name]["data_offsets"][0], nbytes, dtype)
            self.total += offset
            try:  # reserve the space now, so that a full disk fails here, before any work
                os.posix_fallocate(f.fileno(), 0, base + offset)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    self.abort()
                    raise OSError(e.errno, f"{tmp}: cannot reserve {base + offset} bytes: {e.strerror}") from None
                f.truncate(base + offset)

    def write(self, name: str, start_element: int, data: torch.Tensor) -> None:
        """Write ``data`` (flat, of the tensor's dtype) at element ``start_element`` of ``name``."""
        i, offset, nbytes, dtype = self.where[name]
        if data.dtype != dtype:
            raise TypeError(f"{name}: writing {data.dtype} into a {dtype} tensor")
        raw = data.contiguous().view(torch.uint8).numpy().tobytes() if data.numel() else b""
        pos = offset + start_element * data.element_size()
        if pos + len(raw) > offset + nbytes:
            raise ValueError(f"{name}: write past the tensor's end")
        f = self.files[i][0]
        f.seek(pos)
        f.write(raw)

    def commit(self) -> list[Path]:
        for f, _ in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        paths = []
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            tmp = self.out_dir / f".{INDEX}.partial"
            tmp.write_text(json.dumps(index, indent=2))
            self.files.append((None, tmp))
            self.names.append(INDEX)
        for (_, tmp), name in zip(self.files, self.names):
            os.replace(tmp, self.out_dir / name)
            paths.append(self.out_dir / name)
        return paths

    def abort(self) -> None:
        for f, tmp in self.files:
            if f is not None and not f.closed:
                f.close()
            tmp.unlink(missing_ok=True)
