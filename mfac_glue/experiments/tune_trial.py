"""One trial of scripts/tune.py, in a process of its own (a trial's memory, an M-FAC window of GBs among it, goes
back to the system when it ends, and a crash takes one trial down, not the study):

    MFAC_TUNE_STORAGE=URL python -m mfac_glue.experiments.tune_trial STUDY TRIAL_ID METRIC RUN_GLUE_ARGUMENTS...

run_glue.py runs in this process, as a program (`python -m run_glue`, which the distribution installs beside the
packages: this package never imports the script), with a callback that reports the evaluation at the end of each
epoch to the Optuna trial and stops the run when the study's pruner says so (exit status PRUNED_EXIT), recording
the share of the run's steps it trained (what the trial cost of the study's budget). A mistake in the arguments
exits with status 2 and one line, as run_glue.py does. tune.py reads the final score from the run's all_results.json.
"""
from __future__ import annotations

import math
import os
import runpy
import sys
from typing import Iterable

import optuna
from transformers import TrainerCallback

from .. import exit_with_usage_error
from ..trainer_callbacks import add_trainer_callbacks
from .compare import eval_metrics
from .study_folder import STORAGE_VARIABLE
from .tune_report import TRAINED_FRACTION, successive_halving

PRUNED_EXIT = 3
# Metrics that are undefined (NaN) when every prediction is the same, e.g. after a diverged run: such a model has
# no correlation with the labels.
SCORE_OF_UNDEFINED = {"pearson": 0.0, "spearmanr": 0.0, "matthews_correlation": 0.0}


class MetricError(ValueError):
    """The metric to select by is not among a run's results, or is NaN where no score stands for NaN."""


def not_reported(metric: str, reported: Iterable[str]) -> MetricError:
    """The error of a --metric that a run does not report: before any trial (a GLUE task's metrics are known), or
    from a trial's results."""
    return MetricError(f"--metric {metric}: not among this run's eval metrics ({', '.join(reported)})")


def score(metrics: dict, metric: str) -> float:
    """The trial's score from an evaluation's metrics."""
    key = f"eval_{metric}"
    if key not in metrics:
        raise not_reported(metric, sorted(name.removeprefix("eval_") for name in eval_metrics(metrics)))
    value = metrics[key]
    if math.isnan(value):
        if metric not in SCORE_OF_UNDEFINED:
            raise MetricError(f"--metric {metric}: NaN in this run's evaluation")
        return SCORE_OF_UNDEFINED[metric]
    return value


class ReportToTrial(TrainerCallback):
    """Reports each end-of-epoch evaluation to the trial, as step = the epoch's number (the pruner's rungs are
    epochs); raises TrialPruned when the pruner says so. The evaluation after the last step is the trial's value,
    not an intermediate one."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step >= state.max_steps:
            return
        epoch = round(state.epoch)
        self.trial.report(score(metrics, self.metric), epoch)
        if self.trial.should_prune():
            self.trial.set_user_attr(TRAINED_FRACTION, state.global_step / state.max_steps)
            raise optuna.TrialPruned(f"pruned after epoch {epoch} (step {state.global_step} of {state.max_steps})")


def main(argv: list[str]) -> int:
    study_name, trial_id, metric, *run_glue_argv = argv
    study = optuna.load_study(study_name=study_name, storage=os.environ[STORAGE_VARIABLE])
    study.pruner = successive_halving(study.user_attrs["setting"])
    trial = optuna.Trial(study, int(trial_id))
    add_trainer_callbacks(ReportToTrial(trial, metric))
    sys.argv = ["run_glue.py", *run_glue_argv]
    try:
        runpy.run_module("run_glue", run_name="__main__", alter_sys=True)
    except optuna.TrialPruned as pruned:
        print(f"tune_trial: {pruned}", flush=True)
        return PRUNED_EXIT
    except MetricError as error:
        exit_with_usage_error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
