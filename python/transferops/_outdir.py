"""An output folder written safely next to untrusted or valuable files.

The folder is opened once without following a symlink and then used only through that
descriptor (``dir_fd``), so that no path component can be swapped underneath. An exclusive
``flock`` on it keeps a second writer out. Files are created with O_EXCL | O_NOFOLLOW in a
staging folder of random name made inside it with mode 0700, so nothing planted in the output
(a symlink named like a temporary file, say) is ever opened; ``commit`` removes what an
``overwrite`` replaces and renames the staged files into place with termination signals held
back, ``abort`` removes the staging folder (and the output folder, if this writer made it).
Staging folders left by a killed writer are removed by the next writer that takes the lock.

Several processes (the ranks of a merge across processes) write one output together: one of
them holds the OutputFolder and creates every file; the others reach its staging folder through
a :class:`StagingPeer`, which opens those files for writing (never creating one, following no
symlink) and checks that each is the very file created (its device and inode). A peer that
outlives the writer removes what the writer, killed, left behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import stat
import threading
import time
from pathlib import Path

STAGING = ".transferops-staging-"
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s))


class OutputError(ValueError):
    """The output folder cannot be written as asked; the message says why."""


@contextlib.contextmanager
def held_signals():
    """Run the body with SIGINT/SIGTERM/SIGHUP recorded rather than acted on, then deliver
    the first one recorded to the handler that was in place (only the main thread can)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class OutputFolder:
    """``path`` to be (re)written as a whole: an error if it is a symlink, equal to or inside
    one of ``inputs`` (real paths of files or folders read) or holding one of them, if it
    holds anything and ``overwrite`` is false, or if another writer holds it."""

    def __init__(self, path: str | os.PathLike, *, inputs=(), overwrite: bool = False):
        self.path = Path(path)
        real = Path(os.path.realpath(self.path))
        for source in inputs:
            if _inside(real, source):
                raise OutputError(f"output {self.path}: is or lies inside the input {source}; "
                                  "choose a folder apart from the models")
            if _inside(source, real):
                raise OutputError(f"output {self.path}: holds the input {source}; choose a folder apart from the models")
        self.made, self.fd, self.stage_fd, self.stage = False, None, None, None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.path)
            self.made = True
        except FileExistsError:
            pass
        except OSError as e:
            raise OutputError(f"output {self.path}: cannot create the folder: {e.strerror}") from None
        try:
            self._open(overwrite)
        except BaseException:
            self.abort()
            raise

    def _open(self, overwrite: bool) -> None:
        try:
            self.fd = os.open(self.path, _DIRECTORY)
        except OSError as e:
            why = "is a symbolic link; give the folder itself" if os.path.islink(self.path) else e.strerror
            raise OutputError(f"output {self.path}: {why}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise OutputError(f"output {self.path}: another merge is writing to this folder") from None
        entries = os.listdir(self.fd)
        for name in entries:  # left by a writer that was killed: nobody else holds the lock
            if name.startswith(STAGING):
                shutil.rmtree(name, dir_fd=self.fd)
        self.old = sorted(name for name in entries if not name.startswith(STAGING))
        if self.old and not overwrite:
            shown = ", ".join(self.old[:3]) + (", ..." if len(self.old) > 3 else "")
            raise OutputError(f"output {self.path}: the folder is not empty ({shown}); pass --overwrite "
                              "(overwrite=True) to replace its contents, or choose a new folder")
        while True:
            name = STAGING + secrets.token_hex(8)
            try:
                os.mkdir(name, 0o700, dir_fd=self.fd)
                break
            except FileExistsError:
                continue
        self.stage = name
        self.stage_fd = os.open(name, _DIRECTORY, dir_fd=self.fd)

    def create(self, name: str):
        """A new file ``name`` of the staging folder, open for binary writing."""
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=self.stage_fd)
        return os.fdopen(fd, "wb")

    def commit(self, names: list[str]) -> list[Path]:
        """Replace the folder's contents by the staged files ``names``, in that order (the
        index last, so that it never names a shard not yet in place)."""
        with held_signals():
            for name in self.old:
                if stat.S_ISDIR(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=self.fd)
                else:
                    os.unlink(name, dir_fd=self.fd)
            for name in names:
                os.rename(name, name, src_dir_fd=self.stage_fd, dst_dir_fd=self.fd)
            os.fsync(self.fd)
            self.made = False
            self._close()
        return [self.path / name for name in names]

    def abort(self) -> None:
        """Remove the staging folder, and the output folder if it was made here and is empty,
        with termination signals held back (so that the removal is not cut short: when one
        process of several fails, a launcher such as torchrun terminates the others)."""
        with held_signals():
            self._close()
            if self.made:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)

    def _close(self) -> None:
        if self.stage_fd is not None:
            os.close(self.stage_fd)
            self.stage_fd = None
        if self.stage is not None:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.stage, dir_fd=self.fd)
            self.stage = None
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


class StagingPeer:
    """Another process's way into the staging folder ``stage`` of the OutputFolder at ``path``,
    which ``made`` or not (a rank of a merge across processes; rank 0 holds the folder): the
    files the folder's writer created there, opened for writing in place."""

    def __init__(self, path: str | os.PathLike, stage: str, made: bool):
        self.path, self.stage, self.made = Path(path), stage, made
        self.fd = self.stage_fd = None
        if not stage.startswith(STAGING) or "/" in stage:
            raise OutputError(f"output {self.path}: {stage!r} is not a staging folder's name")
        try:
            self.fd = os.open(self.path, _DIRECTORY)
            self.stage_fd = os.open(stage, _DIRECTORY, dir_fd=self.fd)
        except OSError as e:
            self.close()
            raise OutputError(f"output {self.path}: cannot open the staging folder {stage} that rank 0 made: "
                              f"{e.strerror} (across hosts, the output must lie on a filesystem every rank "
                              "shares, at the same path)") from None

    def open(self, name: str, identity: tuple[int, int]):
        """File ``name`` of the staging folder, open for binary writing: the very file whose
        (device, inode) is ``identity``, neither created nor truncated here."""
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.stage_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != tuple(identity):
            os.close(fd)
            raise OutputError(f"output {self.path}: {self.stage}/{name} is not the file rank 0 created")
        return os.fdopen(fd, "wb")

    def close(self) -> None:
        for fd in (self.stage_fd, self.fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.stage_fd = None

    def abort(self, wait_s: float = 30.0) -> None:
        """Close; wait (up to ``wait_s`` seconds) until the writer has let go of the folder's
        lock, having aborted or been killed; then remove what it left, its staging folder and
        the output folder if it made it and that is empty. Waiting also keeps this process
        alive until the writer is done, so that a launcher that terminates the other processes
        once one exits (torchrun) does not cut the writer's cleanup short."""
        self.close()
        try:
            fd = os.open(self.path, _DIRECTORY)
        except OSError:  # gone: the writer removed the folder it made
            return
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return  # the writer still holds it, and removes its staging folder itself
                    time.sleep(0.02)
            with held_signals():
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(self.stage, dir_fd=fd)
                if self.made:
                    with contextlib.suppress(OSError):
                        os.rmdir(self.path)
        finally:
            os.close(fd)
