#!/bin/bash
# Prepared for the next session that is lent a GPU (issue 14's open measurements), ordered by importance, each
# step under its own limit so one slow step cannot eat the rest (at most about 8 minutes in all).
# Before the call, in the repo root here: put the wheels in .whl/ (the `pip download` line of
# /work/.library/device/README.md for diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5
# annotated_types==0.8.0 typing_inspection==0.4.5 webdataset==1.0.2 braceexpand==0.1.7 importlib_metadata==10.2.0)
# and call the device tool with: command "bash benchmarks/gpu_runs/issue14_next.sh", carry [".whl"],
# timeout_s 480. Results come back under $OUT; copy them to benchmarks/results/ and docs/speed.md.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src BRUSHNET_COMPILE_CACHE=/tmp/bncache
M=/tmp/models
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/env.txt 2>&1
step() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
# 1. the compiled step with the sync-free UniPC, beside diffusers' UniPC and cudnn.benchmark (compiled variants only:
#    the script runs eager variants before compiled ones)
step "compiled fp16 512"
timeout -k 5 220 python3 benchmarks/compile_speed.py --preset sd15 --device cuda --dtype fp16 --resolutions 512 \
  --steps 50 --repeats 3 --models-dir $M --variants compiled,compiled+diffusers_unipc,compiled+cudnn_benchmark \
  --output $OUT/compile_speed_h100_fp16_after.json > $OUT/speed16.log 2>&1
echo "rc=$?" >> $OUT/speed16.log; pkill -9 -f compile_speed.py; grep -v Warning $OUT/speed16.log | tail -8
# 2. the GPU tests not yet run on a GPU (fp32 SD1.5-sized peak, PNDM with CUDA graphs)
step "gpu tests"
timeout -k 5 110 python3 -m pytest -p no:cacheprovider -m gpu tests/pipelines/test_fast_path_gpu.py -q -rA \
  -k "fp32 or pndm" > $OUT/tests.log 2>&1
echo "rc=$?" >> $OUT/tests.log; tail -6 $OUT/tests.log
# 3. the compiled step in bf16
step "compiled bf16 + extras"
timeout -k 5 120 python3 benchmarks/compile_speed.py --preset sd15 --device cuda --dtype bf16 --resolutions 512 \
  --steps 50 --repeats 3 --models-dir $M --variants compiled --no-warm-start \
  --output $OUT/compile_speed_h100_bf16.json > $OUT/speed_bf16.log 2>&1
echo "rc=$?" >> $OUT/speed_bf16.log; pkill -9 -f compile_speed.py; grep -v Warning $OUT/speed_bf16.log | tail -4
step done
