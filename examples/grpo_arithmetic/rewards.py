"""Reward functions for examples/grpo_arithmetic.yaml: `f(prompt, completion, **fields) -> float`.

correct  1.0 when the last number in the reply is the answer (the sum): "4 + 16 = 20" counts
concise  0.5 more when the reply is that number and nothing else (the format the prompt asks for)

A format reward that pays for any bare number, right or wrong, is hacked: a first version paid 0.5 for
every bare number, and the model learned to answer with a bare number while its greedy accuracy fell from
0.62 to 0.22. Here the format is only worth something on a right answer.
"""
from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d+")


def correct(prompt: str, completion: str, answer: str, **fields) -> float:
    numbers = NUMBER.findall(completion)
    return 1.0 if numbers and numbers[-1] == answer else 0.0


def concise(prompt: str, completion: str, answer: str, **fields) -> float:
    bare = re.fullmatch(r"\s*(-?\d+)\.?\s*", completion)
    return 0.5 if bare and bare.group(1) == answer else 0.0
