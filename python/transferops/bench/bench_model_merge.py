"""A whole model merged from one mergekit YAML both ways, each in a fresh process, as a user runs
them: ``transferops merge --config`` against ``mergekit-yaml`` (its defaults: CPU, no lazy
unpickling, one writer). TIES of three fine-tunes into a LLaMA-style bf16 base built with
transformers (random init, no downloads); each fine-tune is the base plus a random change of 5%
of each tensor's mean magnitude to every entry, its own seed. Checkpoints are saved sharded with
their config.json and cached (--cache), so reruns reuse them.

Each side's wall time, CPU time (user + sys of the child, os.wait4: a shared machine's
neighbours stretch the wall time far more than the CPU time) and peak resident memory, then
whether the two outputs agree. mergekit computes in the YAML's ``dtype`` (bfloat16), rounding
every step; transferops forms task vectors in float32 and rounds once. So the outputs differ by a
few bf16 units in the last place (ulps), and by more only at entries whose fate that rounding
decides: near a trim's cut (ties at it included), or an election whose weighted sum is near
zero. The check leaves those out and bounds the difference elsewhere (``agreement``).

    python -m transferops.bench.bench_model_merge [--quick] [--record] [--results DIR] [--cache DIR]

Full: 374M parameters (hidden 1024, intermediate 2816, 24 layers, vocabulary 32000, untied
head); quick: 20M. ``--record`` appends the run to bench/results/<machine kind>.jsonl, as
``transferops bench --record`` does (rows of kind ``demo``: out of the headline).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .harness import Row, run_meta

SIZES = {  # LlamaConfig keyword arguments, and the shard size of save_pretrained
    "full": ({"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16,
              "vocab_size": 32000}, "200MB"),
    "quick": ({"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
               "vocab_size": 32000}, "16MB"),
}
WEIGHTS = (0.7, 0.6, 0.5)
DENSITY = 0.6  # one for all three models
CHANGE = 0.05  # a fine-tune's change of each entry, in units of its tensor's mean magnitude
SEED = 0
BAND = 2**-7  # relative: bf16 rounds to 2^-8, twice that is a margin
# How far the outputs may differ off the fragile entries (see agreement), in bf16 ulps: the 374M
# run reached 4; on the quick model, one weight off by 0.05 or the density off by 0.02 gives ~500.
ULPS = 8


def checkpoints(cache: Path, mode: str) -> list[Path]:
    """[base, fine-tune 1, 2, 3] folders under ``cache``, made on the first call. One model and a
    copy of its base state are in memory at a time; each folder appears whole (renamed in place)."""
    kwargs, shard = SIZES[mode]
    folder = cache / ("llama-h{hidden_size}-i{intermediate_size}-l{num_hidden_layers}-a{num_attention_heads}"
                      "-v{vocab_size}".format(**kwargs) + f"-change{CHANGE}-seed{SEED}")
    paths = [folder / name for name in ("base", "ft1", "ft2", "ft3")]
    if all(p.is_dir() for p in paths):
        return paths
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**kwargs, tie_word_embeddings=False)).to(torch.bfloat16)
    state = model.state_dict()  # shares the parameters' storage: writing it changes the model
    base = {k: v.clone() for k, v in state.items()}
    for i, path in enumerate(paths):
        if path.is_dir():  # made by an earlier, interrupted call
            continue
        if i:  # each fine-tune from the base, with its own seed
            g = torch.Generator().manual_seed(SEED + i)
            for k, b in base.items():
                b = b.float()
                state[k].copy_(b + CHANGE * b.abs().mean() * torch.randn(b.shape, generator=g))
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size=shard)
        tmp.rename(path)
    return paths


def config_yaml(paths: list[Path]) -> str:
    models = "".join(f"  - model: {p}\n    parameters: {{weight: {w}, density: {DENSITY}}}\n"
                     for p, w in zip(paths[1:], WEIGHTS))
    return (f"merge_method: ties\nbase_model: {paths[0]}\nmodels:\n{models}"
            "parameters: {normalize: true}\ndtype: bfloat16\n")


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` (output to ``log``); its wall seconds, and its own CPU seconds and peak
    resident memory from os.wait4 (getrusage(RUSAGE_CHILDREN) would fold in every earlier child).
    Linux carries the peak of the memory a child replaces at exec into its own: a child of this
    process reports at least this process's peak, which must therefore stay below the child's."""
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped above, not by Popen
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit status {p.returncode}; its output:\n{log.read_text()[-4000:]}")
    if ru.ru_maxrss <= floor:
        raise RuntimeError(f"{cmd[0]}: its peak RSS ({ru.ru_maxrss} kB) is not above this process's own "
                           f"({floor} kB), which it inherits: not a measurement of the command")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "peak_rss": ru.ru_maxrss * 1024}  # Linux gives kilobytes


