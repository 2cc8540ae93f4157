"""Training: setup -> train_step -> finish over a typed Run; optimizers and schedules, checkpoints and resume,
evaluation, artifacts."""
from .artifacts import LoadedRun, encode_eval_set, load_run, save_result
from .evaluate import evaluate
from .loop import finish, train, train_step
from .run import Run, StepEvent, StepMetrics, Summary, setup
from .setup import build

__all__ = ["LoadedRun", "Run", "StepEvent", "StepMetrics", "Summary", "build", "encode_eval_set", "evaluate",
           "finish", "load_run", "save_result", "setup", "train", "train_step"]
