"""merge_files across the ranks of a torch.distributed group (``group=``, or ``torchrun ...
transferops merge``): each rank merges a disjoint share of the tensors, balanced by bytes, and
the checkpoint written is the one a single process writes, bit for bit.

The shard layout is planned up front exactly as one process plans it (transferops._safetensors.
ShardedWriter): rank 0 holds the output folder (lock, staging folder; transferops._outdir) and
creates every shard file with its header; the others open those files in its staging folder
(through a StagingPeer: no file created, no symlink followed, each checked to be the file rank 0
made) and write their tensors in place. A model-wide threshold (``scope="global"``) comes from
a radix select whose histograms, tie counts and sample are summed across the ranks
(transferops._topk.Shared), the paper's zero-vote sign from summed sign counts; everything
else about a tensor (DARE's and DELLA's masks, seeded by its name; its own top-k) is the
tensor's alone.

The work runs in steps, each ending with an agreement (transferops._dist.agree): a rank that
raises tells the others to stop (they look between tensors) and every rank then raises
RankFailure naming the ranks that failed or died; a collective runs only after such an
agreement, so that no rank waits in one for a peer that has failed. Rank 0 commits only after
the last step's agreement; on failure every rank aborts, and a rank that outlives a killed
rank 0 removes the staging folder it left: no output appears unless every rank succeeded.
"""
from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import torch

from . import _dist
from ._outdir import OutputError, OutputFolder, StagingPeer
from ._safetensors import ShardedWriter

_jobs: dict[tuple[int, ...], itertools.count] = {}  # merges run per group (its ranks), alike on each


class _Stopped(Exception):
    """A peer has failed: this rank's part of the step is abandoned."""


class Ranks:
    """The ranks of ``group`` that run one merge together (``group`` None: this process
    alone, where every method is trivial)."""

    def __init__(self, group):
        self.group = _dist.group_of(group)
        self.rank, self.world = _dist.rank(self.group), _dist.world(self.group)
        self._mine: set[str] | None = None
        if self.world > 1:
            _dist.announce(self.group)
            dist = torch.distributed
            ranks = tuple(dist.get_global_rank(self.group, r) for r in range(self.world))
            job = next(_jobs.setdefault(ranks, itertools.count()))
            key = f"transferops/merge/{'-'.join(map(str, ranks))}/{job}"
            self._stop_key, self._stage_key = f"{key}/stopped", f"{key}/stage"
            self._nccl = dist.get_backend(self.group) == "nccl"

    def assign(self, sizes: dict[str, int]) -> None:
        """Share out the tensors (name -> bytes), balanced by bytes, the same on every rank."""
        owners = _dist.split_balanced(list(sizes.values()), self.world)
        self._mine = {name for name, owner in zip(sizes, owners) if owner == self.rank}

    def owns(self, name: str) -> bool:
        return self.world == 1 or name in self._mine

    @contextlib.contextmanager
    def step(self):
        """Run the body, then agree: on every rank, return if it succeeded on all, else raise
        RankFailure naming the ranks that failed (chained to this rank's own exception) or
        died. An interrupt (KeyboardInterrupt, the CLI's SIGTERM) only tells the others to
        stop, and propagates unwaited."""
        if self.world == 1:
            yield
            return
        try:
            yield
        except _Stopped:
            _dist.agree(self.group, None)  # raises: the rank that stopped us reports its failure there
            # (or, interrupted, is found gone); never let a step cut short pass for done
            raise _dist.RankFailure("stopped by a peer that then reported no failure") from None
        except _dist.RankFailure:
            raise
        except Exception as e:
            self._stop()
            try:
                _dist.agree(self.group, _dist.reason(e))
            except _dist.RankFailure as failure:
                raise failure from e
        except BaseException:
            self._stop()
            raise
        _dist.agree(self.group, None)

    def _stop(self) -> None:
        # Through the rendezvous store, which a failed peer's collectives cannot block; best
        # effort: the agreement that follows tells every rank anyway, only later.
        with contextlib.suppress(Exception):
            _dist.store().set(self._stop_key, str(torch.distributed.get_rank()))

    def poll(self) -> None:
        """Raise _Stopped (inside a step) if a peer has failed."""
        if self.world > 1 and _dist.store().check([self._stop_key]):
            raise _Stopped

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks in place, once every rank has reached this point (see
        transferops._topk.Shared): a rank that failed before it fails them all instead of
        leaving them waiting in the collective."""
        _dist.agree(self.group, None)
        if self._nccl and t.device.type == "cpu":  # NCCL reduces on the GPU only
            return t.copy_(_dist.all_sum(t.to(torch.cuda.current_device()), self.group))
        return _dist.all_sum(t, self.group)

    def count(self, n: int) -> int:
        """The integer ``n`` summed over the ranks (as :meth:`total`)."""
        return int(self.total(torch.tensor([n], dtype=torch.int64))[0]) if self.world > 1 else n

    def post_stage(self, stage: str, made: bool) -> None:
        """Rank 0: record the staging folder it has just made, before anything else can fail,
        so that a rank outliving it removes the folder even if it dies before :meth:`share`."""
        if self.world > 1:
            _dist.store().set(self._stage_key, f"{int(made)}{stage}")

    def posted_stage(self) -> tuple[str, bool] | None:
        """The staging folder rank 0 posted (its name, and whether rank 0 made the output
        folder), or None."""
        if self.world == 1 or not _dist.store().check([self._stage_key]):
            return None
        posted = _dist.store().get(self._stage_key).decode()
        return posted[1:], posted[0] == "1"

    def share(self, obj):
        """Rank 0's ``obj`` on every rank (a collective)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(self.group, 0),
                                                group=self.group)
        return box[0]


