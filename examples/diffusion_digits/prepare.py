"""Build the digits example's inputs: a tiny random pixel-space text-to-image pipeline and the image–caption data.

    python examples/diffusion_digits/prepare.py [OUT]        (default OUT: runs/diffusion_digits)

Writes OUT/base/ (a diffusers pipeline folder: UNet2DConditionModel 16x16x1, a 2-layer CLIP text encoder and
a CLIP tokenizer built here, DDPM scheduler; random weights: nothing pretrained ships offline) and OUT/data/:
the 1,797 scikit-learn digits (8x8, values 0-16) upscaled to 16x16 grey PNGs, captioned with the digit's
name ("zero" .. "nine") in metadata.jsonl (stage 1), and the same digits dark on a light background in
inverted/ with their own metadata.jsonl (stage 2, the style LoRA).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from tunesmith.diffusion.tiny import build_tiny_pipeline

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def main(out: Path) -> None:
    data = out / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "inverted").mkdir(exist_ok=True)
    digits = load_digits()
    rows = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = Image.fromarray((image / 16.0 * 255).round().astype(np.uint8)).resize((16, 16), Image.Resampling.BILINEAR)
        pixels.save(data / "images" / f"{i:04d}.png")
        Image.fromarray(255 - np.asarray(pixels)).save(data / "inverted" / f"{i:04d}.png")
        rows.append({"file_name": f"{i:04d}.png", "text": NAMES[label]})
    (data / "metadata.jsonl").write_text("".join(json.dumps({**r, "file_name": "images/" + r["file_name"]}) + "\n"
                                                 for r in rows))
    (data / "inverted" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # v-prediction on the cosine schedule: an epsilon loss gives almost no weight to the high-noise steps, where
    # knowing which digit was asked for matters; the velocity keeps it.
    # Cross-attention only below full resolution (8x8 and the 4x4 middle): attention over 256 pixels would
    # cost most of the time on a CPU and adds little at this size. text_time: the caption also reaches every
    # ResNet block through the timestep embedding (diffusers' addition_embed_type="text").
    build_tiny_pipeline(out / "base", vae=False, channels=1, image_size=16, words=NAMES + ("a", "digit"),
                        max_length=8, text_hidden=32, block_out_channels=(32, 64), attention=(False, True),
                        layers_per_block=1, text_time=True, prediction_type="v_prediction",
                        beta_schedule="squaredcos_cap_v2", seed=0)
    print(f"wrote {out / 'base'} (random tiny pipeline) and {len(rows)} captioned images (+ inverted) in {data}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/diffusion_digits"))
