"""One trial of scripts/tune.py, in a process of its own (a trial's memory, an M-FAC window of GBs among it, goes
back to the system when it ends, and a crash takes one trial down, not the study):

    python scripts/tune_trial.py STORAGE STUDY TRIAL_ID METRIC RUN_GLUE_ARGUMENTS...

run_glue.py runs with a callback that reports each evaluation made during training to the Optuna trial, and stops
the run when the study's pruner says so (exit status PRUNED_EXIT). A mistake in the arguments exits with status 2
and one line, as run_glue.py does. tune.py reads the final score from the run's all_results.json.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import optuna
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run_glue  # noqa: E402
from mfac_optim.glue.command_line import exit_with_usage_error  # noqa: E402
from compare import eval_metrics  # noqa: E402

PRUNED_EXIT = 3
# Evaluations reported before the pruner may stop a trial: M-FAC's first steps precondition with a nearly empty
# window, so its first evaluation says little about where a trial ends.
UNPRUNED_EVALUATIONS = 1
# Metrics that are undefined (NaN) when every prediction is the same, e.g. after a diverged run: such a model has
# no correlation with the labels.
SCORE_OF_UNDEFINED = {"pearson": 0.0, "spearmanr": 0.0, "matthews_correlation": 0.0}


class MetricError(ValueError):
    """The metric to select by is not among a run's results, or is NaN where no score stands for NaN."""


def score(metrics: dict, metric: str) -> float:
    """The trial's score from an evaluation's metrics."""
    key = f"eval_{metric}"
    if key not in metrics:
        available = sorted(name.removeprefix("eval_") for name in eval_metrics(metrics))
        raise MetricError(f"--metric {metric}: not among this run's eval metrics ({', '.join(available)})")
    value = metrics[key]
    if math.isnan(value):
        if metric not in SCORE_OF_UNDEFINED:
            raise MetricError(f"--metric {metric}: NaN in this run's evaluation")
        return SCORE_OF_UNDEFINED[metric]
    return value


class ReportToTrial(TrainerCallback):
    """Reports each evaluation during training to the trial; raises TrialPruned when the pruner says so. The final
    evaluation after training is the trial's value, not an intermediate one."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.reported = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.global_step >= state.max_steps:  # the evaluation after training
            return
        self.trial.report(score(metrics, self.metric), state.global_step)
        self.reported += 1
        if self.reported > UNPRUNED_EVALUATIONS and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {state.global_step}")


def main(argv: list[str]) -> int:
    storage, study_name, trial_id, metric, *run_glue_argv = argv
    study = optuna.load_study(study_name=study_name, storage=storage)
    trial = optuna.Trial(study, int(trial_id))
    try:
        run_glue.main(run_glue_argv, callbacks=[ReportToTrial(trial, metric)])
    except optuna.TrialPruned as pruned:
        print(f"tune_trial.py: {pruned}", flush=True)
        return PRUNED_EXIT
    except MetricError as error:
        exit_with_usage_error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
