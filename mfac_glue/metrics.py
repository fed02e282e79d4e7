"""GLUE's metrics, computed locally (scikit-learn, scipy) under the keys of HF's `evaluate` GLUE metric, so that
nothing is fetched from the Hub to score a run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


# Each task's metrics, by the names HF's `evaluate` GLUE metric gives them (eval_<name> in a run's results).
TASK_METRICS = {"cola": ("matthews_correlation",), "stsb": ("pearson", "spearmanr"), "mrpc": ("accuracy", "f1"),
                "qqp": ("accuracy", "f1")}


def metric_names(task: Optional[str], is_regression: bool) -> tuple[str, ...]:
    """The metrics a run of `task` reports (without a task: mse for regression, else accuracy)."""
    if task in TASK_METRICS:
        return TASK_METRICS[task]
    return ("mse",) if task is None and is_regression else ("accuracy",)


def _metric(name: str, predictions: np.ndarray, references: np.ndarray) -> float:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if name == "matthews_correlation":
        return float(matthews_corrcoef(references, predictions))
    if name == "pearson":
        return float(pearsonr(predictions, references)[0])
    if name == "spearmanr":
        return float(spearmanr(predictions, references)[0])
    if name == "f1":
        return float(f1_score(references, predictions))
    if name == "mse":
        return float(((predictions - references) ** 2).mean())
    if name == "accuracy":
        return float((predictions == references).mean())
    raise ValueError(f"unknown metric {name!r}")


@dataclass(frozen=True)
class GlueMetric:
    """Stands where HF's script has `evaluate.load("glue", task)` (or "mse" / "accuracy" without a task), with the
    same `compute` call."""

    task: Optional[str]
    is_regression: bool

    def compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        return {name: _metric(name, predictions, references) for name in metric_names(self.task, self.is_regression)}
