"""Reading and writing safetensors checkpoints in bounded memory; checkpoints are untrusted.

Format: 8-byte little-endian header length, a UTF-8 JSON header mapping names to dtype, shape
and data_offsets (relative to the end of the header; the tensors tile the data exactly), then
the raw little-endian data. Headers are validated as strictly as the safetensors library does,
in time linear in their size; every shard a folder's index names must resolve (symlinks
followed) to a regular file inside the folder, or inside the ``blobs`` of a Hugging Face cache
snapshot. Files are opened non-blocking (a FIFO cannot hang the open) and read through the
descriptors checked at open, with ``os.pread`` (no mmap, so address space and page cache stay
small). Writers stream tensors into files whose headers were laid out in advance, in a
private staging folder of the output (see :mod:`transferops._outdir`).
"""
from __future__ import annotations

import errno
import gc
import itertools
import json
import math
import os
import stat
import struct
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch

from ._backend import BackendUnavailable, native_module

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {code: torch.empty(0, dtype=dtype).element_size() for code, dtype in DTYPES.items()}
INDEX = "model.safetensors.index.json"
# The safetensors library's limit on a header; indexes get the same.
MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt, unsafe or inconsistent; the message says
    which file and what is wrong."""


class TensorInfo(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offset in the file
    nbytes: int
    numel: int


def _open_regular(path: Path, what: str) -> tuple[int, int]:
    """(descriptor, size) of a regular file, opened without blocking (a FIFO or device is
    refused, not waited on) and without following a symlink as its last component."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: {what} is a symbolic link that could not be resolved") from None
        raise CheckpointError(f"{path}: cannot open {what}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: {what} is not a regular file")
    return fd, st.st_size


def _pread_exact(fd: int, n: int, offset: int, path: Path) -> bytes:
    chunks, done = [], 0
    while done < n:
        got = os.pread(fd, n - done, offset + done)
        if not got:
            raise CheckpointError(f"{path}: file ends early (truncated?)")
        chunks.append(got)
        done += len(got)
    return b"".join(chunks)


class _Duplicate(Exception):
    pass


