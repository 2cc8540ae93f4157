"""Image–caption data for diffusion training: the data side of the `diffusion` objective.

Input: a captions file in the convention of diffusers / Hugging Face `imagefolder` — metadata.jsonl (or
metadata.csv) beside the images, one row per image:
    {"file_name": "0001.png", "text": "a watercolor fox"}      (file_name relative to the captions file)
`data.train` is that file or the folder holding it. Every problem is reported as `file:line: field: message`.

Each image is resized (shorter side to data.image_size) and centre-cropped, scaled to [-1, 1], and encoded
once: by the pipeline's VAE into latents (posterior mean and std, times the VAE's scaling factor), or kept as
pixels for a pipeline without a VAE. Captions are tokenized once per tokenizer; while the text encoders do not
train they are encoded once into hidden states. The per-batch transform, seeded by the batch's position (so
a resumed run sees the same), samples the latent from the posterior, the noise, the timesteps and caption
dropout. Evaluation examples carry fixed noise and evenly spread timesteps, so the eval loss is comparable
from one evaluation to the next.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..data import PreparedData, holdout_split, seeded_sample
from ..data.formats import DataError, Problem, Record, read_records
from ..devices import resolve_device
from ..errors import ConfigError
from . import IMAGE_CAPTION
from .pipeline import (
    DTYPES, TEXT_ENCODERS, component_classes, load_text_encoder, load_tokenizers, load_vae, pipeline_path, quiet_diffusers,
    scheduler_config,
)

CAPTION_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                 "rescale_betas_zero_snr")  # what the DDPM noise schedule of training is built from
ENCODE_BATCH = 8
# greyscale modes beyond 8 bits -> the value that is full white: 16-bit PNG/TIFF (Pillow reads 16-bit PNGs as
# I;16, older Pillow and TIFF as I), float images in [0, 1]
HIGH_BIT_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


@dataclass
class DiffusionData(PreparedData):
    schedule: dict = field(default_factory=dict)  # the pipeline's noise schedule (SCHEDULE_KEYS), for the objective


@dataclass
class Pair:
    source: str
    line: int
    image: Path
    caption: str


# -- reading and checking -------------------------------------------------------------------------------
def captions_file(spec: str) -> Path:
    """The captions file of `spec`: the file itself, or metadata.jsonl / metadata.csv inside a folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in CAPTION_FILES:
            if (path / name).is_file():
                return path / name
        raise DataError([Problem(str(path), 0, "file", f"a folder of images needs {' or '.join(CAPTION_FILES)} beside "
                                                       'them, one row per image: {"file_name": "0001.png", "text": "..."}')])
    if not path.is_file():
        raise DataError([Problem(spec, 0, "file", "not found; give a captions JSONL ({\"file_name\", \"text\"} rows) "
                                                  "or the image folder that holds metadata.jsonl")])
    return path


def _read_rows(file: Path) -> tuple[list[Record], list[Problem]]:
    if file.suffix.lower() != ".csv":
        return read_records(file)
    with file.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        rows = [Record(str(file), reader.line_num, dict(row)) for row in reader]
    return rows, [] if rows else [Problem(str(file), 1, "file", "has no rows")]


def read_pairs(spec: str, max_errors: int = 20) -> list[Pair]:
    """Every (image, caption) row of a captions file, checked; all problems at once as file:line: field."""
    file = captions_file(spec)
    records, problems = _read_rows(file)
    pairs = []
    for r in records:
        before = len(problems)
        name, text = r.data.get("file_name"), r.data.get("text")
        image = None
        if name is None:
            problems.append(Problem(r.source, r.line, "file_name", "missing; each row names its image, e.g. "
                                                                   '{"file_name": "0001.png", "text": "a red fox"}'))
        elif not isinstance(name, str) or not name.strip():
            problems.append(Problem(r.source, r.line, "file_name", f"expected an image path, got {name!r}"))
        else:
            image = file.parent / name
            if not image.is_file():
                problems.append(Problem(r.source, r.line, "file_name", f"image {image} not found (file_name is "
                                                                       f"relative to the captions file's folder {file.parent})"))
            elif image.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(Problem(r.source, r.line, "file_name", f"{image.name} is not an image file "
                                                                       f"({', '.join(IMAGE_SUFFIXES)})"))
        if "text" not in r.data:
            problems.append(Problem(r.source, r.line, "text", 'missing; the caption to train the image with ("" '
                                                              "for none)"))
        elif not isinstance(text, str):
            problems.append(Problem(r.source, r.line, "text", f"expected a string caption, got {type(text).__name__}"))
        if len(problems) == before:
            pairs.append(Pair(r.source, r.line, image, text))
    if problems:
        raise DataError(problems[:max_errors], total=len(problems))
    if not pairs:
        raise DataError([Problem(str(file), 0, "rows", "no image–caption rows")])
    return pairs


