"""A local diffusers pipeline folder, loaded for training: the UNet and its text encoder(s) in one module.

The folder is what `DiffusionPipeline.save_pretrained` writes (there is no hub here: give a path):
model_index.json, unet/, scheduler/, text_encoder/ + tokenizer/ (Stable Diffusion 1.x / 2.x), SDXL adds
text_encoder_2/ + tokenizer_2/, and vae/ (AutoencoderKL). A folder without vae/ works in pixel space (tiny
models). `DiffusionModel` names its parts as the pipeline does (unet, text_encoder, text_encoder_2), so an
adapter's module names read `unet.down_blocks.0...` exactly as diffusers keys its pipeline LoRA files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import TunesmithError
from ..models.loading import ModelNotFoundError
from . import MODEL_INDEX, is_diffusion_model

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
TRAINABLE = ("unet", *TEXT_ENCODERS)  # what DiffusionModel holds; tokenizers, VAE and scheduler stay frozen
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def quiet_diffusers() -> None:
    """No load reports or progress bars from diffusers / transformers: tunesmith prints its own summary."""
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    from ..models.loading import quiet_transformers
    quiet_transformers()


def pipeline_path(spec: str | Path) -> Path:
    path = Path(str(spec)).expanduser()
    if is_diffusion_model(path):
        return path
    found = f" (it holds: {', '.join(sorted(p.name for p in path.iterdir())[:8])})" if path.is_dir() else ""
    raise ModelNotFoundError(f"{spec}: not a diffusers pipeline folder{found}; expected {MODEL_INDEX} and unet/ "
                             "as `pipeline.save_pretrained(folder)` writes them. There is no hub here: give a local path")


def component_classes(path: Path) -> dict[str, tuple[str, str]]:
    """model_index.json's components that are present: {name: (library, class name)}."""
    index = json.loads((path / MODEL_INDEX).read_text())
    return {k: tuple(v) for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] and v[1]
            and (path / k).is_dir()}


def load_text_encoder(path: Path, name: str, dtype: torch.dtype) -> nn.Module:
    import transformers
    library, cls_name = component_classes(path)[name]
    cls = getattr(transformers, cls_name, None) if library == "transformers" else None
    if cls is None:
        raise TunesmithError(f"{path / MODEL_INDEX}: {name} is {library}.{cls_name}; tunesmith loads transformers "
                             "text encoders (CLIPTextModel, CLIPTextModelWithProjection)")
    return cls.from_pretrained(path / name, dtype=dtype, local_files_only=True)


def load_tokenizers(spec: str | Path) -> list:
    """The pipeline's tokenizers, in text-encoder order."""
    from transformers import AutoTokenizer
    path = pipeline_path(spec)
    present = component_classes(path)
    return [AutoTokenizer.from_pretrained(path / t, local_files_only=True)
            for enc, t in zip(TEXT_ENCODERS, TOKENIZERS) if enc in present]


def load_vae(spec: str | Path, dtype: torch.dtype = torch.float32):
    """The pipeline's AutoencoderKL, frozen, or None for a pixel-space model (no vae/ folder)."""
    path = pipeline_path(spec)
    if "vae" not in component_classes(path):
        return None
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
    return vae.requires_grad_(False).eval()


def scheduler_config(spec: str | Path) -> dict:
    """scheduler/scheduler_config.json: the noise schedule the UNet was trained with."""
    file = pipeline_path(spec) / "scheduler" / "scheduler_config.json"
    if not file.exists():
        raise ModelNotFoundError(f"{file}: not found; a pipeline folder holds its noise schedule there")
    return json.loads(file.read_text())


def load_scheduler(spec: str | Path, prediction_type: str | None = None):
    """The pipeline's own sampling scheduler (PNDM, DDIM, Euler ...), predicting what the run trained."""
    import diffusers
    config = scheduler_config(spec)
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not config["_class_name"].endswith("Scheduler"):
        cls = diffusers.DDIMScheduler
    return cls.from_config(config, **({"prediction_type": prediction_type} if prediction_type else {}))