def _object(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _count(token: str) -> int:
    """A JSON integer token that a shape or offset may hold: no sign, below 2^63."""
    if token.startswith("-"):
        raise ValueError("expected a non-negative integer, got a negative number")
    value = int(token)
    if value >= 1 << 63:
        raise ValueError("integer too large")
    return value


def strict_json(raw: bytes, path: Path, what: str, *, counts: bool = False):
    """JSON as the safetensors library reads it: UTF-8 only, no duplicate keys, no NaN or
    Infinity (``counts``: integers as in a header, non-negative and below 2^63); every
    failure (nesting deep enough to exhaust the recursion limit included) is a
    CheckpointError naming the file."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_object, parse_constant=_no_constant,
                          parse_int=_count if counts else None)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text") from None
    except _Duplicate as e:
        raise CheckpointError(f"{path}: {what} names {e.args[0]!r} twice") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, constants, integers of over 4300 digits
        raise CheckpointError(f"{path}: {what} is not valid JSON: {e}") from None


def _bad(path: Path, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt header: tensor {name!r}: {why}")


_CODES = list(DTYPES)
_KINDS = list(DTYPES.values())
_ITEMSIZES = np.array([ITEMSIZE[c] for c in _CODES], np.int64)
_KEYS = {"dtype", "shape", "data_offsets"}


def _structure_python(raw: bytes, path: Path):
    """The native ``safetensors_header``'s result, for the grammar of
    csrc/cpu/safetensors_header.h, from Python's json module (with the native module missing)."""
    header = strict_json(raw, path, "header", counts=True)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (type(meta) is dict and all(type(v) is str for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt header: __metadata__ is not an object of strings")
    dtypes, ranks, dims, offsets = [], [], [], []
    for name, h in header.items():
        try:
            name.encode()
        except UnicodeEncodeError:  # a lone surrogate from a \u escape, refused natively too
            raise CheckpointError(f"{path}: corrupt header: a tensor name holds a lone surrogate") from None
        if type(h) is not dict or h.keys() != _KEYS:
            raise _bad(path, name, "expected an object with exactly dtype, shape and data_offsets")
        code, shape, offs = h["dtype"], h["shape"], h["data_offsets"]
        if type(code) is not str or code not in DTYPES:
            raise _bad(path, name, f"unsupported dtype {code!r}")
        if type(shape) is not list or not all(type(d) is int for d in shape):
            raise _bad(path, name, f"shape {shape!r} is not an array of integers")
        if type(offs) is not list or len(offs) != 2 or not all(type(o) is int for o in offs):
            raise _bad(path, name, f"data_offsets {offs!r} are not [begin, end]")
        dtypes.append(_CODES.index(code))
        ranks.append(len(shape))
        dims += [1, *shape]
        offsets += offs
    return (list(header), np.array(dtypes, np.int32), np.array(ranks, np.int64), np.array(dims, np.int64),
            np.array(offsets, np.int64), meta)


def _parse_header(fd: int, size: int, path: Path, real: Path, native: bool) -> dict[str, TensorInfo]:
    if size < 8:
        raise CheckpointError(f"{path}: corrupt header: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", _pread_exact(fd, 8, 0, path))
    if n > min(size - 8, MAX_HEADER):
        # The length itself is not printed: on a file that is not a checkpoint it is content.
        raise CheckpointError(f"{path}: corrupt header: not a safetensors file (its header length exceeds "
                              f"the file's {size} bytes or the {MAX_HEADER}-byte limit)")
    raw = _pread_exact(fd, n, 8, path)
    if not raw.startswith(b"{"):
        raise CheckpointError(f"{path}: corrupt header: not a safetensors file (the header is not a JSON object)")
    if native:
        try:
            structure = native_module().safetensors_header(raw, _CODES)
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt header: {e}") from None
    else:
        structure = _structure_python(raw, path)
    return _tensors(path, real, 8 + n, size - 8 - n, *structure[:-1])


def _tensors(path: Path, real: Path, base: int, data: int, names, dtypes, ranks, dims, offsets) -> dict[str, TensorInfo]:
    """TensorInfos from a header's structure, checked in whole-array operations: each shape
    needs exactly its data_offsets' bytes and the tensors tile the data. ``dims`` holds a 1
    and then the shape for each tensor (so that no product is over an empty segment)."""
    count = len(names)
    if count == 0:
        if data:
            raise CheckpointError(f"{path}: corrupt header: no tensors, but {data} bytes of data")
        return {}
    begins, ends = offsets[0::2], offsets[1::2]
    marks = np.concatenate(([0], np.cumsum(ranks + 1)[:-1]))
    itemsize = _ITEMSIZES[dtypes]
    # A float64 product first: an int64 one could wrap (a zero dim makes both zero).
    fits = np.multiply.reduceat(dims.astype(np.float64), marks) * itemsize <= float(1 << 62)
    numel = np.multiply.reduceat(np.where(np.repeat(fits, ranks + 1), dims, 0), marks)
    bad = np.flatnonzero(~fits | (begins > ends) | (numel * itemsize != ends - begins) | (ends > data))
    if bad.size:
        i = int(bad[0])
        shape, offs = dims[marks[i] + 1:marks[i] + 1 + ranks[i]].tolist(), [int(begins[i]), int(ends[i])]
        if begins[i] > ends[i]:
            raise _bad(path, names[i], f"data_offsets {offs} are not [begin, end] with begin <= end")
        if ends[i] > data:
            raise _bad(path, names[i], f"data_offsets {offs} reach past the data's {data} bytes (file truncated?)")
        raise _bad(path, names[i], f"shape {shape} {_CODES[dtypes[i]]} does not fit data_offsets {offs}")
    # The tensors must tile the data: sorted by offsets, each begins where the previous ends.
    order = np.lexsort((ends, begins))
    b, e = begins[order], ends[order]
    gaps = np.flatnonzero(b != np.concatenate(([0], e[:-1])))
    if gaps.size:
        raise CheckpointError(f"{path}: corrupt header: tensor {names[int(order[gaps[0]])]!r} overlaps another or "
                              "leaves a gap before it")
    if int(e[-1]) != data:
        raise CheckpointError(f"{path}: corrupt header: the tensors cover {int(e[-1])} of the data's {data} bytes "
                              "(truncated or padded?)")
    # Millions of small tuples: the cyclic collector would rescan them all again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        dim_list = dims.tolist()
        shapes = [tuple(dim_list[m + 1:m + 1 + r]) for m, r in zip(marks.tolist(), ranks.tolist())]
        return dict(zip(names, map(TensorInfo._make, zip(
            names, [_KINDS[d] for d in dtypes.tolist()], shapes, itertools.repeat(real, count),
            (begins + base).tolist(), (ends - begins).tolist(), numel.tolist()))))
    finally:
        if collecting:
            gc.enable()


def _allowed_roots(folder: Path) -> list[str]:
    """Where a folder's shards may live: inside it, or for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>``, whose files link to ``../../blobs``), in its blobs."""
    real = os.path.realpath(folder)
    roots = [real]
    if folder.parent.name == "snapshots":
        roots.append(os.path.realpath(folder.parent.parent / "blobs"))
    return roots


def _shard_path(folder: Path, name, roots: list[str], where: str) -> Path:
    """The real path of shard ``name`` of ``folder`` (named by ``where``): a relative path
    that resolves inside ``roots``."""
    if type(name) is not str or not name or "\0" in name:
        raise CheckpointError(f"{where}: shard file {name!r} is not a file name")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{where}: shard file {name!r} lies outside {folder}")
    real = os.path.realpath(folder / rel)
    if not any(os.path.commonpath([root, real]) == root for root in roots):
        raise CheckpointError(f"{where}: shard file {name!r} links outside {folder}")
    return Path(real)


def read_small(folder: Path, name: str, what: str, limit: int) -> bytes:
    """The whole of file ``name`` of checkpoint folder ``folder`` (at most ``limit`` bytes), found
    and opened as a shard is."""
    fd, size = _open_regular(_shard_path(folder, name, _allowed_roots(folder), str(folder)), what)
    try:
        if size > limit:
            raise CheckpointError(f"{folder / name}: {what} is over {limit} bytes")
        return _pread_exact(fd, size, 0, folder / name)
    finally:
        os.close(fd)


class Checkpoint:
    """A safetensors file, or a folder of shards with ``model.safetensors.index.json`` (or a
    folder holding a single ``*.safetensors``), read lazily. ``sources`` holds the real paths
    it reads (for the caller to keep outputs away from them). ``parser``: "native" (C++),
    "python" (the json module, the same rules; slower) or "auto" (native where built)."""

    def __init__(self, path: str | os.PathLike, *, parser: str = "auto"):
        self.path = Path(path)
        if parser not in ("auto", "native", "python"):
            raise ValueError(f"parser: expected 'auto', 'native' or 'python', got {parser!r}")
        if parser == "native" and native_module() is None:
            raise BackendUnavailable("parser='native' needs the native module, which is not built")
        self._native = parser == "native" or (parser == "auto" and native_module() is not None)
        self._fds: dict[Path, int] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        self.sources = {Path(os.path.realpath(self.path)), *self._fds}

    def _load(self) -> None:
        if self.path.is_dir():
            index = self.path / INDEX
            roots = _allowed_roots(self.path)
            if os.path.lexists(index):
                doc = strict_json(read_small(self.path, INDEX, "the shard index", MAX_HEADER), index, "the shard index")
                weight_map = doc.get("weight_map") if type(doc) is dict else None
                if type(weight_map) is not dict:
                    raise CheckpointError(f"{index}: expected an object with a \"weight_map\" object mapping tensor "
                                          "names to shard files")
                where = f"{index}: weight_map"
                wrong = next((t for t, f in weight_map.items() if type(f) is not str), None)
                if wrong is not None:
                    raise CheckpointError(f"{where}: tensor {wrong!r} maps to {weight_map[wrong]!r}, not a file name")
                files = {name: _shard_path(self.path, name, roots, where) for name in set(weight_map.values())}
            else:
                found = sorted(e.name for e in os.scandir(self.path) if e.name.endswith(".safetensors"))
                if len(found) != 1:
                    raise CheckpointError(f"{self.path}: expected {INDEX} or exactly one *.safetensors, "
                                          f"found {len(found)} .safetensors files")
                weight_map, files = None, {found[0]: _shard_path(self.path, found[0], roots, str(self.path))}
            for name, real in sorted(files.items()):
                tensors = self._add(real, self.path / name)
                for t in tensors if weight_map is not None else ():
                    if weight_map.get(t) != name:
                        raise CheckpointError(f"{self.path / name}: tensor {t!r} is not mapped to this shard in {INDEX}")
            if weight_map is not None and len(weight_map) != len(self.tensors):
                missing = sorted(set(weight_map) - set(self.tensors))[:3]
                raise CheckpointError(f"{self.path}: tensors listed in {INDEX} but absent from the shards: {missing}")
        elif os.path.exists(self.path):
            self._add(Path(os.path.realpath(self.path)), self.path)
        else:
            raise CheckpointError(f"{self.path}: no such file or folder")

    def _add(self, real: Path, shown: Path) -> dict[str, TensorInfo]:
        """Parse the file at ``real`` (named ``shown`` in messages) and add its tensors."""
        if real in self._fds:
            raise CheckpointError(f"{shown}: the same file is named twice")
        fd, size = _open_regular(real, "shard" if shown != self.path else "checkpoint")
        self._fds[real] = fd
        tensors = _parse_header(fd, size, shown, real, self._native)
        if not self.tensors.keys().isdisjoint(tensors):
            t = next(t for t in tensors if t in self.tensors)
            raise CheckpointError(f"{shown}: tensor {t!r} is also in {self.tensors[t].path}")
        self.tensors.update(tensors)
        return tensors

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of tensor ``name`` in flat order, as a new 1-D tensor."""
        info = self.tensors[name]
        itemsize = info.dtype.itemsize
        count = info.numel - start if count is None else count
        out = torch.empty(count, dtype=info.dtype)
        view = memoryview(out.view(torch.uint8).numpy()) if count else memoryview(b"")
        offset, done, fd = info.start + start * itemsize, 0, self._fds[info.path]
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


def write_safetensors(f, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as one safetensors file (as PEFT saves one: metadata format=pt)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)) + raw)
    for t in tensors.values():
        f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    f.flush()
    os.fsync(f.fileno())


class ShardedWriter:
    """Writes tensors, in a fixed order announced up front, into shards of at most
    ``shard_bytes`` (one tensor never splits) plus an index when there is more than one shard,
    all created in ``folder``'s staging area; ``commit`` moves them into place and ``abort``
    removes them, so a failed merge leaves no partial checkpoint.

    Several processes may write one checkpoint: one creates the files (``made`` None), whose
    :meth:`identities` the others pass as ``made``, with the same plan, size and metadata, and
    a :class:`transferops._outdir.StagingPeer` as ``folder``; they then open those files and
    write their tensors in place (headers and sizes already there), and ``close`` them when
    done, before the first commits."""

    def __init__(self, folder, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_bytes: int,
                 metadata: dict[str, str], *, made: dict[str, tuple[int, int]] | None = None):
        self.folder = folder
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and used + nbytes > shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, shape, nbytes))
            used += nbytes
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.files, self.where, self.weight_map, self.total = [], {}, {}, 0
        try:
            self._lay_out(shards, metadata, made)
        except BaseException:
            for f in self.files:
                f.close()
            raise

    def _lay_out(self, shards: list, metadata: dict[str, str], made) -> None:
        """Open each shard's file (created, with its header and its space reserved, where ``made``
        is None) and note where each tensor goes."""
        folder = self.folder
        for i, shard in enumerate(shards):
            header, offset = {"__metadata__": metadata}, 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                self.weight_map[name] = self.names[i]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            base = 8 + len(raw)
            for name, dtype, shape, nbytes in shard:
                self.where[name] = (i, base + header[name]["data_offsets"][0], nbytes, dtype)
            self.total += offset
            if made is not None:
                self.files.append(folder.open(self.names[i], made[self.names[i]]))
                continue
            f = folder.create(self.names[i])
            self.files.append(f)
            f.write(struct.pack("<Q", len(raw)) + raw)
            try:  # reserve the space now, so that a full disk fails here, before any work
                os.posix_fallocate(f.fileno(), 0, base + offset)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise OSError(e.errno, f"{folder.path / self.names[i]}: cannot reserve {base + offset} bytes: "
                                           f"{e.strerror}") from None
                f.truncate(base + offset)

    def identities(self) -> dict[str, tuple[int, int]]:
        """(device, inode) of each shard file, for the writers of other processes (``made``)."""
        return {name: (st.st_dev, st.st_ino) for name, st in zip(self.names, (os.fstat(f.fileno()) for f in self.files))}

    def write(self, name: str, start_element: int, data: torch.Tensor) -> None:
        """Write ``data`` (flat, of the tensor's dtype) at element ``start_element`` of ``name``."""
        i, offset, nbytes, dtype = self.where[name]
        if data.dtype != dtype:
            raise TypeError(f"{name}: writing {data.dtype} into a {dtype} tensor")
        raw = data.contiguous().view(torch.uint8).numpy() if data.numel() else b""
        pos = offset + start_element * data.element_size()
        if pos + len(raw) > offset + nbytes:
            raise ValueError(f"{name}: write past the tensor's end")
        view, fd = memoryview(raw).cast("B"), self.files[i].fileno()
        while view:  # one pwrite moves at most about 2 GB
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n

    def close(self) -> None:
        """Flush every shard to disk and close it."""
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def commit(self, extra: list[str] = ()) -> list[Path]:
        """Flush every shard, write the index, and move them all, with the ``extra`` files
        staged beside them, into the output folder (the index last)."""
        self.close()
        names = self.names + list(extra)
        if len(self.names) > 1:
            with self.folder.create(INDEX) as f:
                f.write(json.dumps({"metadata": {"total_size": self.total}, "weight_map": self.weight_map},
                                   indent=2).encode())
            names.append(INDEX)
        return self.folder.commit(names)

    def abort(self) -> None:
        for f in self.files:
            f.close()
        self.folder.abort()
