"""Diffusion models: LoRA on a diffusers UNet (and optionally its text encoders), trained with the
noise-prediction objective on image–caption data, saved in the files diffusers reads.

  pipeline.py   a local diffusers pipeline folder -> DiffusionModel (unet + text encoders) and its frozen parts
  data.py       image–caption data: a folder of images + captions JSONL -> latents and caption conditioning,
                and the seeded per-batch transform (noise, timesteps, caption dropout)
  lora_files.py diffusers' LoRA files (pipeline.load_lora_weights / unet.load_lora_adapter)
  kohya.py      import of community Kohya LoRA files, with a report of every key mapped and not mapped
  sample.py     sampling and the prompt grid PNG (`tunesmith generate` on a diffusion run)
  tiny.py       tiny random pipelines (tests, the digits example)

Nothing here is imported by the training loop: the objective (objectives/diffusion.py) and the data side
(data.py) are all the loop sees. diffusers is imported only when a diffusion model is used.
"""
from __future__ import annotations

from pathlib import Path

MODEL_INDEX = "model_index.json"
IMAGE_CAPTION = "image_caption"  # the data format: {"file_name": ..., "text": ...} rows beside the images


def is_diffusion_model(spec: str) -> bool:
    """A diffusers pipeline folder: model_index.json and a unet/ subfolder."""
    path = Path(str(spec)).expanduser()
    return (path / MODEL_INDEX).is_file() and (path / "unet" / "config.json").is_file()


__all__ = ["IMAGE_CAPTION", "MODEL_INDEX", "is_diffusion_model"]
