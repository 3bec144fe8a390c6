"""The ``transferops`` command: info | bench | merge | rank (more land with their hot paths)."""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from pathlib import Path

# Only the standard library and torch-free modules at the top: --help and a mistyped command
# answer without importing torch (~1 s); each command imports what it runs.
from ._mergenames import METHODS, SEMANTICS


class CLIError(ValueError):
    """A user's mistake: printed as one ``error:`` line, exit status 2 (a ValueError, so that
    ``python -m transferops.cli``, where this module is __main__ and cli_rank raises the class
    of the module imported by name, reports it the same)."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised where the program is so that cleanup runs as for Ctrl-C."""


_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _info(args) -> int:
    from ._info import info

    info()
    return 0


def _bench(args) -> int:
    if args.dry_run:
        if args.device == "cuda":
            raise CLIError("--dry-run runs the GPU cases on the CPU: drop --device cuda")
        if args.record or args.compare is not None or args.headline or args.report:
            raise CLIError("--dry-run times nothing worth keeping: it takes no --record, --compare, --headline "
                           "or --report")
        # Before transferops.kernels is imported: Triton decides at decoration time.
        os.environ["TRITON_INTERPRET"] = "1"
    from .bench import harness, results, run

    if args.report:
        harness.report([str(f) for f in args.report], json_path=args.json)
        return 0
    results_dir = args.results or results.default_results_dir()
    needs_dir = "--record" if args.record else "--headline" if args.headline else "--compare" if args.compare == [] else None
    if needs_dir and results_dir is None:
        raise CLIError(f"{needs_dir} needs --results DIR (transferops is installed, not run from a checkout "
                    "with bench/results/)")
    try:
        if args.headline:
            print(results.headline(results_dir))
        elif args.compare is not None:
            files = args.compare or [results_dir / f"{kind}.jsonl" for kind in results.this_machine(args.device)]
            for f in files:
                if not args.compare and not f.exists():
                    raise CLIError(f"{f}: no run of this machine kind recorded (bench --record), or give --compare FILE")
            print("\n\n".join(results.compare(f) for f in files))
        else:
            run(quick=args.quick, only=args.only, device=args.device, json_path=args.json,
                results_dir=results_dir if args.record else None, dry_run=args.dry_run)
    except results.ResultsError as e:
        raise CLIError(str(e))
    except harness.DryRunError as e:
        print(f"transferops bench: {e}", file=sys.stderr)
        return 1
    return 0


