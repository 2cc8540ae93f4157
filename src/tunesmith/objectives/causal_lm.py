"""Causal language modelling: next-token loss on every token, prompts included (continued pre-training)."""
from __future__ import annotations

from dataclasses import dataclass

from .sft import SFT


@dataclass
class CausalLM(SFT):
    name = "causal_lm"
    default_for = ("text",)

    @staticmethod
    def prepare_example(example: dict) -> dict:
        return {**example, "labels": list(example["input_ids"])}  # learn every token, even prompts


OBJECTIVE = CausalLM
