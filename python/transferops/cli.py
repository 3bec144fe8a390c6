"""The ``transferops`` command: info | bench | merge | rank (more land with their hot paths)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .merging import METHODS, SEMANTICS


def _info(args) -> int:
    from ._info import info

    info()
    return 0


def _bench(args) -> int:
    from .bench import results, run

    def fail(message: str) -> int:
        print(f"transferops bench: error: {message}", file=sys.stderr)
        return 2

    results_dir = args.results or results.default_results_dir()
    needs_dir = "--record" if args.record else "--headline" if args.headline else "--compare" if args.compare == [] else None
    if needs_dir and results_dir is None:
        return fail(f"{needs_dir} needs --results DIR (transferops is installed, not run from a checkout "
                    "with bench/results/)")
    try:
        if args.headline:
            print(results.headline(results_dir))
        elif args.compare is not None:
            files = args.compare or [results_dir / f"{kind}.jsonl" for kind in results.this_machine(args.device)]
            for f in files:
                if not args.compare and not f.exists():
                    return fail(f"{f}: no run of this machine kind recorded (bench --record), or give --compare FILE")
            print("\n\n".join(results.compare(f) for f in files))
        else:
            run(quick=args.quick, only=args.only, device=args.device, json_path=args.json,
                results_dir=results_dir if args.record else None)
    except results.ResultsError as e:
        return fail(str(e))
    return 0


def _size(text: str) -> int:
    """'2GB', '512MiB', '1e9' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 2GB or 512MiB, got {text!r}") from None


def _merge_config(path: str) -> dict:
    """Our YAML (method, base, models: [{path, weight}], parameters) or mergekit's
    (merge_method, base_model, models: [{model, parameters: {weight, density}}], parameters)."""
    try:
        import yaml
    except ImportError:
        raise SystemExit("transferops merge --config needs PyYAML (pip install pyyaml)") from None
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    params = dict(cfg.get("parameters") or {})
    entries = cfg.get("models") or []
    models, weights, densities = [], [], set()
    for e in entries:
        p = dict(e.get("parameters") or {})
        models.append(str(e.get("path") or e.get("model")))
        weights.append(float(e.get("weight", p.get("weight", 1.0))))
        if "density" in p:
            densities.add(float(p["density"]))
    if len(densities) > 1:
        raise SystemExit(f"{path}: per-model densities differ ({sorted(densities)}); transferops takes one")
    base = cfg.get("base") or cfg.get("base_model")
    method = cfg.get("method") or cfg.get("merge_method")
    if not base or not method or not models:
        raise SystemExit(f"{path}: expected a method (or merge_method), base (or base_model) and models")
    out = {"method": method, "base": str(base), "models": models, "weights": weights}
    if densities:
        out["density"] = densities.pop()
    for key in ("density", "lam", "sign", "semantics", "seed", "gamma", "epsilon", "scope"):
        if key in params:
            out[key] = params[key]
    if "lambda" in params:
        out["lam"] = params["lambda"]
    if cfg.get("merge_method"):  # mergekit's config: its semantics unless the file says otherwise
        if method not in ("ties", "task_arithmetic", "breadcrumbs", "breadcrumbs_ties"):
            raise SystemExit(f"{path}: mergekit's {method!r} is not reproduced yet (its DARE rescales by "
                             "L1 norm, ours by 1/density): use our config format to run ours")
        # mergekit's defaults: ties normalizes, breadcrumbs_ties does not (it sums).
        if method in ("ties", "breadcrumbs_ties") and params.get("normalize", method == "ties") is False:
            raise SystemExit(f"{path}: mergekit {method} with normalize: false (a sum of the agreeing "
                             "entries) is not reproduced yet")
        if params.get("rescale"):
            raise SystemExit(f"{path}: mergekit's rescale (to the L1 norm) is not reproduced yet")
        out.setdefault("semantics", "mergekit")
        if params.get("consensus_method") == "count":
            out["sign"] = "count"
    return out


def _merge(args) -> int:
    import time

    from .merging_models import merge_files

    cfg = _merge_config(args.config) if args.config else {}
    base = args.base or cfg.get("base")
    models = args.models or cfg.get("models") or []
    if not base or not models:
        raise SystemExit("transferops merge: give --base and at least one model (or --config)")
    kw = dict(method=args.method or cfg.get("method"), lam=args.lam if args.lam is not None else cfg.get("lam", 1.0),
              weights=args.weights or cfg.get("weights"),
              density=args.density if args.density is not None else cfg.get("density"),
              sign=args.sign or cfg.get("sign", "sum"), semantics=args.semantics or cfg.get("semantics", "peft"),
              seed=args.seed if args.seed is not None else cfg.get("seed"),
              gamma=args.gamma if args.gamma is not None else cfg.get("gamma"),
              epsilon=args.epsilon if args.epsilon is not None else cfg.get("epsilon"),
              scope=args.scope or cfg.get("scope", "tensor"))
    if not kw["method"]:
        raise SystemExit("transferops merge: --method is required")
    started, last = time.perf_counter(), [0.0]

    def progress(done, total, name):
        now = time.perf_counter()
        if args.quiet or (now - last[0] < 0.5 and done < total):
            return
        last[0] = now
        rate = done / max(now - started, 1e-9) / 1e6
        print(f"\r  merged {done / 1e6:,.0f} / {total / 1e6:,.0f} MB ({100 * done / max(total, 1):.0f}%, "
              f"{rate:,.0f} MB/s) {name[-40:]:<40}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        paths = merge_files(base, models, args.output, max_memory=args.max_memory, shard_size=args.shard_size,
                            backend=args.backend, progress=progress, **kw)
    except (ValueError, TypeError, OSError) as e:
        print(f"transferops merge: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} file(s) to {args.output} in {time.perf_counter() - started:.1f} s")
    return 0


