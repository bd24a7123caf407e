#!/bin/bash
# GPU run 1 (issue 14): environment, fp32 memory profile, compiled-step speed (SD1.5 512², fp16), GPU tests.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
export BRUSHNET_COMPILE_CACHE=/tmp/bncache
M=/tmp/models
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch,diffusers,transformers,triton;print('torch',torch.__version__,'cuda',torch.version.cuda,'cudnn',torch.backends.cudnn.version(),'diffusers',diffusers.__version__,'transformers',transformers.__version__,'triton',triton.__version__,torch.cuda.get_device_name())"
  nproc; lscpu | grep -m1 "Model name"; gcc --version | head -1; date -u
} > $OUT/env.txt 2>&1
cat $OUT/env.txt
echo "== fp32 profile $(( $(date +%s) - T0 )) s"
timeout -k 5 120 python3 benchmarks/fp32_memory_profile.py --preset sd15 --resolution 512 --steps 10 \
  --models-dir $M --output /tmp/prof/fp32_memory_profile.txt > $OUT/fp32.log 2>&1
echo "rc=$?" >> $OUT/fp32.log; tail -70 $OUT/fp32.log
echo "== speed $(( $(date +%s) - T0 )) s"
timeout -k 5 230 python3 benchmarks/compile_speed.py --preset sd15 --device cuda --dtype fp16 --resolutions 512 \
  --steps 50 --repeats 3 --variants doubled,once,compiled --models-dir $M \
  --output $OUT/compile_speed_sd15_512_fp16.json > $OUT/speed.log 2>&1
echo "rc=$?" >> $OUT/speed.log; pkill -9 -f compile_speed.py; grep -v Warning $OUT/speed.log | tail -25
echo "== gpu tests $(( $(date +%s) - T0 )) s"
timeout -k 5 90 python3 -m pytest -p no:cacheprovider -m gpu tests/pipelines/test_fast_path_gpu.py -x -q \
  -k "unipc or fp32" > $OUT/tests.log 2>&1
echo "rc=$?" >> $OUT/tests.log; tail -25 $OUT/tests.log
echo "== done $(( $(date +%s) - T0 )) s"
