#!/bin/bash
# Prepared for the next session that is lent a GPU (issue 14's open measurements), ordered by importance, each
# step under its own limit so one slow step cannot eat the rest (at most about 9 minutes in all).
# Before the call, in the repo root here: put the wheels in .whl/ (the `pip download` line of
# /work/.library/device/README.md for diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5
# annotated_types==0.8.0 typing_inspection==0.4.5 webdataset==1.0.2 braceexpand==0.1.7 importlib_metadata==10.2.0)
# and call the device tool with: command "bash benchmarks/gpu_runs/issue14_next.sh", carry [".whl"],
# timeout_s 540. Results come back under $OUT; copy them to benchmarks/results/ and docs/speed.md.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src BRUSHNET_COMPILE_CACHE=/tmp/bncache
M=/tmp/models
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/env.txt 2>&1
# run LIMIT LOG COMMAND...: one step under its own limit, its output in $OUT/LOG, its tail shown
run() {
  local limit=$1 log=$2; shift 2
  echo "== $log at $(( $(date +%s) - T0 )) s"
  timeout -k 5 "$limit" "$@" > "$OUT/$log" 2>&1
  echo "rc=$?" >> "$OUT/$log"; pkill -9 -f compile_speed.py; grep -v Warning "$OUT/$log" | tail -8
}
# 1. the compiled step with the sync-free UniPC, beside diffusers' UniPC and cudnn.benchmark (compiled variants
#    only: the script runs eager variants before compiled ones)
run 220 speed16.log python3 benchmarks/compile_speed.py --preset sd15 --device cuda --dtype fp16 --resolutions 512 \
  --steps 50 --repeats 3 --models-dir $M --variants compiled,compiled+diffusers_unipc,compiled+cudnn_benchmark \
  --output $OUT/compile_speed_h100_fp16_after.json
# 2. the GPU tests not yet run on a GPU (fp32 SD1.5-sized peak, PNDM with CUDA graphs)
run 110 tests.log python3 -m pytest -p no:cacheprovider -m gpu tests/pipelines/test_fast_path_gpu.py -q -rA \
  -k "fp32 or pndm"
# 3. the compiled step in bf16
run 120 speed_bf16.log python3 benchmarks/compile_speed.py --preset sd15 --device cuda --dtype bf16 \
  --resolutions 512 --steps 50 --repeats 3 --models-dir $M --variants compiled --no-warm-start \
  --output $OUT/compile_speed_h100_bf16.json
# 4. eager with the original's schedule beside the default (the `doubled` switch works since the fix after run 2)
run 70 eager16.log python3 benchmarks/compile_speed.py --preset sd15 --device cuda --dtype fp16 --resolutions 512 \
  --steps 50 --repeats 3 --models-dir $M --variants doubled,once --output $OUT/compile_speed_h100_eager.json
echo "== done at $(( $(date +%s) - T0 )) s"
