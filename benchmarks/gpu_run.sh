#!/usr/bin/env bash
# Run the GPU tests and every benchmark on a CUDA machine and store the results under
# benchmarks/results/<device-name>/: tests.xml (JUnit), tests.log, benchmarks.json (pytest-benchmark),
# benchmarks.log, summary.md (a short table) and env.txt (versions, GPU, backend resolution).
#
# Usage (from anywhere):   bash benchmarks/gpu_run.sh [extra pytest args for the benchmark run]
# Environment:            PYTHON=/path/to/python (default: python3)
# Needs torch with CUDA, triton, pytest and pytest-benchmark already installed (the package itself is
# installed here, editable, without touching dependencies, so no CUDA build of torch gets replaced).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

"$PY" - <<'PYCHECK'
import importlib, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_run.sh: torch.cuda.is_available() is False; run this on a CUDA machine")
missing = [m for m in ("triton", "pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_run.sh: missing Python packages: {', '.join(missing)} (pip install them first)")
PYCHECK

# The interpreter must be off: on a GPU machine the kernels compile for real.
unset TRITON_INTERPRET

"$PY" -m pip install --no-build-isolation --no-deps -q -e .

DEVICE_NAME="$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9._-]+", "_", torch.cuda.get_device_name(0)).strip("_"))')"
OUT="benchmarks/results/${DEVICE_NAME}"
mkdir -p "$OUT"
echo "gpu_run.sh: writing results to $OUT"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("gpu", torch.cuda.get_device_name(0))'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null || true
  "$PY" -m sparse_sam.info 2>/dev/null || true
} > "$OUT/env.txt"

status=0
# Tests first (the GPU-only cases run because CUDA is present); a failure is recorded, not fatal,
# so the benchmarks still run, but the script exits non-zero at the end.
"$PY" -m pytest tests/ -q -ra --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log" || status=1

"$PY" -m pytest benchmarks/ --benchmark-only --benchmark-json="$OUT/benchmarks.json" \
  --benchmark-columns=min,mean,median,stddev,rounds "$@" 2>&1 | tee "$OUT/benchmarks.log" || status=1

if [[ -s "$OUT/benchmarks.json" ]]; then
  "$PY" - "$OUT/benchmarks.json" "$OUT/summary.md" "$DEVICE_NAME" <<'PYSUM'
import json, sys
src, dst, device = sys.argv[1:4]
data = json.load(open(src))
rows = []
for b in data["benchmarks"]:
    info = b.get("extra_info", {})
    shown = {k: v for k, v in info.items() if k in ("GB/s", "pct_of_copy", "TFLOP/s", "heuristic_picks")}
    rows.append((b["fullname"].split("::")[0].split("/")[-1], b["name"], b["stats"]["median"] * 1e3,
                 b["stats"]["mean"] * 1e3, ", ".join(f"{k}={v}" for k, v in shown.items())))
with open(dst, "w") as f:
    f.write(f"# Benchmark summary\n\nDevice: {device}; {data['datetime']}; median and mean in ms over the "
            "recorded rounds. Compare providers of one case only within this table.\n\n")
    f.write("| file | benchmark | median ms | mean ms | throughput |\n|---|---|---:|---:|---|\n")
    for r in sorted(rows):
        f.write(f"| {r[0]} | `{r[1]}` | {r[2]:.4f} | {r[3]:.4f} | {r[4]} |\n")
print(f"gpu_run.sh: wrote {dst} ({len(rows)} benchmarks)")
PYSUM
fi

exit $status
