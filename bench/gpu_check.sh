#!/usr/bin/env bash
# The GPU check (docs/gpu.md). On a fresh CUDA machine (H100/H200, no network): install transferops
# with its CUDA kernels, run every test that needs CUDA, then `transferops bench --device cuda
# --quick` against the peers, one hot path at a time, and write the report under one folder:
#   gpu-check.txt   the tables, the notes and the GPU bars (met / NOT MET / NOT RUN, with figures)
#   gpu-check.json  the same rows, bars and each run's metadata, as one JSON file
#   gpu-check.log   every part's full output
#   results/        the bench runs, recorded as bench/results/ holds them (cuda-<GPU>.jsonl)
# All within 8 minutes: each part runs under its own time limit (and the time left), so one hang
# cannot eat the rest; a part that fails or times out is reported and the next one runs.
#
#   bash bench/gpu_check.sh [--out DIR] [--wheels DIR] [--python PY] [--skip install,tests]
#   bash bench/gpu_check.sh --dry-run [--out DIR]
#
# --dry-run runs the same parts on the CPU, in CI: no install (it checks the installed package
# imports), a few Triton tests in the interpreter, and every GPU bench case at tiny sizes with
# Triton interpreted and absent peers skipped (`transferops bench --dry-run`). It fails when a
# part fails, so the script cannot rot between GPU loans.
# --out: default $OUT where set (the device machine's folder), else build/gpu-check.
# --wheels: a folder of wheels (or sdists) installed first with pip --no-index --no-deps: the
#   peers the machine lacks (POT, GeomLoss, pykeops and keopscore, mergekit and its
#   dependencies); default .whl/ where it exists. See docs/gpu.md.
# --python: the interpreter (default $PYTHON, else .venv/bin/python where it exists, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

dry=0
out=${OUT:-build/gpu-check}
wheels=
python=${PYTHON:-}
skip=,
budget=480 # seconds, all parts together
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    --wheels) wheels=$2; shift ;;
    --python) python=$2; shift ;;
    --skip) skip=",$2,"; shift ;;
    --budget) budget=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if [ -z "$wheels" ] && [ $dry = 0 ] && [ -d .whl ]; then wheels=.whl; fi
command -v timeout >/dev/null || { echo "gpu_check: needs coreutils' timeout" >&2; exit 2; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
parts="$out/parts"
rm -rf "$parts" "$out/gpu-check.txt" "$out/gpu-check.json" "$out/gpu-check.log"
mkdir -p "$parts"
log="$out/gpu-check.log"
summary="$parts/summary.txt"
: >"$log"
: >"$summary"
export PYTHONUNBUFFERED=1
if [ $dry = 1 ]; then
  mode="dry run (CPU, Triton interpreted, tiny sizes)"
  # Part: limit in seconds, and the least reserved for it while earlier parts run.
  limits=(install:60:10 tests:90:30 merging:90:30 transferability:60:20 ot:60:20 adapters:60:20)
else
  mode="GPU"
  unset TRITON_INTERPRET # Triton compiles for the GPU
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  limits=(install:150:60 tests:120:60 merging:90:40 transferability:75:30 ot:100:45 adapters:45:25)
fi
report_reserve=20
echo "gpu_check: $mode; python $python; output $out; $budget s in all"

failed=0
# run_part NAME COMMAND...: runs the command under min(its limit, the time left less what the
# later parts reserve), appends its output to the log, and one line to the summary.
run_part() {
  local name=$1 limit=0 reserve=$report_reserve seen=0 entry n l r
  shift
  for entry in "${limits[@]}"; do
    IFS=: read -r n l r <<<"$entry"
    if [ "$n" = "$name" ]; then
      limit=$l
      seen=1
    elif [ $seen = 1 ] && [[ $skip != *",$n,"* ]]; then
      reserve=$((reserve + r))
    fi
  done
  local left=$((budget - (SECONDS - start) - reserve))
  [ $left -lt $limit ] && limit=$left
  if [[ $skip == *",$name,"* ]]; then
    printf '%-16s skipped (--skip)\n' "$name" | tee -a "$summary"
    return 0
  fi
  if [ "$limit" -lt 5 ]; then
    printf '%-16s NOT RUN: no time left of the %s s\n' "$name" "$budget" | tee -a "$summary"
    failed=1
    return 0
  fi
  echo "gpu_check: $name (limit $limit s): $*"
  local t0=$SECONDS rc
  echo "===== $name: $* (limit $limit s)" >"$parts/$name.log"
  # timeout signals its whole process group: the part's children (pip, pytest workers) too.
  timeout --kill-after=10 "$limit" bash -c '"$@"' bash "$@" >>"$parts/$name.log" 2>&1
  rc=$?
  echo "===== $name: exit status $rc after $((SECONDS - t0)) s" >>"$parts/$name.log"
  cat "$parts/$name.log" >>"$log"
  local took=$((SECONDS - t0)) state
  case $rc in
    0) state=ok ;;
    124|137) state="TIMED OUT at its limit" ;;
    *) state="FAILED (exit status $rc)" ;;
  esac
  printf '%-16s %s in %s s (limit %s s)\n' "$name" "$state" "$took" "$limit" | tee -a "$summary"
  if [ $rc != 0 ]; then
    failed=1
    tail -n 15 "$parts/$name.log" | sed 's/^/    | /'
  fi
}

