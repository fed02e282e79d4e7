"""Trainer callbacks that run_glue.py adds to its Trainer on behalf of whoever runs the script in this process (a
tuning trial's report to Optuna, mfac_glue.experiments.tune_trial). The script asks for them, so that the package
runs the script as a program and never imports it."""
from __future__ import annotations

from transformers import TrainerCallback

_CALLBACKS: list[TrainerCallback] = []


def add_trainer_callbacks(*callbacks: TrainerCallback) -> None:
    """Callbacks for the Trainer of every run_glue.py main() this process runs from now on."""
    _CALLBACKS.extend(callbacks)


def trainer_callbacks() -> list[TrainerCallback]:
    return list(_CALLBACKS)