def encode_prompt(encoders: list[nn.Module], ids: list[torch.Tensor], sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Caption token ids (one (B, T) tensor per text encoder) -> (hidden states (B, T, D), pooled (B, P) or None),
    as the pipelines compute them: SD takes the last hidden state; SDXL concatenates the penultimate hidden
    states of both encoders and takes the second encoder's projected pooled output."""
    if not sdxl:
        return encoders[0](ids[0])[0], None
    hidden, pooled = [], None
    for enc, i in zip(encoders, ids):
        out = enc(i, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


class DiffusionModel(nn.Module):
    """The trainable parts of a text-to-image pipeline: `unet` and `text_encoder` (+ `text_encoder_2` for SDXL)."""

    loads_with = "diffusers' DiffusionPipeline.from_pretrained"  # what reads the folder save_pretrained writes

    def __init__(self, unet: nn.Module, text_encoders: dict[str, nn.Module], source: str) -> None:
        super().__init__()
        self.unet = unet
        for name, encoder in text_encoders.items():
            self.add_module(name, encoder)
        self.encoder_names = tuple(text_encoders)
        self.name_or_path = source  # the base pipeline folder (adapter metadata, merge, generate)

    @property
    def sdxl(self) -> bool:
        """SDXL-style conditioning: pooled text embeddings and size/crop time ids beside the hidden states."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.encoder_names]

    def encode_text(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return encode_prompt(self.text_encoders(), ids, self.sdxl)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's prediction (B, C, h, w) for noisy latents at `timesteps` (B,) given the caption states."""
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.sdxl else None
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """training.gradient_checkpointing: recompute UNet and text-encoder activations in the backward pass."""
        self.unet.enable_gradient_checkpointing()
        for encoder in self.text_encoders():
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def save_pretrained(self, target: str | Path) -> None:
        """A complete pipeline folder: the base folder's frozen parts (tokenizers, VAE, scheduler) copied, this
        model's UNet and text encoders written (what `tunesmith merge` and full fine-tuning leave)."""
        target, source = Path(target), pipeline_path(self.name_or_path)
        for item in source.iterdir():
            if item.name in TRAINABLE:
                continue
            if item.is_dir():
                shutil.copytree(item, target / item.name, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target / item.name)
        self.unet.save_pretrained(target / "unet", safe_serialization=True)
        for name in self.encoder_names:
            getattr(self, name).save_pretrained(target / name, safe_serialization=True)

    def write_adapter_files(self, folder: str | Path) -> list[Path]:
        """Beside a saved adapter: its LoRA in the files diffusers loads (see lora_files.py)."""
        from .lora_files import write_diffusers_lora
        return write_diffusers_lora(self, Path(folder))


def load_diffusion_model(spec: str | Path, dtype: str = "float32") -> DiffusionModel:
    """The UNet and text encoder(s) of pipeline folder `spec` as one module (the base for adapters)."""
    path = pipeline_path(spec)
    quiet_diffusers()
    from diffusers import UNet2DConditionModel
    present = component_classes(path)
    unet_cls = present.get("unet", ("diffusers", "UNet2DConditionModel"))[1]
    if unet_cls != "UNet2DConditionModel":
        raise TunesmithError(f"{path}: the denoiser is a {unet_cls}; tunesmith trains UNet2DConditionModel pipelines "
                             "(Stable Diffusion 1.x / 2.x / SDXL)")
    torch_dtype = DTYPES[dtype]
    unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=torch_dtype)
    encoders = {n: load_text_encoder(path, n, torch_dtype) for n in TEXT_ENCODERS if n in present}
    if not encoders:
        raise TunesmithError(f"{path}: no text_encoder/; the UNet is conditioned on captions, so the pipeline needs "
                             "its text encoder and tokenizer")
    return DiffusionModel(unet, encoders, str(path.resolve()))
