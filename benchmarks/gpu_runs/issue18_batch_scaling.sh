#!/usr/bin/env bash
# Issue 18: does a larger batch buy more samples per second in the demo world's branch stage on a GPU?
# The 2026-11-28 run (issue18_h200_invariance_logs.txt) ran all three stages at about 0.1 s/step with the data
# stream no longer the bound; this times the branch stage alone at each batch in BATCHES, one after the other,
# on the same 2000 training scenes. Seconds per step: from the log times of step 50 and step STEPS.
#
# On the device machine, from the repo root, wheels carried in .whl (about 150 s of device time):
#     bash benchmarks/gpu_runs/issue18_batch_scaling.sh
# Rehearsal on the CPU: DEV=cpu STEPS=2 FIRST=1 BATCHES="2 4" OUT=/tmp/bs_out bash benchmarks/gpu_runs/issue18_batch_scaling.sh
set -u -o pipefail
DEV=${DEV:-cuda}
STEPS=${STEPS:-100}
FIRST=${FIRST:-50}
BATCHES=${BATCHES:-"32 128"}
LIMIT=${LIMIT:-60}
OUT=${OUT:?set OUT to a folder for the log}
mkdir -p "$OUT"
if [ "$DEV" != cpu ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONUNBUFFERED=1
W=$(mktemp -d /tmp/issue18_bs.XXXX)
T=examples/demo_world/train_world.py
python3 $T --work "$W/data" --stages data --scenes 2000 --threads 8 > "$OUT/data.log" 2>&1 || { tail "$OUT/data.log"; exit 1; }
for b in $BATCHES; do
    mkdir -p "$W/b$b"
    ln -s "$W/data/shards" "$W/b$b/shards"
    ln -s "$PWD/src/brushnet/assets/demo_world/base" "$W/b$b/base"
    timeout -k 5 "$LIMIT" python3 $T --work "$W/b$b" --stages brushnet --device "$DEV" --threads 2 --scenes 2000 \
        --branch-steps "$STEPS" --branch-batch "$b" --loader-workers 4 > "$OUT/batch$b.log" 2>&1
    echo "batch $b rc $?"
    python3 - "$OUT/batch$b.log" "$b" "$FIRST" "$STEPS" <<'PY'
import re, sys
from datetime import datetime
log, batch, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
times = {}
for line in open(log):
    m = re.match(r"(\S+ \S+) brushnet\.training\.loop step (\d+):", line)
    if m:
        times[int(m[2])] = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
if first in times and last in times and last > first:
    per_step = (times[last] - times[first]).total_seconds() / (last - first)
    print(f"batch {batch}: {per_step:.4f} s/step, {batch / per_step:.0f} samples/s (steps {first} to {last})")
else:
    print(f"batch {batch}: steps {first} and {last} not both logged ({sorted(times)[-3:]})")
PY
done 2>&1 | tee "$OUT/batch_scaling.txt"
