"""transferops._dist: the group argument, balanced splits, agreement naming a failed or dead rank."""
import os
import signal

import pytest
import torch

from transferops import _dist
from _ranks import run_ranks, spawn_ranks


def test_split_balanced_is_deterministic_and_within_the_largest_item():
    sizes = [7, 1, 3, 9, 2, 2, 8, 5, 4, 6]
    for parts in (1, 2, 3, 4):
        owner = _dist.split_balanced(sizes, parts)
        assert owner == _dist.split_balanced(list(sizes), parts)
        loads = [sum(s for s, o in zip(sizes, owner) if o == p) for p in range(parts)]
        assert sum(loads) == sum(sizes) and max(loads) - min(loads) <= max(sizes)
    assert _dist.split_balanced([], 3) == []
    assert _dist.split_balanced([5, 5, 5, 5], 2) == [0, 1, 0, 1]


def test_group_must_be_an_initialized_process_group():
    assert _dist.group_of(None) is None and _dist.world(None) == 1 and _dist.rank(None) == 0
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        _dist.group_of(object())


def _agreement(rank, world, scenario):
    group = torch.distributed.group.WORLD
    _dist.announce(group)
    if scenario == "killed" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    error = "disk full" if scenario == "failed" and rank == 1 else None
    try:
        for _ in range(3 if scenario == "ok" else 1):  # later calls drop the keys of earlier ones
            _dist.agree(group, error, timeout_s=30)
    except _dist.RankFailure as e:
        return str(e)
    return "ok"


def test_agree_names_the_rank_that_failed_or_died():
    assert run_ranks(_agreement, 3, "ok") == ["ok"] * 3
    assert run_ranks(_agreement, 3, "failed") == ["rank 1 failed: disk full"] * 3
    outcomes = spawn_ranks(_agreement, 3, "killed", timeout=60)
    assert outcomes[1].exitcode == -signal.SIGKILL
    for o in (outcomes[0], outcomes[2]):
        assert o.exitcode == 0 and o.value.startswith("rank 1 was lost: its process"), o
