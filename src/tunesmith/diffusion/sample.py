"""Sampling from a DiffusionModel with the pipeline's own scheduler, and the prompt grid PNG that
`tunesmith generate` writes for a diffusion run (the same seeds with and without the adapter).

The loop is the one diffusers' text-to-image pipelines run: noise * init_noise_sigma, then for each
timestep scale_model_input -> UNet -> classifier-free guidance (uncond + g * (cond - uncond)) ->
scheduler.step; then the VAE decodes the latents (or, with no VAE, they are the pixels).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from ..io import atomic_write_bytes
from .data import tokenize


@torch.no_grad()
def sample_images(model, tokenizers: list, scheduler, vae, prompts: list[str], *, steps: int = 30,
                  guidance_scale: float = 5.0, seed: int = 0, image_size: int | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1], one per prompt. Image i starts from noise seeded by (seed, i), so the
    same prompt list and seed give the same starting noise whatever the model."""
    unet = model.unet
    device, dtype = unet.device, unet.dtype
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    size = (image_size or unet.config.sample_size * factor) // factor
    guided = guidance_scale > 1.0
    ids, _ = tokenize(tokenizers, list(prompts) + ([""] * len(prompts) if guided else []))
    hidden, pooled = model.encode_text([t.to(device) for t in ids])
    time_ids = None
    if model.sdxl:  # original size, crop (0, 0), target size: an uncropped square image
        px = size * factor
        time_ids = torch.tensor([[px, px, 0, 0, px, px]] * len(hidden), dtype=hidden.dtype, device=device)
    c = unet.config.in_channels
    noise = torch.stack([torch.randn((c, size, size), generator=torch.Generator().manual_seed(seed * 100_003 + i))
                         for i in range(len(prompts))])
    scheduler.set_timesteps(steps)
    latents = noise.to(device, dtype) * scheduler.init_noise_sigma
    g = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guided else latents
        x = scheduler.scale_model_input(x, t)
        pred = model.predict(x, t.to(device), hidden.to(dtype), None if pooled is None else pooled.to(dtype), time_ids)
        if guided:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents, generator=g).prev_sample
    if vae is not None:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (latents.float().cpu() / 2 + 0.5).clamp(0, 1)


def grid_png(panels: list[tuple[str, torch.Tensor]], prompts: list[str], per_prompt: int, scale: int = 1) -> bytes:
    """One PNG: a column block per panel (e.g. 'base', 'adapter'), a row per prompt, `per_prompt` images each,
    labelled. Each panel tensor is (len(prompts) * per_prompt, C, H, W) in [0, 1], prompt-major."""
    from PIL import Image, ImageDraw
    _, c, h, w = panels[0][1].shape
    h, w = h * scale, w * scale
    label_w, head_h, gap = max(60, 7 * max(len(p) for p in prompts) + 8), 16, 8
    width = label_w + len(panels) * (per_prompt * w + gap)
    grid = Image.new("RGB", (width, head_h + len(prompts) * h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (title, images) in enumerate(panels):
        x0 = label_w + k * (per_prompt * w + gap)
        draw.text((x0, 2), title, fill="black")
        for i in range(len(prompts)):
            for j in range(per_prompt):
                x = (images[i * per_prompt + j].numpy() * 255).round().astype("uint8")
                im = Image.fromarray(x[0] if c == 1 else x.transpose(1, 2, 0)[..., :3]).convert("RGB")
                grid.paste(im.resize((w, h), Image.Resampling.NEAREST), (x0 + j * w, head_h + i * h))
    for i, prompt in enumerate(prompts):
        draw.text((4, head_h + i * h + h // 2 - 5), prompt, fill="black")
    from PIL.PngImagePlugin import PngInfo

    from ..io import PLOT_TAG
    info = PngInfo()
    info.add_text("Software", PLOT_TAG)  # drawn again over itself without --overwrite (io.is_tunesmith_plot)
    buf = io.BytesIO()
    grid.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_grid(path: str | Path, panels: list[tuple[str, torch.Tensor]], prompts: list[str], per_prompt: int,
               scale: int = 1) -> Path:
    return atomic_write_bytes(path, grid_png(panels, prompts, per_prompt, scale))
