#!/usr/bin/env bash
# Issue 14 on a borrowed CUDA GPU: bench/sft_throughput.py (tunesmith vs TRL SFTTrainer + PEFT, with and
# without TRL's packing, each in its own process) on the GPU, plus the LoRA layer overhead vs PEFT.
# The figure to beat there is Unsloth's claim: 2x Hugging Face's speed with 70% less memory.
#   bench/gpu.sh [OUT_DIR]     (Python with torch CUDA, transformers, peft, trl, datasets; PY=... to choose)
# MODEL=folder: a model folder instead of the packaged SmolLM2; a folder with a config and tokenizer but no
# weights (the packaged weights are too big to carry to a borrowed machine) gets random weights, seed 0: speed
# and memory are the architecture's, the losses only compare the modes with each other.
# DATA=folder: the ChatterBot split's train.jsonl / test.jsonl written beforehand (no corpus package there).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-bench}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
MODEL=${MODEL:-smollm2-135m-instruct}
if [ -d "$MODEL" ] && ! compgen -G "$MODEL/*.safetensors" >/dev/null && ! compgen -G "$MODEL/*.bin" >/dev/null; then
  $PY - "$MODEL" /tmp/sft-bench-model <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
for f in src.iterdir():
    if f.is_file() and f.name != "config.json":
        shutil.copy(f, dst / f.name)
print(f"random weights for {src.name}'s architecture in {dst}")
EOF
  MODEL=/tmp/sft-bench-model
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== LoRA chat SFT, tunesmith vs TRL (bench/sft_throughput.py --device cuda)"
$PY bench/sft_throughput.py --device cuda --model "$MODEL" ${DATA:+--data "$DATA"} \
    --modes tunesmith,tunesmith_fp32,tunesmith_nogc,trl,trl_packing 2>&1 | grep -v Warning | tee "$OUT/sft_throughput.log"
cp bench/results/sft_throughput_cuda.json "$OUT/" 2>/dev/null
echo "== LoRA layer overhead vs PEFT (bf16)"
$PY bench/lora_overhead.py --device cuda --hidden 2048 --layers 8 --seq 1024 --batch 8 --repeats 15 --bf16 2>&1 \
    | grep -v Warning | tee "$OUT/lora_overhead_bf16.log"
