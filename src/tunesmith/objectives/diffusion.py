"""Denoising diffusion (Stable Diffusion style): the UNet predicts the noise added to a latent (or the velocity).

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps        a_t: the DDPM schedule's alphas_cumprod at timestep t
    epsilon:       target = eps
    v_prediction:  target = sqrt(a_t) eps - sqrt(1 - a_t) x_0
    loss per image = w_t * mean((prediction - target)^2)     min-SNR-gamma (Hang et al. 2023), SNR_t = a_t / (1 - a_t):
        w_t = min(SNR_t, gamma) / SNR_t (epsilon), min(SNR_t, gamma) / (SNR_t + 1) (v_prediction); w_t = 1 when off

The schedule is diffusers' DDPMScheduler built from the pipeline's scheduler config (kept in run.json), so
x_t and the velocity are exactly what diffusers' training scripts compute. The batch (latents, noise,
timesteps, caption conditioning) comes from the data side (tunesmith.diffusion.data); the loss is summed over
images and counted per image, so gradient accumulation stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, TunesmithError
from .base import Objective

PREDICTION_TYPES = ("epsilon", "v_prediction")


@lru_cache(maxsize=8)
def ddpm_scheduler(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                   rescale_betas_zero_snr: bool, prediction_type: str):
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale_betas_zero_snr,
                         prediction_type=prediction_type)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) at each timestep (B,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-image loss weights of min-SNR-gamma (as diffusers' train_text_to_image.py --snr_gamma computes them)."""
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped / (snr_t + 1.0) if prediction_type == "v_prediction" else clipped / snr_t


@dataclass
class Diffusion(Objective):
    name = "diffusion"
    task = "diffusion"
    formats = ("image_caption",)
    default_for = ("image_caption",)

    prediction_type: str = "epsilon"
    snr_gamma: Optional[float] = None
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"objective.prediction_type: {self.prediction_type!r} is not trainable here; choose "
                              f"{' or '.join(PREDICTION_TYPES)} (or auto: the pipeline's own)")

    @classmethod
    def create(cls, cfg, data) -> "Diffusion":
        schedule = dict(getattr(data, "schedule", {}) or {})
        own = schedule.pop("prediction_type", "epsilon")
        requested = getattr(cfg, "prediction_type", "auto")
        return cls(prediction_type=own if requested == "auto" else requested, snr_gamma=getattr(cfg, "snr_gamma", None),
                   **schedule)

    @property
    def scheduler(self):
        return ddpm_scheduler(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule,
                              self.rescale_betas_zero_snr, self.prediction_type)

    @property
    def unit(self) -> str:
        return "images"

    def units(self, batch: dict) -> int:
        return batch["latents"].shape[0]

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Noise the latents at their timesteps and return the UNet's prediction (B, C, h, w)."""
        noisy = self.scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
        if "encoder_hidden_states" in batch:
            if _text_encoder_trains(model):  # cached states would silently leave that encoder untrained
                raise TunesmithError("captions were encoded once before training, but a text encoder has trainable "
                                     "parameters; with these settings the data side must keep token ids (report this)")
            hidden, pooled = batch["encoder_hidden_states"], batch.get("pooled_embeds")
        else:
            ids = [batch[k] for k in ("input_ids", "input_ids_2") if k in batch]
            hidden, pooled = model.encode_text(ids)
        return model.predict(noisy, batch["timesteps"], hidden, pooled, batch.get("time_ids"))

    def target(self, batch: dict) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(batch["latents"], batch["noise"], batch["timesteps"])
        return batch["noise"]

    def count(self, batch: dict) -> int:
        return batch["latents"].shape[0]

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        per_image = F.mse_loss(out.float(), self.target(batch).float(), reduction="none").flatten(1).mean(1)  # (B,)
        if self.snr_gamma:
            per_image = per_image * min_snr_weights(snr(self.scheduler.alphas_cumprod, batch["timesteps"]),
                                                    self.snr_gamma, self.prediction_type)
        return per_image.sum(), per_image.numel()

    def eval_loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        return self.loss(out, batch)


def _text_encoder_trains(model: nn.Module) -> bool:
    return any(p.requires_grad for name in getattr(model, "encoder_names", ())
               for p in getattr(model, name).parameters())


OBJECTIVE = Diffusion
