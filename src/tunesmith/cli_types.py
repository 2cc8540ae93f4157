"""argparse types and checks of command-line text: each refuses a bad value with what it expects."""
from __future__ import annotations

import argparse

from .errors import TunesmithError


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def temperature_arg(text: str) -> float:
    value = number_arg(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or a positive number, got {text}")
    return value


def top_p_arg(text: str) -> float:
    value = number_arg(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def number_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_number(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = number_arg(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def unicode_text(text: str) -> str:
    """Command-line or stdin text that was not valid UTF-8 (Python keeps the bad bytes as lone surrogates, which
    no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TunesmithError(f"the prompt is not valid UTF-8 text (byte {e.start}); save or type it as UTF-8") from None
    return text
