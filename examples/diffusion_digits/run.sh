#!/usr/bin/env bash
# The digits example end to end (docs/diffusion.md), from the repository root: build the tiny random pipeline
# and the data, train the UNet on the digits' names, train a style LoRA, draw the grids, score the samples.
set -euo pipefail
OUT=runs/diffusion_digits
TS="${TUNESMITH:-.venv/bin/tunesmith}"
PY="${PYTHON:-.venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # a 1M-parameter UNet: one thread per process is fastest on a shared CPU
PROMPTS=(--prompt zero --prompt one --prompt two --prompt three --prompt four --prompt five --prompt six
         --prompt seven --prompt eight --prompt nine)
GRID=(--num-images 8 --steps 50 --guidance-scale 3 --pixel-scale 2)

nice -n 10 "$PY" examples/diffusion_digits/prepare.py "$OUT"
nice -n 10 "$TS" train examples/diffusion_digits/digits.yaml --quiet --overwrite       # stage 1: full training
nice -n 10 "$TS" train examples/diffusion_digits/style_lora.yaml --quiet --overwrite   # stage 2: the LoRA
# stage 1, before | after: the random pipeline and the trained one, the same starting noise
nice -n 10 "$TS" generate "$OUT/digits" "${PROMPTS[@]}" "${GRID[@]}" --out docs/results/diffusion_digits_grid.png
# stage 2, without | with the LoRA
nice -n 10 "$TS" generate "$OUT/style" "${PROMPTS[@]}" "${GRID[@]}" --out docs/results/diffusion_digits_style_grid.png
nice -n 10 "$PY" examples/diffusion_digits/score.py "$OUT/digits" "$OUT/style"
