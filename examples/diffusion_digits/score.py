"""Measure the digits example: does each sample show the digit its prompt names, and in which style?

    python examples/diffusion_digits/score.py runs/diffusion_digits/digits runs/diffusion_digits/style

For each run, 10 samples per name ("zero" .. "nine", 50 DDPM steps, guidance 3, seeds fixed), drawn by the
run's base pipeline and by the fine-tuned one (a full fine-tune: the random pipeline vs the trained UNet; a
LoRA run: the base without and with the adapter). A logistic-regression classifier trained on the real 8x8
scikit-learn digits (96% on held-out real digits) reads each sample, downscaled to 8x8, as it is and
colour-inverted; a sample counts as the named digit when the classifier says so in the polarity whose
background is dark. Also: the mean brightness (0 black .. 1 white) and the share of light backgrounds.
Prints a table and writes docs/results/diffusion_digits.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from tunesmith.adapters import adapter_configs, disable_adapters
from tunesmith.diffusion.pipeline import load_scheduler, load_tokenizers
from tunesmith.diffusion.sample import sample_images
from tunesmith.models import load_model
from tunesmith.train.artifacts import load_run

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PER_NAME = 10


def classifier() -> tuple[LogisticRegression, float]:
    d = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(d.data / 16.0, d.target, test_size=0.25, random_state=0)
    clf = LogisticRegression(max_iter=3000).fit(x_train, y_train)
    return clf, float(clf.score(x_test, y_test))


def score(images: torch.Tensor, clf: LogisticRegression) -> dict:
    """images (N, 1, 16, 16) in [0, 1], prompt-major (PER_NAME per name)."""
    small = F.interpolate(images, size=(8, 8), mode="area")[:, 0]  # (N, 8, 8)
    border = torch.cat([small[:, 0], small[:, -1], small[:, :, 0], small[:, :, -1]], dim=1).mean(1)  # (N,)
    light = border > 0.5
    as_dark = torch.where(light.view(-1, 1, 1), 1 - small, small).reshape(len(small), 64).numpy()
    want = np.repeat(np.arange(10), PER_NAME)
    return {"named_digit": float((clf.predict(as_dark) == want).mean()), "brightness": float(images.mean()),
            "light_background": float(light.float().mean())}


def panels(run_dir: str) -> list[tuple[str, torch.Tensor]]:
    run = load_run(run_dir)
    base = run.info.model["name"]
    toks, scheduler = load_tokenizers(base), load_scheduler(base, run.objective.prediction_type)
    prompts = [n for n in NAMES for _ in range(PER_NAME)]

    def sample(model):
        return sample_images(model.eval(), toks, scheduler, None, prompts, steps=50, guidance_scale=3.0, seed=0)

    if adapter_configs(run.model):
        with disable_adapters(run.model):
            before = sample(run.model)
        return [("base", before), ("with adapter", sample(run.model))]
    return [("base", sample(load_model(base, "diffusion"))), ("fine-tuned", sample(run.model))]


def main(run_dirs: list[str]) -> None:
    torch.set_num_threads(1)
    clf, real = classifier()
    results = {"classifier_accuracy_on_real_digits": real, "samples_per_name": PER_NAME, "runs": {}}
    print(f"classifier: {real:.3f} on held-out real digits")
    print(f"{'run':<34} {'model':<13} {'named digit':>11} {'brightness':>10} {'light bg':>8}")
    for run_dir in run_dirs:
        results["runs"][run_dir] = {}
        for title, images in panels(run_dir):
            s = score(images, clf)
            results["runs"][run_dir][title] = s
            print(f"{run_dir:<34} {title:<13} {s['named_digit']:>11.2f} {s['brightness']:>10.2f} {s['light_background']:>8.2f}")
    out = Path("docs/results/diffusion_digits.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/diffusion_digits/digits", "runs/diffusion_digits/style"])