part_install() {
  if [ $dry = 1 ]; then
    echo "dry run: would install with: TRANSFEROPS_CUDA=ON TRANSFEROPS_CPU_ISAS=OFF $python -m pip install" \
      "--no-index --no-deps --no-build-isolation ."
    "$python" -m pip --version && "$python" -m transferops.cli info
    return
  fi
  local missing
  missing=$("$python" -c "
import importlib.util as u
print(' '.join(m for m in ('scikit_build_core', 'pybind11', 'torch', 'numpy', 'scipy', 'threadpoolctl', 'triton')
               if u.find_spec(m) is None))") || return 1
  if [ -n "$missing" ]; then
    echo "install: $python lacks $missing; nothing can be downloaded here: carry their wheels (--wheels DIR)"
    return 1
  fi
  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
  command -v nvcc >/dev/null || { echo "install: nvcc not found: the CUDA kernels cannot be built"; return 1; }
  if [ -n "$wheels" ]; then
    shopt -s nullglob
    local files=("$wheels"/*.whl "$wheels"/*.tar.gz)
    shopt -u nullglob
    if [ ${#files[@]} -gt 0 ]; then
      echo "install: ${#files[@]} carried packages from $wheels"
      "$python" -m pip install -q --no-index --no-deps --no-build-isolation "${files[@]}" || return 1
    fi
  fi
  # No build isolation: pip would try to download scikit-build-core and pybind11.
  TRANSFEROPS_CUDA=ON TRANSFEROPS_CPU_ISAS=OFF "$python" -m pip install --no-index --no-deps --no-build-isolation \
    ${PIP_VERBOSE:+-v} . || return 1
  "$python" -c "
import transferops._native as m
assert m.has_cuda, 'TRANSFEROPS_CUDA=ON built a module without CUDA (was nvcc found?)'
import torch
assert torch.cuda.is_available(), 'torch sees no CUDA device'" || return 1
  "$python" -m transferops.cli info
}

part_tests() {
  if [ $dry = 1 ]; then
    # On the GPU: every item marked cuda. Here (the CUDA items are deselected without a GPU):
    # the same command on a few interpreted Triton items.
    "$python" -m pytest -q -p no:cacheprovider -m "interpreter and not slow" -k test_bottleneck_variants \
      tests/test_adapters.py
  else
    "$python" -m pytest -q -p no:cacheprovider -m cuda -n 8 tests
  fi
}

part_bench() {
  local stem=$1
  if [ $dry = 1 ]; then
    "$python" -m transferops.cli bench --dry-run --only "$stem" --json "$parts/$stem.json"
  else
    "$python" -m transferops.cli bench --quick --device cuda --only "$stem" --json "$parts/$stem.json" \
      --record --results "$out/results"
  fi
}

# Each part runs in a fresh bash under timeout: it sees these functions and variables.
export -f part_install part_tests part_bench
export dry python wheels parts out
run_part install part_install
run_part tests part_tests
for stem in merging transferability ot adapters; do
  run_part "$stem" part_bench "$stem"
done

# The report: the tables and the bars of every bench part that wrote results.
jsons=()
for stem in merging transferability ot adapters; do
  [ -f "$parts/$stem.json" ] && jsons+=("$parts/$stem.json")
done
{
  echo "transferops GPU check, $mode: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "parts (all within $budget s):"
  sed 's/^/  /' "$summary"
} >"$out/gpu-check.txt"
report_ok=1
if [ ${#jsons[@]} -gt 0 ]; then
  timeout --kill-after=5 $((report_reserve - 5)) "$python" -m transferops.cli bench --report "${jsons[@]}" \
    --json "$out/gpu-check.json" >>"$out/gpu-check.txt" 2>>"$log" || report_ok=0
else
  echo "no bench part wrote results" >>"$out/gpu-check.txt"
  report_ok=0
fi
[ $report_ok = 1 ] || failed=1
cat "$out/gpu-check.txt"
# What comes back from a device machine is at most 8 files: the parts' files are in the report.
if [ $report_ok = 1 ]; then rm -rf "$parts"; fi
echo
echo "gpu_check: $mode done in $((SECONDS - start)) s; $( [ $failed = 0 ] && echo "every part ran" || echo "SOME PARTS FAILED (above)"); report in $out"
exit $failed