# -- images ----------------------------------------------------------------------------------------------
def load_image(pair: Pair, size: int, channels: int) -> tuple[torch.Tensor, list[int]]:
    """An image as (channels, size, size) in [-1, 1]: shorter side resized to `size`, centre-cropped. Also its
    SDXL size conditioning: original height, width, crop top, crop left, target height, width."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(pair.image) as im:
            im = ImageOps.exif_transpose(im)  # as displayed: phone photos store sideways pixels + an EXIF rotation
            if im.mode in HIGH_BIT_SCALE:  # convert() would clip 16-bit / float values at 255 (white)
                full = np.asarray(im, dtype=np.float64) / HIGH_BIT_SCALE[im.mode]
                im = Image.fromarray(np.round(np.clip(full, 0.0, 1.0) * 255).astype(np.uint8), "L")
            im = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError([Problem(pair.source, pair.line, "file_name", f"{pair.image} is unreadable "
                                                                      f"({type(e).__name__}); replace or remove it")]) from None
    h, w = im.height, im.width
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    im = im.resize((rw, rh), Image.Resampling.BILINEAR)
    top, left = (rh - size) // 2, (rw - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)  # (C, S, S)
    return x.contiguous(), [h, w, top, left, size, size]


@torch.no_grad()
def encode_images(images: torch.Tensor, vae) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, C, S, S) in [-1, 1] -> (latent means, latent stds) on the CPU, scaled as the UNet sees them; pixels
    as they are when there is no VAE."""
    if vae is None:
        return images, None
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return ((dist.mean.float() - shift) * scale).cpu(), (dist.std.float() * scale).cpu()


# -- captions --------------------------------------------------------------------------------------------
def tokenize(tokenizers: list, captions: list[str]) -> tuple[list[torch.Tensor], int]:
    """Token ids (N, T) per tokenizer, padded to its model_max_length as the pipelines do; and how many
    captions were cut to fit."""
    ids, cut = [], 0
    for tok in tokenizers:
        ids.append(tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids)
        cut = max(cut, sum(len(t) > tok.model_max_length for t in tok(captions).input_ids))
    return ids, cut