class Output:
    """merge_files' output folder written by the ranks together: rank 0's OutputFolder and
    ShardedWriter, whose files the other ranks open to write their tensors (one process: the
    folder and writer alone). Construct it on every rank (inside a step), then :meth:`open`
    on every rank (a collective, inside the next), :meth:`finish` once this rank's tensors are
    written, :meth:`commit` after the agreement that ends that step, :meth:`abort` on failure."""

    def __init__(self, ranks: Ranks, path, *, inputs, overwrite: bool, plan, shard_size: int, metadata: dict):
        self.ranks, self.path = ranks, Path(path)
        self.layout = (plan, shard_size, metadata)
        self.folder = self.writer = self.peer = None
        if ranks.rank == 0:
            self.folder = OutputFolder(path, inputs=inputs, overwrite=overwrite)
            try:
                ranks.post_stage(self.folder.stage, self.folder.made)
                self.writer = ShardedWriter(self.folder, plan, shard_size, metadata)
            except BaseException:
                self.folder.abort()
                raise

    def open(self) -> ShardedWriter:
        """This rank's writer: rank 0's own; on the others, one of the same layout writing into
        rank 0's files, found in its staging folder, whose name rank 0 shares."""
        if self.ranks.world == 1:
            return self.writer
        found = self.ranks.share(None if self.folder is None else
                                 (self.folder.stage, self.folder.made, self.writer.identities()))
        if self.writer is None:
            stage, made, identities = found
            self.peer = StagingPeer(self.path, stage, made)
            self.writer = ShardedWriter(self.peer, *self.layout, made=identities)
        return self.writer

    def finish(self) -> None:
        """This rank's tensors are written: the other ranks' go to disk now, before rank 0
        commits (rank 0's go at the commit)."""
        if self.ranks.rank != 0:
            self.writer.close()

    def commit(self, extra: list[str]) -> list[Path]:
        """Rank 0 writes the index and moves every file into place; the paths written, on
        every rank (the others raise RankFailure if rank 0 fails to commit)."""
        if self.ranks.world == 1:
            return self.writer.commit(extra)
        if self.ranks.rank == 0:
            try:
                paths = self.writer.commit(extra)
            except BaseException as e:
                self.ranks.share((None, _dist.reason(e)))
                raise
            # Committed: the output is complete whatever becomes of a peer that has reported
            # success (one gone by now fails the broadcast, which it no longer waits on).
            with contextlib.suppress(RuntimeError):
                self.ranks.share((paths, None))
            return paths
        paths, why = self.ranks.share(None)
        if why is not None:
            raise _dist.RankFailure(f"rank 0 failed: {why}")
        return paths

    def abort(self) -> None:
        """Remove what this rank staged: rank 0 the staging folder (and the output folder if
        it made it); another rank closes its files, and removes the staging folder that rank
        0 left if rank 0 is gone (found by the name rank 0 posted, when it died before sharing
        its files)."""
        if self.writer is not None:
            self.writer.abort()  # its folder's abort: rank 0's OutputFolder, or a StagingPeer
        elif self.peer is not None:
            self.peer.abort()
        elif self.folder is not None:
            self.folder.abort()
        elif (posted := self.ranks.posted_stage()) is not None:
            with contextlib.suppress(OutputError):  # rank 0 removed it: nothing left to open
                StagingPeer(self.path, *posted).abort()
