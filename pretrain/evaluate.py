"""Held-out evaluation (kept as the trainer's import path): see ``pretrain.evaluation``, whose
docstring lists the tasks and every metric key."""
from pretrain.evaluation import evaluate, format_metrics, run_evaluation

__all__ = ["evaluate", "format_metrics", "run_evaluation"]
