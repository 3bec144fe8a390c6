"""The ``transferops`` command: info | bench (more subcommands land with their hot paths)."""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from ._info import info

    info()
    return 0


def _bench(args) -> int:
    from .bench import run

    run(quick=args.quick, only=args.only, device=args.device, json_path=args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="transferops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="version, available backends, threads, CUDA/Triton versions")
    p.set_defaults(func=_info)

    p = sub.add_parser("bench", help="time every op on every available backend and peer, side by side")
    p.add_argument("--quick", action="store_true", help="small sizes: a run of a few minutes on a laptop-class CPU")
    p.add_argument("--only", nargs="+", metavar="PATH", help="hot paths to run (e.g. merging)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    p.add_argument("--json", metavar="FILE", help="also write the rows, machine and versions as JSON")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
