"""Training: the loop, optimizers and schedules, checkpoints and resume, evaluation, artifacts."""
from .artifacts import load_run, save_result
from .evaluate import evaluate
from .loop import train
from .setup import build

__all__ = ["build", "evaluate", "load_run", "save_result", "train"]
