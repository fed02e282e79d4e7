"""GLUE's metrics, computed locally (scikit-learn, scipy) under the keys of HF's `evaluate` GLUE metric, so that
nothing is fetched from the Hub to score a run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class GlueMetric:
    """Stands where HF's script has `evaluate.load("glue", task)` (or "mse" / "accuracy" without a task), with the
    same `compute` call."""

    task: Optional[str]
    is_regression: bool

    def compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import f1_score, matthews_corrcoef

        if self.task == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if self.task == "stsb":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        if self.task in ("mrpc", "qqp"):
            return {"accuracy": float((predictions == references).mean()), "f1": float(f1_score(references, predictions))}
        if self.task is None and self.is_regression:
            return {"mse": float(((predictions - references) ** 2).mean())}
        return {"accuracy": float((predictions == references).mean())}
