"""Weak supervision: fine-tune from heuristics instead of hand labels.

    labeling functions (functions.py: Python, keyword / regex rules in YAML, prompted chat-model questions)
      -> label matrix (apply.py, cached)  -> analysis (analysis.py: coverage, overlap, conflict, accuracy)
      -> label model (label_model.py: Dawid–Skene EM, majority vote) -> soft labels
      -> training with objective soft_classification (data.weak in the run config; data.py)

    from tunesmith.weak import ABSTAIN, apply_functions, fit_dawid_skene, load_functions
"""
from .analysis import FunctionStats, format_table, function_stats, overall_stats, plot_stats
from .apply import LabelMatrix, apply_functions
from .functions import ABSTAIN, LabelingFunction, LabelingFunctionError, load_functions, resolve_classes
from .label_model import DawidSkene, accuracy, fit_dawid_skene, majority_vote, predict

__all__ = ["ABSTAIN", "DawidSkene", "FunctionStats", "LabelMatrix", "LabelingFunction", "LabelingFunctionError",
           "accuracy", "apply_functions", "fit_dawid_skene", "format_table", "function_stats", "load_functions",
           "majority_vote", "overall_stats", "plot_stats", "predict", "resolve_classes"]
