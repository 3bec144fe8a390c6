"""Benchmarks of transferops' hot paths against their floors and the peers users would use instead.

``run(quick=True)`` measures the machine's floors (copy bandwidth, GEMM rate), times every
available backend and every installed peer on the same inputs after checking that they agree
with the reference backend, prints a table and returns its rows (optionally writing JSON, or
appending the run to its machine kind's results file, :mod:`transferops.bench.results`)::

    python -c "import transferops.bench as b; b.run(quick=True)"

Each hot path is a module ``bench_<stem>`` exposing ``cases(quick, device)``; see
:mod:`transferops.bench.harness`.
"""
from .harness import HOT_PATHS, Case, run

__all__ = ["HOT_PATHS", "Case", "run"]
