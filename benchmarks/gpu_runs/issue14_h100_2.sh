#!/bin/bash
# GPU run 2 (issue 14): sync-free UniPC + strict-fp32 guard: fp16 speed side by side, fp32 memory and speed, GPU tests.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
export BRUSHNET_COMPILE_CACHE=/tmp/bncache
M=/tmp/models
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch,diffusers,transformers,triton;print('torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),'diffusers',diffusers.__version__,'transformers',transformers.__version__,'triton',triton.__version__,torch.cuda.get_device_name())"
  nproc; date -u; git log --oneline -1; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
echo "== fp16 speed $(( $(date +%s) - T0 )) s"
timeout -k 5 235 python3 benchmarks/compile_speed.py --preset sd15 --device cuda --dtype fp16 --resolutions 512 \
  --steps 50 --repeats 3 --models-dir $M \
  --variants doubled,once,compiled,compiled+diffusers_unipc,compiled+cudnn_benchmark \
  --output $OUT/compile_speed_sd15_512_fp16.json > $OUT/speed16.log 2>&1
echo "rc=$?" >> $OUT/speed16.log; pkill -9 -f compile_speed.py; grep -v Warning $OUT/speed16.log | grep -v "^\s*$" | tail -14
echo "== fp32 profile $(( $(date +%s) - T0 )) s"
timeout -k 5 75 python3 benchmarks/fp32_memory_profile.py --preset sd15 --resolution 512 --steps 10 \
  --models-dir $M --sections 1,2 --output $OUT/fp32_memory_profile.txt > $OUT/prof.log 2>&1
echo "rc=$?" >> $OUT/prof.log; grep -v "Loading\|Writing" $OUT/prof.log | tail -24
echo "== fp32 speed $(( $(date +%s) - T0 )) s"
timeout -k 5 55 python3 benchmarks/compile_speed.py --preset sd15 --device cuda --dtype fp32 --resolutions 512 \
  --steps 10 --repeats 3 --models-dir $M --variants once,once+no_fp32_guard,doubled --no-warm-start \
  --output $OUT/compile_speed_sd15_512_fp32.json > $OUT/speed32.log 2>&1
echo "rc=$?" >> $OUT/speed32.log; pkill -9 -f compile_speed.py; grep -v Warning $OUT/speed32.log | grep -v "^\s*$" | tail -8
echo "== gpu tests $(( $(date +%s) - T0 )) s"
timeout -k 5 75 python3 -m pytest -p no:cacheprovider -m gpu tests/pipelines/test_fast_path_gpu.py -q -rA > $OUT/tests.log 2>&1
echo "rc=$?" >> $OUT/tests.log; tail -15 $OUT/tests.log
echo "== done $(( $(date +%s) - T0 )) s"