def _size(text: str) -> int:
    """'2GB', '512MiB', '1e9' -> a positive whole number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        value = math.nan
    if not (math.isfinite(value) and 1 <= value < 2**63):
        raise argparse.ArgumentTypeError(f"expected a positive size like 2GB or 512MiB, got {text!r}")
    return int(value)


def _merge_adapters(args) -> int:
    """``merge --adapters``: PEFT LoRA adapter folders into one (PEFT's add_weighted_adapter)."""
    import torch

    from .merging_adapters import merge_adapters

    other = {"MODELS": args.models, "--base": args.base, "--config": args.config, "--method": args.method,
             "--lam": args.lam, "--semantics": args.semantics, "--gamma": args.gamma, "--epsilon": args.epsilon,
             "--scope": args.scope, "--dtype": args.dtype, "--tokenizer-source": args.tokenizer_source,
             "--device": args.device}
    wrong = [flag for flag, value in other.items() if value]
    if wrong:
        raise CLIError(f"--adapters: {', '.join(wrong)} apply to whole models, not to adapters")
    if not args.combination_type or not args.weights:
        raise CLIError("--adapters needs --combination-type and --weights (one per adapter)")
    paths = merge_adapters(args.adapters, args.output, combination_type=args.combination_type, weights=args.weights,
                           density=args.density, majority_sign_method={"sum": "total", "count": "frequency"}[
                               args.sign or "sum"], svd_rank=args.svd_rank, svd_clamp=args.svd_clamp,
                           seed=args.seed, dtype=getattr(torch, args.out_dtype) if args.out_dtype else None,
                           overwrite=args.overwrite, backend=args.backend)
    print(f"wrote {len(paths)} file(s) to {args.output}")
    return 0


def _merge(args) -> int:
    if args.adapters:
        return _merge_adapters(args)
    if args.combination_type or args.svd_rank is not None or args.svd_clamp is not None:
        raise CLIError("--combination-type, --svd-rank and --svd-clamp apply to --adapters only")
    import time

    import torch

    from . import _dist, _mergeconfig
    from .merging_models import merge_files

    kw = _mergeconfig.load(args.config) if args.config else {}
    # Flags given on the command line override the config's values.
    flags = {"method": args.method, "lam": args.lam, "weights": args.weights, "density": args.density,
             "sign": args.sign, "semantics": args.semantics, "seed": args.seed, "gamma": args.gamma,
             "epsilon": args.epsilon, "scope": args.scope, "tokenizer_source": args.tokenizer_source,
             "dtype": getattr(torch, args.dtype) if args.dtype else None,
             "out_dtype": getattr(torch, args.out_dtype) if args.out_dtype else None,
             "base": args.base, "models": args.models or None}
    kw.update({k: v for k, v in flags.items() if v is not None})
    if not kw.get("models"):
        raise CLIError("give --base and at least one model (or --config)")
    if not kw.get("method"):
        raise CLIError("--method is required")
    per_tensor = ("weights", "density", "gamma", "epsilon", "lam", "sign", "semantics", "seed")
    if "tensor_args" in kw and any(flags[k] is not None for k in per_tensor):
        raise CLIError("--config gives per-tensor values (gradients or filters): set the method's arguments in "
                       f"the config, not as flags ({', '.join('--' + k for k in per_tensor if flags[k] is not None)})")
    base, models = kw.pop("base", None), kw.pop("models")
    # Under torchrun (WORLD_SIZE > 1) the ranks merge together; rank 0 alone speaks, of its share.
    ours = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    group = _dist.process_group(args.device or "cpu")
    first, world = _dist.rank(group) == 0, _dist.world(group)
    started, last = time.perf_counter(), [0.0]

    def progress(done, total, name):
        now = time.perf_counter()
        if args.quiet or not first or (now - last[0] < 0.5 and done < total):
            return
        last[0] = now
        rate = done / max(now - started, 1e-9) / 1e6
        share = " of rank 0's share" if world > 1 else ""
        print(f"\r  merged {done / 1e6:,.0f} / {total / 1e6:,.0f} MB{share} ({100 * done / max(total, 1):.0f}%, "
              f"{rate:,.0f} MB/s) {name[-40:]:<40}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    paths = merge_files(base, models, args.output, max_memory=args.max_memory, shard_size=args.shard_size,
                        overwrite=args.overwrite, backend=args.backend, device=args.device or "cpu",
                        progress=progress, group=group, **kw)
    if group is not None and ours:  # else gloo's threads may abort the interpreter's exit (SIGABRT); a
        torch.distributed.destroy_process_group()  # failure keeps the group: _run's exit needs its store
    if first:
        ranks = f" by {world} ranks" if world > 1 else ""
        print(f"wrote {len(paths)} file(s) to {args.output}{ranks} in {time.perf_counter() - started:.1f} s")
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
    p.add_argument("--json", metavar="FILE",
                   help="also write the rows, machine and versions as JSON (rewritten after each case)")
    p.add_argument("--dry-run", action="store_true",
                   help="the GPU check's cases at tiny sizes on the CPU, Triton in its interpreter, each timed "
                        "once: checks that they run (a warning fails it), not how fast (docs/gpu.md)")
    p.add_argument("--results", metavar="DIR", type=Path,
                   help="results folder of --record, --compare and --headline (default: the checkout's bench/results)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--record", action="store_true",
                      help="append the run to <results>/<machine kind>.jsonl (see bench/results/README.md)")
    mode.add_argument("--compare", nargs="*", metavar="FILE", type=Path,
                      help="print each case's last two runs side by side (default: this machine's results files)")
    mode.add_argument("--headline", action="store_true",
                      help="print the headline table of the newest full runs as Markdown (README.md's)")
    mode.add_argument("--report", nargs="+", metavar="FILE", type=Path,
                      help="print runs' --json files as one report, with the GPU bars (with --json: write them "
                           "as one file)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("merge", help="merge fine-tuned safetensors checkpoints into a base, streaming in bounded memory")
    p.add_argument("models", nargs="*", help="fine-tuned checkpoints: .safetensors files or sharded folders")
    p.add_argument("--base", help="the pretrained checkpoint the models were fine-tuned from")
    p.add_argument("-o", "--output", required=True,
                   help="output folder: new or empty (see --overwrite), apart from the inputs; written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder's contents as a whole")
    p.add_argument("--method", help=" | ".join(METHODS))
    p.add_argument("--density", type=float, help="fraction kept by the trim (all but task_arithmetic)")
    p.add_argument("--gamma", type=float, help="breadcrumbs: fraction of the largest magnitudes dropped (default 0.01)")
    p.add_argument("--lam", type=float, help="scale of the merged task vector (default 1.0)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model")
    p.add_argument("--sign", choices=["sum", "count"], help="TIES sign election rule (default sum)")
    p.add_argument("--semantics", choices=SEMANTICS, help="which anchor TIES reproduces (default peft)")
    p.add_argument("--seed", type=int, help="DARE/DELLA random seed")
    p.add_argument("--epsilon", type=float, help="della: keep probabilities spread density -/+ epsilon by rank")
    p.add_argument("--scope", choices=["tensor", "global"],
                   help="top-k threshold per tensor (default) or over the whole model (TIES paper)")
    p.add_argument("--config", help="YAML config: ours, or mergekit's for the methods both have")
    p.add_argument("--adapters", nargs="+", metavar="FOLDER",
                   help="PEFT LoRA adapter folders to merge into one adapter (instead of --base and models)")
    p.add_argument("--combination-type", metavar="TYPE",
                   help="with --adapters: PEFT's linear | cat | svd | ties | ties_svd | dare_ties | ...")
    p.add_argument("--svd-rank", type=int, help="with --adapters, svd types: the merged rank (default: largest)")
    p.add_argument("--svd-clamp", type=float, help="with --adapters, svd types: quantile clamping A and B")
    p.add_argument("--dtype", choices=_DTYPES, help="dtype the inputs are merged in (default: their own)")
    p.add_argument("--out-dtype", choices=_DTYPES, help="dtype written (default: --dtype, else the base's)")
    p.add_argument("--tokenizer-source", metavar="FOLDER", help="where the tokenizer files come from (default: base)")
    p.add_argument("--max-memory", type=_size, default=_size("2GiB"), help="working-memory budget (default 2GiB)")
    p.add_argument("--shard-size", type=_size, default=_size("5GB"), help="largest output shard (default 5GB)")
    p.add_argument("--backend", default="auto", help="auto | reference | native | triton")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="where the chunks are merged (default cpu); cuda: on the GPU, by the Triton kernels")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_merge)

    from .cli_rank import add_parser as add_rank_parser

    add_rank_parser(sub)

    args = parser.parse_args(argv)
    return _run(args)


