"""Large point clouds solved online (costs recomputed in tiles at every update, never stored):
the Sinkhorn bench's clustered clouds (d=64, eps=0.05, costs of mean 1, float32, marginal error
1e-4) at N = M = 20000 to convergence, and at N = M = 100000 for a few iterations. Each size
runs in a fresh process, whose peak resident memory is reported beside the memory the clouds
themselves take; the solver's progress lines go to stderr as it runs.

    python -m transferops.bench.demo_ot_online [--sizes 20000 100000] [--large-iters 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

LARGE = 50000  # sizes from here on run --large-iters iterations, not to convergence


def one(n: int, max_iter: int) -> dict:
    from .bench_ot import EPS, TOL, _clouds
    from transferops.ot import sinkhorn

    x, y = (t[0] for t in _clouds(1, n, n, 64, torch.float32, "cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    r = sinkhorn(x, y, eps=EPS, tol=TOL, max_iter=max_iter, progress=True)
    return {"N": n, "seconds": time.perf_counter() - t0, "iterations": int(r.n_iter),
            "marginal_error": float(r.marginal_error), "converged": bool(r.converged),
            "transport_cost": float(r.transport_cost), "clouds_bytes": 2 * x.numel() * x.element_size(),
            "rss_before_solve": before, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    p.add_argument("--large-iters", type=int, default=2, help=f"iterations at N >= {LARGE}")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process of one size
    p.add_argument("--max-iter", type=int, default=10000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.max_iter)))
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, "-m", "transferops.bench.demo_ot_online", "--one", str(n),
               "--max-iter", str(args.large_iters if n >= LARGE else 10000)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'N = M':>8}  {'time':>8}  {'iterations':>10}  {'error':>8}  {'converged':>9}  {'clouds':>8}  "
          f"{'peak RSS':>8}")
    for r in rows:
        print(f"{r['N']:>8}  {r['seconds']:>7.1f}s  {r['iterations']:>10}  {r['marginal_error']:>8.2e}  "
              f"{str(r['converged']):>9}  {r['clouds_bytes'] / 2**20:>6.0f}MB  {r['peak_rss'] / 2**20:>6.0f}MB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