def _read_through(path: Path, block: int = 1 << 24) -> None:
    """Read ``path`` into the page cache, a block at a time (this process stays small)."""
    buf = bytearray(block)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _tensors(folder: Path) -> dict[str, tuple[Path, list[int]]]:
    """{name: (file, shape)} over a folder's safetensors files."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({name: (path, f.get_slice(name).get_shape()) for name in f.keys()})
    return out


def _read(index: dict, name: str) -> torch.Tensor:
    """Tensor ``name`` of a _tensors() index, in float32."""
    from safetensors import safe_open

    with safe_open(index[name][0], "pt") as f:
        return f.get_tensor(name).float()


def _fragile(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """Entries whose fate bf16 rounding decides, left out of the check: mergekit forms and
    weights task vectors in bf16, which moves a |tau| within BAND of its trim's cut (the k-th
    largest, k = int(DENSITY n); ties there included) to either side of it, and flips an election
    whose weighted sum is within BAND of its sum of magnitudes."""
    near_cut = torch.zeros(base.shape, dtype=torch.bool)
    total, magnitude = torch.zeros_like(base), torch.zeros_like(base)
    for m, w in zip(models, WEIGHTS):
        tau = m - base
        mags = tau.abs()
        n = mags.numel()
        kth = mags.flatten().kthvalue(n - max(1, int(DENSITY * n)) + 1).values
        near_cut |= (mags - kth).abs() <= BAND * kth
        kept = torch.where(mags >= kth, w * tau, 0.0)
        total += kept
        magnitude += kept.abs()
    return near_cut | (total.abs() < BAND * magnitude)


def agreement(ours: Path, theirs: Path, inputs: list[Path]) -> dict:
    """How the two merged folders differ: the fraction of entries equal, the fraction left out
    (_fragile), the largest difference elsewhere in bf16 ulps of the largest of |base|, either
    output and |ours - base| (mergekit rounds the task vectors, their weighted terms, sum, divisor
    and quotient to bf16, about half an ulp of the change each, then the sum with the base), and
    ||ours - theirs|| / ||theirs - base|| over the whole model, fragile entries included."""
    a, b = _tensors(ours), _tensors(theirs)
    inputs = [_tensors(p) for p in inputs]
    if sorted(a) != sorted(b):
        return {"names_differ": sorted(set(a) ^ set(b))[:10], "agrees": False}
    n = equal = left_out = 0
    worst, diff2, change2 = 0.0, 0.0, 0.0
    for name in a:
        x, y, base = _read(a, name), _read(b, name), _read(inputs[0], name)
        fragile = _fragile(base, [_read(m, name) for m in inputs[1:]])
        d = (x - y).abs()
        scale = torch.stack([base.abs(), x.abs(), y.abs(), (x - base).abs()]).amax(0)
        ulp = torch.ldexp(torch.ones_like(scale), torch.frexp(scale).exponent - 8)  # bf16: 8 significant bits
        worst = max(worst, float(torch.where(fragile, 0.0, d / ulp).max()))
        n, equal, left_out = n + x.numel(), equal + int((d == 0).sum()), left_out + int(fragile.sum())
        diff2 += float(d.double().square().sum())
        change2 += float((y - base).double().square().sum())
    return {"equal": equal / n, "left_out": left_out / n, "max_ulps_elsewhere": worst,
            "relative_difference": (diff2 / change2) ** 0.5 if change2 else 0.0, "agrees": worst <= ULPS}


def _executable(name: str) -> str | None:
    """A console script of this Python's environment, else one on PATH."""
    return shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))


