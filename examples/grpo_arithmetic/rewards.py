"""Reward functions for examples/grpo_arithmetic.yaml: `f(prompt, completion, **fields) -> float`.

correct      1.0 when the last number in the reply is the answer (the sum): "4 + 16 = 20" counts
number_only  0.5 when the reply is a bare number and nothing else (the format the system message asks for)
"""
from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def correct(prompt: str, completion: str, answer: str, **fields) -> float:
    numbers = NUMBER.findall(completion)
    return 1.0 if numbers and numbers[-1] == answer else 0.0


def number_only(prompt: str, completion: str, **fields) -> float:
    return 0.5 if re.fullmatch(r"\s*-?\d+\.?\s*", completion) else 0.0
