"""merge_files(group=) and ``torchrun ... transferops merge`` across ranks: every file of the
output equals, byte for byte, the one one process writes (shards, index, metadata, model
files), for per-tensor and model-wide trims, random masks, streamed chunks and several shards;
and the merge is atomic across ranks: a rank that raises or is killed makes every other rank
fail naming it, and no output folder or staging file is left."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from _ranks import run_ranks, spawn_ranks
from transferops import _topk
from transferops._dist import RankFailure
from transferops.merging_models import _chunks, _streamed_select, merge_files

# Each case, merged by one process and by 2 and 3 ranks: per-tensor and model-wide trims (the
# paper's zero-vote sign summed across ranks), breadcrumbs' two selects, DARE's masks seeded by
# the tensor's name, mergekit's rescale, a tensor-wise method, tiny chunks and several shards.
STREAMED = 1 << 14  # max_memory: chunks of 1024 elements, so the embeddings come in 3
CASES = {
    "ties_shards": dict(method="ties", density=0.4, weights=[0.7, 0.5], shard_size=16 << 10),
    "ties_global": dict(method="ties", density=0.3, scope="global", semantics="paper", max_memory=STREAMED,
                        shard_size=24 << 10),
    "ties_streamed": dict(method="ties", density=0.3, max_memory=STREAMED),
    "breadcrumbs_global": dict(method="breadcrumbs", density=0.5, gamma=0.05, scope="global", max_memory=STREAMED),
    "dare": dict(method="dare_ties", density=0.6, seed=5, max_memory=STREAMED, shard_size=16 << 10),
    "dare_rescaled": dict(method="dare_linear", density=0.5, seed=9, semantics="mergekit", max_memory=STREAMED),
    "task_arithmetic": dict(method="task_arithmetic", weights=[0.6, 0.3], lam=0.8),
    "linear": dict(method="linear", weights=[0.2, 0.3, 0.5]),  # no base: the models alone
}


def _inputs(llamas, method: str):
    return (None, llamas) if method == "linear" else (llamas[0], llamas[1:])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _merge_cases(rank, world, llamas, root):
    for name, kw in CASES.items():
        merge_files(*_inputs(llamas, kw["method"]), root / name, group=torch.distributed.group.WORLD, **kw)


@pytest.fixture(scope="module")
def alone(llamas, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("alone")
    for name, kw in CASES.items():
        merge_files(*_inputs(llamas, kw["method"]), root / name, **kw)
    return root


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_write_what_one_process_writes_bit_for_bit(llamas, alone, tmp_path, world):
    run_ranks(_merge_cases, world, llamas, tmp_path, timeout=120)
    for name in CASES:
        ours, want = _files(tmp_path / name), _files(alone / name)
        assert sorted(ours) == sorted(want), name
        assert all(ours[f] == want[f] for f in want), (name, [f for f in want if ours[f] != want[f]])
    shards = [f for f in _files(alone / "ties_shards") if f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in _files(alone / "ties_shards"), shards


class _Threads:
    """Two ranks as threads of this process: ``total`` sums through a barrier."""

    def __init__(self):
        self.barrier, self.parts = threading.Barrier(2), [None, None]

    def rank(self, r: int):
        threads = self

        class Rank:
            world = 2

            def total(self, t):
                threads.parts[r] = t.clone()
                threads.barrier.wait()
                t.copy_(threads.parts[0] + threads.parts[1])
                threads.barrier.wait()
                return t
        return Rank()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_select_over_chunks_spread_across_ranks_equals_the_native_one(gen, dtype):
    """The radix select on summed counts (a sampled guess of the top bits first, over 2^20
    keys and more; then a wrong guess) gives the native select's thresholds and tie cuts, with
    every tie kept or cut, the chunks dealt to two ranks at random."""
    n, T = 3 << 19, 2
    q = lambda: (torch.randint(-8, 9, (n,), generator=gen) / 8).to(dtype)  # noqa: E731 (many ties)
    base = q()
    models = [base + q() * 0.1 for _ in range(T)]
    pieces = [([lambda s, c, m=m: m[s:s + c] for m in models], lambda s, c: base[s:s + c], s, c)
              for s, c in _chunks(n, 300_000)]
    mine = torch.randint(0, 2, (len(pieces),), generator=gen).bool().tolist()
    native = _streamed_select("native", pieces, n, T, torch.float32, torch.device("cpu"))
    threads = _Threads()
    selects = [_streamed_select("native", pieces, n, T, torch.float32, torch.device("cpu"), threads.rank(r),
                                [m == (r == 0) for m in mine]) for r in range(2)]
    for k, keep_ties in [(1, False), (n // 5, False), (n // 2, True), (n - 7, False)]:
        got = [None, None]
        workers = [threading.Thread(target=lambda r=r: got.__setitem__(r, selects[r](k, keep_ties))) for r in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert got[0] == got[1] == [tuple(x) for x in native(k, keep_ties)], (k, keep_ties)
    wrong = _topk.NATIVE._replace(guess=lambda k: (12, torch.tensor([5, 5])))
    starts = [s for *_, s, c in pieces]

    def chunks():
        for model_reads, base_read, s, c in pieces:
            yield s, lambda s=s, c=c, model_reads=model_reads, base_read=base_read: (
                [read(s, c).view(1, -1) for read in model_reads], base_read(s, c).view(1, -1))
    select = _topk.radix(chunks, n, T, torch.float32, torch.device("cpu"), wrong, 16,
                         _topk.Shared(starts, lambda t: t))
    assert [(float(a), float(b), int(c)) for a, b, c in select(n // 3, False)] == \
        [tuple(x) for x in native(n // 3, False)]


def _message(call) -> str:
    try:
        call()
    except RankFailure as e:
        return str(e)
    return "no failure"


def _failing(rank, world, llamas, root):
    """Three merges in which rank 1 alone fails: at the start (a model it cannot open), inside
    the model-wide select (a read error), and in the CLI in the middle of the merge. Each
    rank's RankFailure messages, and the CLI's exit status and stderr."""
    from transferops import _safetensors
    from transferops.cli import main

    group = torch.distributed.group.WORLD
    models = [llamas[1], root / "missing"] if rank == 1 else llamas[1:]
    out = [_message(lambda: merge_files(llamas[0], models, root / "start" / "out", method="ties", density=0.5,
                                        group=group))]
    read = _safetensors.Checkpoint.read

    def failing_read(self, name, start=0, count=None):
        if rank == 1 and "mlp" in name:
            raise OSError(errno.EIO, "Input/output error", str(self.path))
        return read(self, name, start, count)

    _safetensors.Checkpoint.read = failing_read
    out.append(_message(lambda: merge_files(llamas[0], llamas[1:], root / "select" / "out", method="ties",
                                            density=0.3, scope="global", max_memory=STREAMED, group=group)))
    os.environ["WORLD_SIZE"] = str(world)  # as torchrun sets it: the CLI merges on the group
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["merge", "--method", "ties", "--density", "0.5", "--base", str(llamas[0]),
                     *map(str, llamas[1:]), "-o", str(root / "cli" / "out"), "-q"])
    return out + [(code, stderr.getvalue())]


def test_a_rank_that_raises_fails_every_rank_naming_it_and_leaves_nothing(llamas, tmp_path):
    for parent in ("start", "select", "cli"):
        (tmp_path / parent).mkdir()
    results = run_ranks(_failing, 3, llamas, tmp_path, timeout=120)
    for start, select, (code, stderr) in results:
        assert start.startswith("rank 1 failed: ") and "missing: no such file or folder" in start, start
        assert select.startswith("rank 1 failed: ") and "Input/output error" in select, select
        assert code == 2 and "transferops merge: error: rank 1 failed: " in stderr, stderr
        assert "Traceback" not in stderr and "Input/output error" in stderr
    for parent in ("start", "select", "cli"):
        assert list((tmp_path / parent).rglob("*")) == [], parent


def _killed(rank, world, llamas, root, victim, at):
    """A merge whose rank ``victim`` is SIGKILLed once it has written its first tensor
    (``at="write"``), or, rank 0, once it has made the output folder and its shard files,
    before it shares their names (``at="start"``)."""
    from transferops import _safetensors

    if rank == victim:
        method = "write" if at == "write" else "__init__"
        original = getattr(_safetensors.ShardedWriter, method)

        def then_die(self, *args, **kwargs):
            original(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        setattr(_safetensors.ShardedWriter, method, then_die)
    return _message(lambda: merge_files(llamas[0], llamas[1:], root / "out", method="ties", density=0.4,
                                        shard_size=16 << 10, group=torch.distributed.group.WORLD))


@pytest.mark.parametrize("world,victim,at", [(3, 1, "write"), (2, 0, "write"), (2, 0, "start")],
                         ids=["rank1_of_3", "rank0_of_2", "rank0_of_2_at_start"])
def test_a_killed_rank_fails_the_others_naming_it_and_leaves_nothing(llamas, tmp_path, world, victim, at):
    """Killed, rank 0 (which holds the output folder) leaves its staging folder, and the
    output folder it made, to a survivor to remove."""
    outcomes = spawn_ranks(_killed, world, llamas, tmp_path, victim, at, timeout=90)
    assert outcomes[victim].exitcode == -signal.SIGKILL
    for o in outcomes:
        if o.rank != victim:
            assert o.exitcode == 0 and o.value.startswith(f"rank {victim} was lost: its process"), o
    assert list(tmp_path.rglob("*")) == []


def test_torchrun_cli_writes_what_one_process_writes_and_loads(llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    from transferops.cli import main

    models = "".join(f"  - model: {p}\n    parameters: {{weight: 0.6, density: 0.4}}\n" for p in llamas[1:])
    config = tmp_path / "config.yml"
    config.write_text(f"merge_method: ties\nbase_model: {llamas[0]}\nmodels:\n{models}dtype: bfloat16\n")
    bin_ = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    run = subprocess.run([str(bin_ / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
                          str(bin_ / "transferops"), "merge", "--config", str(config), "-o", str(tmp_path / "ranks"),
                          "--shard-size", "24KB", "-q"], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "by 2 ranks" in run.stdout
    assert main(["merge", "--config", str(config), "-o", str(tmp_path / "alone"), "--shard-size", "24KB", "-q"]) == 0
    ours, want = _files(tmp_path / "ranks"), _files(tmp_path / "alone")
    assert sorted(ours) == sorted(want) and "model.safetensors.index.json" in want
    assert all(ours[f] == want[f] for f in want), [f for f in want if ours[f] != want[f]]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ranks").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "alone").state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


KILL_RANK_1 = """import os, signal, sys
from transferops import _safetensors
from transferops.cli import main
if os.environ["RANK"] == "1":  # SIGKILLed once it has written its first tensor
    write = _safetensors.ShardedWriter.write
    def write_then_die(self, *args):
        write(self, *args)
        os.kill(os.getpid(), signal.SIGKILL)
    _safetensors.ShardedWriter.write = write_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_cli_with_a_killed_rank_exits_non_zero_naming_it_and_leaves_nothing(llamas, tmp_path):
    """Under torchrun the agent stops the survivor (SIGTERM) when rank 1 dies: it removes its
    output and says why."""
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    run = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                          str(script), "merge", "--method", "ties", "--density", "0.4", "--base", str(llamas[0]),
                          *map(str, llamas[1:]), "-o", str(tmp_path / "out"), "--shard-size", "24KB", "-q"],
                         env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    # Stopped by the agent, or (had it seen the loss first) by its own agreement
    assert re.search(r"transferops merge: (interrupted by SIGTERM \(|error: )rank 1 was lost: its process",
                     run.stderr), run.stderr
    assert list(tmp_path.iterdir()) == [script]