def _load_array(path: str, what: str):
    """The array in a .npy/.npz/.pt/.safetensors file: the only one it holds, or the one named
    "features"/"labels" (``what``)."""
    import numpy as np
    import torch

    suffix = path.rsplit(".", 1)[-1].lower()
    try:
        if suffix == "npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == "npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif suffix == "pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
            arrays = obj if isinstance(obj, dict) else {what: obj}
        elif suffix == "safetensors":
            from safetensors.torch import load_file

            arrays = load_file(path)
        else:
            raise SystemExit(f"{path}: expected a .npy, .npz, .pt or .safetensors file")
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{path}: cannot read: {e}") from None
    if what in arrays:
        x = arrays[what]
    elif len(arrays) == 1:
        x = next(iter(arrays.values()))
    else:
        raise SystemExit(f"{path}: holds {sorted(arrays)}; name the array {what!r} or keep one per file")
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


RANK_SCORES = ("logme", "hscore", "hscore_shrinkage", "gbc", "transrate", "sfda", "tmi")


def _rank(args) -> int:
    import json
    import time
    from pathlib import Path

    from . import transferability as tr

    labels = _load_array(args.labels, "labels")
    scorers = {"logme": lambda f: tr.logme(f, labels, regression=args.regression, compat=args.compat),
               "hscore": lambda f: tr.hscore(f, labels), "hscore_shrinkage": lambda f: tr.hscore(f, labels, shrinkage=True),
               "gbc": lambda f: tr.gbc(f, labels), "transrate": lambda f: tr.transrate(f, labels),
               "sfda": lambda f: tr.sfda(f, labels), "tmi": lambda f: tr.tmi(f, labels)}
    wanted = args.scores or (["logme"] if args.regression else list(RANK_SCORES))
    if args.regression and set(wanted) - {"logme"}:
        raise SystemExit("transferops rank: with --regression only logme applies")
    rows = []
    try:
        for path in args.features:
            feats = _load_array(path, "features")
            row = {"model": Path(path).name, "N": int(feats.shape[0]), "D": int(feats.shape[-1])}
            for name in wanted:
                t0 = time.perf_counter()
                row[name] = float(scorers[name](feats))
                row[f"{name}_s"] = time.perf_counter() - t0
            rows.append(row)
    except (ValueError, TypeError) as e:
        print(f"transferops rank: error: {e}", file=sys.stderr)
        return 2
    rows.sort(key=lambda r: -r[wanted[0]])
    width = max(len(r["model"]) for r in rows)
    print(f"{'rank':>4}  {'model':<{width}}  " + "  ".join(f"{n:>16} {'time':>8}" for n in wanted))
    for i, r in enumerate(rows, 1):
        print(f"{i:>4}  {r['model']:<{width}}  " + "  ".join(f"{r[n]:>16.6g} {r[n + '_s'] * 1e3:>6.0f}ms" for n in wanted))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
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
    p.add_argument("--results", metavar="DIR", type=Path,
                   help="results folder of --record, --compare and --headline (default: the checkout's bench/results)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--record", action="store_true",
                      help="append the run to <results>/<machine kind>.jsonl (see bench/results/README.md)")
    mode.add_argument("--compare", nargs="*", metavar="FILE", type=Path,
                      help="print each case's last two runs side by side (default: this machine's results files)")
    mode.add_argument("--headline", action="store_true",
                      help="print the headline table of the newest full runs as Markdown (README.md's)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("merge", help="merge fine-tuned safetensors checkpoints into a base, streaming in bounded memory")
    p.add_argument("models", nargs="*", help="fine-tuned checkpoints: .safetensors files or sharded folders")
    p.add_argument("--base", help="the pretrained checkpoint the models were fine-tuned from")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
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
    p.add_argument("--max-memory", type=_size, default=_size("2GiB"), help="working-memory budget (default 2GiB)")
    p.add_argument("--shard-size", type=_size, default=_size("5GB"), help="largest output shard (default 5GB)")
    p.add_argument("--backend", default="auto", help="auto | reference | native")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_merge)

    p = sub.add_parser("rank", help="rank candidate models' features for a labeled target task by transferability")
    p.add_argument("features", nargs="+", help="one file per model: [N, D] features (.npy .npz .pt .safetensors)")
    p.add_argument("--labels", required=True, help="class ids [N] (or targets [N, K] with --regression), same formats")
    p.add_argument("--scores", nargs="+", choices=RANK_SCORES, help="default: all that apply; the first sorts")
    p.add_argument("--regression", action="store_true", help="labels are real-valued targets (LogME only)")
    p.add_argument("--compat", choices=["corrected", "official"], default="corrected",
                   help="LogME: corrected (default) or the official code's scores, defect included")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.set_defaults(func=_rank)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
