"""Tiny, randomly initialised text-to-image pipelines, written as real diffusers pipeline folders.

No diffusion weights ship offline here, so tests and the digits example build their pipelines: a real
`UNet2DConditionModel`, a real `CLIPTextModel` with a real CLIP byte-level BPE tokenizer (a small vocabulary
built here: every byte, plus merges that make each of `words` one token), a DDPM scheduler, and optionally
a small `AutoencoderKL` (with one, the folder is a StableDiffusionPipeline / StableDiffusionXLPipeline that
diffusers loads; without, the UNet works on pixels). Nothing is pretrained: the weights are random.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import atomic_directory


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer(words: tuple[str, ...] = (), max_length: int = 16):
    """A CLIP tokenizer whose vocabulary is every byte (alone and word-final) plus one token per word in
    `words`: any text tokenizes (a character at a time), the listed words as one token each."""
    from transformers import CLIPTokenizer
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_unet(sample_size: int, channels: int, cross_attention_dim: int, block_out_channels=(16, 32),
              layers_per_block: int = 1, sdxl_pooled_dim: int | None = None, attention: tuple[bool, ...] | None = None,
              text_time: bool = False):
    """A small UNet2DConditionModel; `attention[i]`: level i (0 = full resolution) has cross-attention blocks
    (default: every level but the last, as Stable Diffusion). `text_time`: also add an attention-pooled
    caption embedding to the timestep embedding (diffusers' addition_embed_type='text', as DeepFloyd IF),
    which conditions every ResNet block, not only the cross-attention layers."""
    from diffusers import UNet2DConditionModel
    n = len(block_out_channels)
    attention = tuple(attention) if attention is not None else (True,) * (n - 1) + (False,)
    extra = {}
    if sdxl_pooled_dim is not None:  # SDXL's added conditioning: pooled text embedding + 6 size/crop ids
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + sdxl_pooled_dim)
    elif text_time:
        extra = dict(addition_embed_type="text", addition_embed_type_num_heads=4)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels), norm_num_groups=8, attention_head_dim=8,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=cross_attention_dim, **extra)


def tiny_text_encoder(vocab_size: int, hidden: int, max_length: int, layers: int = 2, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_length,
                         projection_dim=projection_dim or hidden, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(cfg).eval()


def build_tiny_pipeline(folder: str | Path, *, vae: bool = True, sdxl: bool = False, image_size: int = 16,
                        channels: int = 3, words: tuple[str, ...] = (), max_length: int = 16, text_hidden: int = 32,
                        block_out_channels=(16, 32), layers_per_block: int = 1, attention: tuple[bool, ...] | None = None,
                        text_time: bool = False, prediction_type: str = "epsilon", beta_schedule: str = "linear",
                        seed: int = 0) -> Path:
    """Write a tiny random pipeline folder (see the module docstring) atomically and return its path.
    `channels`: the image channels (1 = grey, 3 = RGB); with a VAE the UNet sees 4 latent channels at half size."""
    from diffusers import AutoencoderKL, DDPMScheduler

    from .pipeline import quiet_diffusers
    quiet_diffusers()
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(words, max_length)
    v = len(tok)
    encoders = {"text_encoder": tiny_text_encoder(v, text_hidden, max_length)}
    if sdxl:
        encoders["text_encoder_2"] = tiny_text_encoder(v, text_hidden, max_length, projection_dim=text_hidden)
    autoencoder = None
    if vae:
        autoencoder = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4,
                                    block_out_channels=(8, 16), norm_num_groups=8, sample_size=image_size,
                                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    unet = tiny_unet(image_size // 2 if vae else image_size, 4 if vae else channels,
                     text_hidden * len(encoders), block_out_channels, layers_per_block,
                     sdxl_pooled_dim=text_hidden if sdxl else None, attention=attention, text_time=text_time)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction_type,
                              clip_sample=not vae, steps_offset=1)  # pixels clip to [-1, 1]; latents do not
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        if vae:
            _save_diffusers_pipeline(tmp, sdxl, unet, autoencoder, encoders, tok, scheduler)
        else:
            unet.save_pretrained(tmp / "unet")
            scheduler.save_pretrained(tmp / "scheduler")
            encoders["text_encoder"].save_pretrained(tmp / "text_encoder")
            tok.save_pretrained(tmp / "tokenizer")
            index = {"_class_name": "PixelSpaceTextToImage", "_diffusers_version": _diffusers_version(),
                     "_note": "tunesmith tiny pixel-space pipeline: no VAE, so no diffusers pipeline class loads it "
                              "whole; UNet2DConditionModel.from_pretrained(folder, subfolder='unet') does",
                     "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDPMScheduler"],
                     "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _save_diffusers_pipeline(target: Path, sdxl: bool, unet, vae, encoders: dict, tok, scheduler) -> None:
    if sdxl:
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders["text_encoder"], tokenizer=tok,
                                         text_encoder_2=encoders["text_encoder_2"], tokenizer_2=tok, unet=unet,
                                         scheduler=scheduler)
    else:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders["text_encoder"], tokenizer=tok, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(target, safe_serialization=True)


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__