@torch.no_grad()
def encode_captions(encoders: list, ids: list[torch.Tensor], sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    from .pipeline import encode_prompt
    hidden, pooled = [], []
    device = next(encoders[0].parameters()).device
    for i in range(0, len(ids[0]), ENCODE_BATCH):
        h, p = encode_prompt(encoders, [t[i:i + ENCODE_BATCH].to(device) for t in ids], sdxl)
        hidden.append(h.float().cpu())
        pooled.append(p.float().cpu() if p is not None else None)
    return torch.cat(hidden), (torch.cat(pooled) if sdxl else None)


def text_encoder_trains(cfg, encoders: dict) -> bool:
    """Whether any text-encoder parameter may train in this run (then captions stay token ids and the encoder
    runs in the forward pass; otherwise they are encoded once). `encoders`: {name: text encoder module}. Errs
    towards True: a wrong True only costs speed, and the objective refuses cached states for a training encoder."""
    import re
    from ..naming import matches_any_prefix
    a, f = cfg.adapter, cfg.freeze
    params = [f"{e}.{n}" for e, m in encoders.items() for n, _ in m.named_parameters()]
    if a is None:  # full fine-tuning trains everything, unless only some modules train
        only = f.train_only and not (f.train_norms or f.train_biases)
        return not only or any(matches_any_prefix(n, f.train_only) for n in params)
    if f.train_only or f.train_norms or f.train_biases or a.modules_to_save:
        return True
    names = [f"{e}.{n}" for e, m in encoders.items() for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    targets = a.targets
    if targets in ("all-linear", ["all-linear"]):
        return bool(names)
    if targets in ("all-conv", ["all-conv"]):
        return False
    if isinstance(targets, str):
        return any(re.fullmatch(targets, n) for n in names)
    return any(n == t or n.endswith("." + t) for t in targets for n in names)


# -- the run's data ----------------------------------------------------------------------------------------
def check_config(cfg) -> None:
    """What a diffusion run cannot do, said before anything loads."""
    if cfg.data.format not in ("auto", IMAGE_CAPTION):
        raise ConfigError(f"data.format={cfg.data.format}: a diffusion pipeline trains on image–caption data; leave "
                          "data.format auto")
    if cfg.data.augment != "none":
        raise ConfigError(f"data.augment={cfg.data.augment}: images are encoded into latents once, before training, "
                          "so diffusion runs take no augmentation; set data.augment=none")
    if cfg.training.linear_probe_epochs:
        raise ConfigError("training.linear_probe_epochs: a diffusion model has no classification head to probe; set 0")
    a = cfg.adapter
    if a is not None and (a.kind != "lora" or a.modules_to_save or getattr(a, "bias", "none") != "none"):
        raise ConfigError("adapter: diffusion runs save their adapter in diffusers' LoRA format, which holds LoRA "
                          "factors only: use adapter.kind=lora with modules_to_save=null and bias=none")


def _fixed_noise(latents: torch.Tensor, num_train_timesteps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation noise (seeded) and timesteps spread evenly over the schedule, one per example."""
    g = torch.Generator().manual_seed(seed + 7919)
    n = len(latents)
    noise = torch.randn(latents.shape, generator=g)
    steps = torch.linspace(0, num_train_timesteps - 1, n).round().long() if n > 1 else torch.tensor([num_train_timesteps // 2])
    return noise, steps[torch.randperm(n, generator=g)]


def encode_pairs(pairs: list[Pair], size: int, cache_text: bool, sdxl: bool, parts: dict) -> list[dict]:
    """Examples (dicts of tensors) for `pairs`: latents (+ std), caption ids or hidden states, SDXL time ids.
    Images are read and encoded ENCODE_BATCH at a time (only their latents stay in memory)."""
    if not pairs:
        return []
    vae, channels = parts["vae"], parts["channels"]
    chunks, loaded = [], []
    for i in range(0, len(pairs), ENCODE_BATCH):
        batch = [load_image(p, size, channels) for p in pairs[i:i + ENCODE_BATCH]]
        chunks.append(encode_images(torch.stack([x for x, _ in batch]), vae))
        loaded += [conditioning for _, conditioning in batch]
    latents = torch.cat([m for m, _ in chunks])
    stds = torch.cat([s for _, s in chunks]) if vae is not None else None
    ids, _ = tokenize(parts["tokenizers"], [p.caption for p in pairs])
    examples = [{"latents": latents[i]} for i in range(len(pairs))]
    if cache_text:
        hidden, pooled = encode_captions(parts["encoders"], ids, sdxl)
        for i, ex in enumerate(examples):
            ex["encoder_hidden_states"] = hidden[i]
            if pooled is not None:
                ex["pooled_embeds"] = pooled[i]
    else:
        for i, ex in enumerate(examples):
            ex.update({f"input_ids{'' if k == 0 else '_' + str(k + 1)}": t[i] for k, t in enumerate(ids)})
    for i, ex in enumerate(examples):
        if stds is not None:
            ex["latents_std"] = stds[i]
        if sdxl:
            ex["time_ids"] = torch.tensor(loaded[i], dtype=torch.float32)
    return examples


def prepare_image_captions(cfg, seed: int = 0) -> DiffusionData:
    """The run's image–caption data, encoded with pipeline `cfg.model.name`'s VAE, tokenizers and (while they
    do not train) text encoders; and the per-batch transform that samples noise and timesteps."""
    check_config(cfg)
    path = pipeline_path(cfg.model.name)
    quiet_diffusers()
    d, notes = cfg.data, []
    train = read_pairs(d.train, d.max_errors)
    evals = read_pairs(d.eval, d.max_errors) if d.eval else []
    read = {"train": [p.image for p in train], "eval": [p.image for p in evals]}  # what run.json's hash covers
    train = seeded_sample(train, d.max_examples, seed, "training", "max_examples", notes)
    if not d.eval and d.eval_fraction > 0:
        train, evals = holdout_split(train, d.eval_fraction, seed, notes)
    evals = seeded_sample(evals, d.max_eval_examples, seed, "eval", "max_eval_examples", notes)

    schedule = {k: v for k, v in scheduler_config(path).items() if k in SCHEDULE_KEYS}
    dtype, device = DTYPES[cfg.model.dtype], resolve_device(cfg.training.device)  # encode where training runs
    present = component_classes(path)
    encoders = {n: load_text_encoder(path, n, dtype).to(device).eval() for n in TEXT_ENCODERS if n in present}
    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    cache_text = not text_encoder_trains(cfg, encoders)
    vae = load_vae(path)
    vae = vae.to(device) if vae is not None else None
    parts = {"vae": vae, "tokenizers": load_tokenizers(path), "encoders": list(encoders.values()),
             "channels": vae.config.in_channels if vae is not None else unet_cfg.get("in_channels", 4)}
    _, cut = tokenize(parts["tokenizers"], [p.caption for p in train + evals])
    enc_train = encode_pairs(train, d.image_size, cache_text, sdxl, parts)
    enc_eval = encode_pairs(evals, d.image_size, cache_text, sdxl, parts)
    T = int(schedule.get("num_train_timesteps", 1000))
    if enc_eval:
        noise, steps = _fixed_noise(torch.stack([e["latents"] for e in enc_eval]), T, seed)
        for i, ex in enumerate(enc_eval):
            ex.pop("latents_std", None)  # evaluation uses the posterior mean
            ex["noise"], ex["timesteps"] = noise[i], steps[i]
    shape = tuple(enc_train[0]["latents"].shape)
    space = f"latents {shape} from the VAE" if vae is not None else f"pixels {shape} (no VAE: pixel space)"
    notes.append(f"{len(enc_train)} training images at {d.image_size}x{d.image_size} -> {space}; captions "
                 + ("encoded once (the text encoders do not train)" if cache_text else "encoded every step (a text "
                                                                                      "encoder trains)"))
    native = unet_cfg.get("sample_size", 0) * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
    if native and native != d.image_size:
        notes.append(f"the UNet's native resolution is {native}px; data.image_size={d.image_size}")
    if cut:
        notes.append(f"{cut} captions were longer than the tokenizer's limit and were cut")
    empty = _empty_caption(parts, cache_text, sdxl)
    transform = partial(noise_batch, num_train_timesteps=T, caption_dropout=d.caption_dropout, empty=empty)
    return DiffusionData(IMAGE_CAPTION, enc_train, enc_eval, None, notes, modality="image", transform=transform,
                         read=read, schedule=schedule)


def _empty_caption(parts: dict, cache_text: bool, sdxl: bool) -> dict[str, torch.Tensor]:
    """The conditioning of the empty caption (what caption dropout trains on, and classifier-free guidance uses)."""
    ids, _ = tokenize(parts["tokenizers"], [""])
    if not cache_text:
        return {f"input_ids{'' if k == 0 else '_' + str(k + 1)}": t[0] for k, t in enumerate(ids)}
    hidden, pooled = encode_captions(parts["encoders"], ids, sdxl)
    return {"encoder_hidden_states": hidden[0], **({"pooled_embeds": pooled[0]} if pooled is not None else {})}


def noise_batch(batch: dict, generator: torch.Generator, num_train_timesteps: int, caption_dropout: float = 0.0,
                empty: dict | None = None) -> dict:
    """A training batch's randomness, drawn from `generator` (seeded by the batch's position): the latent from
    the VAE posterior, the noise, a timestep per image, and which captions drop to the empty one."""
    batch = dict(batch)
    latents = batch["latents"]  # (B, C, h, w)
    std = batch.pop("latents_std", None)
    if std is not None:
        latents = latents + std * torch.randn(latents.shape, generator=generator)
    b = latents.shape[0]
    batch["latents"] = latents
    batch["noise"] = torch.randn(latents.shape, generator=generator)
    batch["timesteps"] = torch.randint(0, num_train_timesteps, (b,), generator=generator)
    if caption_dropout > 0 and empty:
        drop = torch.rand(b, generator=generator) < caption_dropout
        for key, value in empty.items():
            x = batch[key]
            batch[key] = torch.where(drop.view(-1, *[1] * (x.dim() - 1)), value.to(x.dtype).expand_as(x), x)
    return batch


def encode_eval_set(spec: str, cfg, base: str, num_train_timesteps: int) -> list[dict]:
    """Evaluation examples from another captions file for a finished run (`tunesmith eval RUN --data FILE`):
    captions as token ids (the run's text encoder, adapter included, encodes them), fixed noise and timesteps."""
    path = pipeline_path(base)
    quiet_diffusers()
    vae = load_vae(path)
    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    parts = {"vae": vae, "tokenizers": load_tokenizers(path), "encoders": [],
             "channels": vae.config.in_channels if vae is not None else unet_cfg.get("in_channels", 4)}
    examples = encode_pairs(read_pairs(spec, cfg.data.max_errors), cfg.data.image_size, False,
                            unet_cfg.get("addition_embed_type") == "text_time", parts)
    noise, steps = _fixed_noise(torch.stack([e["latents"] for e in examples]), num_train_timesteps, cfg.training.seed)
    for i, ex in enumerate(examples):
        ex.pop("latents_std", None)
        ex["noise"], ex["timesteps"] = noise[i], steps[i]
    return examples