def _run(args) -> int:
    """``args.func(args)`` with a user's mistake as one ``error:`` line and exit status 2, and
    SIGINT/SIGTERM/SIGHUP as one line and 128 + the signal's number, after the command has
    cleaned up (a merge removes its partial output)."""
    import signal

    from ._mergeconfig import ConfigError

    def interrupt(signum, frame):
        raise Interrupted(signum)

    own = threading.current_thread() is threading.main_thread()
    names = [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]
    previous = {s: signal.signal(getattr(signal, s), interrupt) for s in names} if own else {}
    prog = f"transferops {args.command}"
    try:
        return args.func(args)
    except (CLIError, ConfigError, ValueError, TypeError, OSError) as e:
        text = str(e) if not isinstance(e, OSError) or e.filename is None else f"{e.filename}: {e.strerror}"
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a rank under torchrun failed: every rank prints it and exits 2 together
        dist = sys.modules.get("transferops._dist")  # loaded by any command that has ranks
        if dist is None or not isinstance(e, dist.RankFailure):
            raise
        return dist.failed(f"{prog}: error: {e}")
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.args[0] if isinstance(e, Interrupted) else signal.SIGINT
        dist = sys.modules.get("transferops._dist")  # under torchrun: a dead peer is why, if any
        why = "".join(f" ({lost})" for lost in (dist.lost() if dist is not None else []))
        print(f"{prog}: interrupted by {signal.Signals(signum).name}{why}", file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(getattr(signal, s), handler)


if __name__ == "__main__":
    sys.exit(main())
