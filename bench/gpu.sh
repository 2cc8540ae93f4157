#!/usr/bin/env bash
# Issue 14 on a borrowed CUDA GPU: bench/sft_throughput.py (tunesmith vs TRL SFTTrainer + PEFT, with and
# without TRL's packing, each in its own process) on the GPU, plus the LoRA layer overhead vs PEFT.
# The figure to beat there is Unsloth's claim: 2x Hugging Face's speed with 70% less memory.
#   bench/gpu.sh [OUT_DIR]     (Python with torch CUDA, transformers, peft, trl, datasets; PY=... to choose)
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-bench}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== LoRA chat SFT, tunesmith vs TRL (bench/sft_throughput.py --device cuda)"
$PY bench/sft_throughput.py --device cuda --modes tunesmith,tunesmith_fp32,trl,trl_packing 2>&1 | tee "$OUT/sft_throughput.log"
cp bench/results/sft_throughput_cuda.json "$OUT/" 2>/dev/null
echo "== LoRA layer overhead vs PEFT (bf16)"
$PY bench/lora_overhead.py --device cuda --hidden 2048 --layers 8 --seq 1024 --batch 8 --repeats 15 --bf16 2>&1 \
    | grep -v Warning | tee "$OUT/lora_overhead_bf16.log"