def _line(label: str, m: dict) -> str:
    return (f"{label:<18} wall {m['wall_s']:7.1f} s  CPU {m['cpu_s']:7.1f} s (user {m['user_s']:.1f} + sys "
            f"{m['sys_s']:.1f})  peak RSS {m['peak_rss'] / 1e6:6.0f} MB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transferops.bench.bench_model_merge",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 20M-parameter model instead of 374M")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "transferops-bench-models",
                   help="folder of the generated checkpoints, reused by later runs (default: %(default)s)")
    p.add_argument("--record", action="store_true", help="append the run to <results>/<machine kind>.jsonl")
    p.add_argument("--results", type=Path, help="results folder of --record (default: the checkout's bench/results)")
    args = p.parse_args(argv)
    from . import results

    results_dir = args.results or results.default_results_dir()
    if args.record and results_dir is None:
        p.error("--record needs --results DIR (transferops is installed, not run from a checkout)")
    mode = "quick" if args.quick else "full"
    started = time.perf_counter()
    # The models are built in a process of their own, so that this one stays small (see measure).
    builder = multiprocessing.get_context("spawn").Process(target=checkpoints, args=(args.cache, mode))
    builder.start()
    builder.join()
    if builder.exitcode:
        raise RuntimeError(f"building the checkpoints under {args.cache} failed (exit code {builder.exitcode})")
    paths = checkpoints(args.cache, mode)
    params = sum(math.prod(shape) for _, shape in _tensors(paths[0]).values())
    model_bytes = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    for f in (f for path in paths for f in path.glob("*.safetensors")):
        _read_through(f)  # both sides then read their inputs from the page cache alike
    notes, warnings = [], []
    with tempfile.TemporaryDirectory(prefix="run-", dir=args.cache) as work:
        work = Path(work)
        (work / "c.yaml").write_text(config_yaml(paths))
        print(f"TIES of 3 fine-tunes of a {params / 1e6:.0f}M-parameter LLaMA-style bf16 model "
              f"({model_bytes / 1e6:.0f} MB each), density {DENSITY}, weights {list(WEIGHTS)}, normalize", flush=True)
        ours = measure([_executable("transferops") or "transferops", "merge", "--config", str(work / "c.yaml"),
                        "-o", str(work / "ours"), "-q"], work / "ours.log")
        print(_line("transferops merge", ours), flush=True)
        mergekit = _executable("mergekit-yaml")
        theirs = check = None
        if mergekit is None:
            notes.append("peer:mergekit unavailable (mergekit-yaml not found)")
        else:
            theirs = measure([mergekit, str(work / "c.yaml"), str(work / "mk"), "--quiet"], work / "mk.log")
            print(_line("mergekit-yaml", theirs))
            print(f"{'mergekit / ours':<18} wall {theirs['wall_s'] / ours['wall_s']:7.1f}x  CPU "
                  f"{theirs['cpu_s'] / ours['cpu_s']:7.1f}x{'':<22}peak RSS {theirs['peak_rss'] / ours['peak_rss']:6.1f}x")
            check = agreement(work / "ours", work / "mk", paths)
            print("agreement:", ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in check.items()))
            if not check["agrees"]:
                warnings.append(f"peer:mergekit disagrees with transferops: {check}")
    size = f"T=3 LLaMA {params / 1e6:.0f}M bf16 d={DENSITY}"
    best = theirs["wall_s"] if check and check["agrees"] else None  # a peer that disagrees sets no bar
    rows = []
    for name, m, matches in (("auto", ours, None), ("peer:mergekit", theirs, check and check["agrees"])):
        if m is None:
            continue
        row = Row("merge_model ties", size, name, "demo", "cpu", "bf16", m["wall_s"], m["wall_s"], m["wall_s"], 1,
                  gbps=5 * model_bytes / m["wall_s"] / 1e9, matches=matches,  # 4 models read, 1 written
                  ratio_to_best_peer=best / m["wall_s"] if best else None)
        rows.append({**asdict(row), "extra": {**m, "params": params, "agreement": check if name != "auto" else None}})
    for w in warnings:
        print("WARNING:", w)
    if args.record:
        meta = run_meta(["cpu"], quick=args.quick)
        meta.update(elapsed_s=round(time.perf_counter() - started, 2), notes=notes, warnings=warnings)
        for path in results.record(rows, meta, ["merging"] * len(rows), results_dir):
            print(f"recorded in {path}")
    return 1 if warnings else 0


if __name__ == "__main__":
    sys.exit(main())
