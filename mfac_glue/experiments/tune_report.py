"""`scripts/tune.py --report STUDY_DIR`: the studies of one folder (one per optimizer) side by side: budgets spent
in full-run equivalents and the wall time they took (each trial also with the CPU cores it kept busy on average:
fewer than the machine has, and it shared them), finished / pruned / failed trials, the best validation score
and its parameters, and for each searched parameter whether its best value has finished trials on both sides and
lies inside the range (the search widens a log range whose edge its best trial reaches); and STUDY_DIR/tuning.png:
each optimizer's best-so-far validation score against the budget spent, beside the importance of each
hyperparameter (Optuna's fANOVA, seeded)."""
from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.importance import FanovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from .. import UsageError
from .search_space import SearchSpace, at_the_edge, search_space_from
from .study_folder import StudyFolder, storage_for_display

TRAINED_FRACTION = "trained_fraction"  # a trial's user attribute: the share of a full run's steps it trained
SHARED_NAMES = {"learning_rate": "lr"}  # the same hyperparameter under the flag's name and M-FAC's key
WIDENED = "widened_ranges"  # a study's user attribute: the log ranges its search widened, {name: [low, high]}


def successive_halving(setting: dict[str, Any]) -> optuna.pruners.SuccessiveHalvingPruner:
    """The study's pruner, from its recorded setting: rungs after min_epochs epochs, then × reduction_factor. The
    pruner is not kept in the storage, so the trial's process makes it again from here."""
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=setting["min_epochs"],
                                                  reduction_factor=setting["reduction_factor"])


def trial_cost(trial: FrozenTrial) -> float:
    """A finished trial's share of a full run (tune_trial records it for a pruned trial; a complete one ran
    in full)."""
    return trial.user_attrs.get(TRAINED_FRACTION, 1.0 if trial.state == TrialState.COMPLETE else 0.0)


@dataclass
class StudySummary:
    name: str
    budget: float  # full-run equivalents
    metric: str
    maximize: bool
    max_train_samples: Optional[int]  # the base config's limit on the training part, if any
    task: Optional[str]
    space: SearchSpace  # as the study recorded it
    trials: list[FrozenTrial]  # finished (complete or pruned), in the order they ran
    failed: int
    wall_seconds: float  # every trial's run, failed ones too: what the search took
    importances: dict[str, float]
    widened: dict[str, list[float]] = field(default_factory=dict)  # log ranges the search widened (in `space`)

    @property
    def spent(self) -> float:
        return sum(trial_cost(trial) for trial in self.trials)

    @property
    def complete(self) -> list[FrozenTrial]:
        return [trial for trial in self.trials if trial.state == TrialState.COMPLETE]

    def has(self, name: str) -> bool:
        """Whether the space samples or fixes `name`."""
        return name in self.space.sampled or name in self.space.fixed

    def value_of(self, trial: FrozenTrial, name: str) -> Any:
        """A parameter of a trial, sampled or fixed."""
        return trial.params[name] if name in self.space.sampled else self.space.fixed[name][1]

    def better(self, value: float, than: Optional[float]) -> bool:
        return than is None or (value > than if self.maximize else value < than)

    @property
    def best(self) -> Optional[FrozenTrial]:
        best = None
        for trial in self.complete:
            if best is None or self.better(trial.value, best.value):
                best = trial
        return best

    def edge_lines(self) -> list[str]:
        """For each numeric parameter the search sampled: where the best trial's value lies among the finished
        trials and in the searched range (as the search left it), what tells whether the range held the best."""
        best = self.best
        if best is None:
            return []
        return [self.edge_line(name, best) for name, (_, distribution) in self.space.sampled.items()
                if all(isinstance(choice, (int, float)) for choice in getattr(distribution, "choices", [0]))]

    def edge_line(self, name: str, best: FrozenTrial) -> str:
        value, distribution = best.params[name], self.space.sampled[name][1]
        below = sum(trial.params[name] < value for trial in self.trials)
        above = sum(trial.params[name] > value for trial in self.trials)
        sides = "finished trials on both sides" if below and above else "NOT bracketed by finished trials"
        tied = [trial.number for trial in self.complete if trial.number != best.number and trial.value == best.value]
        edge = at_the_edge(value, distribution)
        if tied:
            # Trials that score the same (a constant answer, say) leave the pick to the order they finished in:
            # where it lies says nothing about where the best value is, so no range is to be widened for it.
            where = (f"{'at the edge of' if edge else 'inside'} the range, TIED at the best score with trial "
                     f"{', '.join(map(str, tied))}: the scores do not single out a value")
        else:
            where = "AT THE EDGE of the range: widen it" if edge else "inside the range"
        if name in self.widened:
            where += f" (the search widened the range to [{distribution.low:.3g}, {distribution.high:.3g}])"
        return f"{self.name}: best {name} {value:.3g}: {below} finished trials below, {above} above ({sides}); {where}"

    def best_so_far(self) -> list[Optional[float]]:
        """After each finished trial, the best complete value up to it (None while there is none)."""
        values, best = [], None
        for trial in self.trials:
            if trial.state == TrialState.COMPLETE and self.better(trial.value, best):
                best = trial.value
            values.append(best)
        return values

    def median_wall_seconds(self) -> Optional[float]:
        seconds = [trial.user_attrs["wall_seconds"] for trial in self.complete if "wall_seconds" in trial.user_attrs]
        return statistics.median(seconds) if seconds else None


def load_summaries(study_dir: Path, storage: Optional[str] = None) -> list[StudySummary]:
    if storage is None:
        folder = StudyFolder(study_dir)
        if not folder.storage.is_file():
            raise UsageError(f"--report: {study_dir} holds no study ({folder.storage.name} not found)")
        storage = folder.storage_url
    summaries = []
    for name in sorted(optuna.get_all_study_names(storage)):
        study = optuna.load_study(study_name=name, storage=storage)
        setting = study.user_attrs["setting"]
        trials = sorted(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)),
                        key=lambda trial: trial.datetime_complete)
        complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
        # fANOVA explains the variance of the scores: none to explain until two complete trials differ.
        importances = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)) \
            if len({trial.value for trial in complete}) >= 2 else {}
        base = setting["base"]
        widened = study.user_attrs.get(WIDENED, {})
        space = search_space_from(setting["space"], name, f"{storage_for_display(storage)} (study {name})").with_ranges(
            widened)
        wall_seconds = sum(trial.user_attrs.get("wall_seconds", 0.0) for trial in study.get_trials())
        summaries.append(StudySummary(name, study.user_attrs["budget"], setting["metric"],
                                      study.direction == optuna.study.StudyDirection.MAXIMIZE,
                                      base.get("max_train_samples"), base.get("task_name"), space, trials,
                                      len(study.get_trials(states=(TrialState.FAIL,))), wall_seconds, importances,
                                      widened))
    return summaries


def format_params(params: dict) -> str:
    return " ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in params.items())


def report_lines(study_dir: Path, summaries: list[StudySummary]) -> list[str]:
    split = json.loads(StudyFolder(study_dir).split_record.read_text())
    used = sorted({min(summary.max_train_samples or split["train"], split["train"]) for summary in summaries})
    lines = [f"{study_dir}: trials train on {' or '.join(map(str, used))} of the {split['train']} examples of the "
             f"training part and are scored on a validation split of {split['validation']} carved from "
             f"{split['source']} (seed {split['seed']}{', stratified by label' if split['stratified'] else ''}); "
             "the dev set is not read"]
    budgets = {summary.budget for summary in summaries}
    lines.append(f"equal budgets: {budgets.pop():g} full-run equivalents each" if len(budgets) == 1 else
                 "UNEQUAL budgets: " + ", ".join(f"{s.name} {s.budget:g}" for s in summaries))
    header = ["optimizer", "budget", "spent", "search s", "finished", "pruned", "failed", "metric", "best", "trial",
              "median s", "best parameters"]
    rows = []
    for summary in summaries:
        best = summary.best
        median = summary.median_wall_seconds()
        rows.append([summary.name, f"{summary.budget:g}", f"{summary.spent:.2f}", f"{summary.wall_seconds:.0f}",
                     str(len(summary.trials)),
                     str(len(summary.trials) - len(summary.complete)), str(summary.failed), summary.metric,
                     f"{best.value:.4f}" if best else "-", str(best.number) if best else "-",
                     f"{median:.0f}" if median is not None else "-", format_params(best.params) if best else "-"])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + rows]
    lines += [line for summary in summaries for line in summary.edge_lines()]
    for summary in summaries:
        if summary.importances:
            lines.append(f"{summary.name} importance: " + ", ".join(f"{name} {value:.2f}"
                                                                   for name, value in summary.importances.items()))
    for summary in summaries:
        lines += ["", f"{summary.name} trials, in the order they finished:"] + [trial_line(trial)
                                                                                for trial in summary.trials]
    return lines


def trial_line(trial: FrozenTrial) -> str:
    """One finished trial: its value, or where it was pruned and its last reported value, its time and values."""
    seconds = trial.user_attrs.get("wall_seconds")
    if trial.state == TrialState.COMPLETE:
        outcome = f"{trial.value:.4f}"
    else:
        step = max(trial.intermediate_values, default=None)
        outcome = f"pruned after epoch {step} ({trial.intermediate_values[step]:.4f})" if step is not None else "pruned"
    cores = trial.user_attrs.get("cores_used")
    return f"  {trial.number:>3}  {outcome:<32}  {trial_cost(trial):.2f} run  {seconds or 0:>5.0f} s  " \
           f"{f'{cores:.1f} cores' if cores is not None else '- cores':>9}  {format_params(trial.params)}"


def plot(summaries: list[StudySummary], title: str, path: Path) -> None:
    """Search progress and hyperparameter importance side by side; with M-FAC studies, a third panel of each
    M-FAC trial's score against lr × num_grads, the scale of M-FAC's step while its window fills."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {summary.name: f"C{index}" for index, summary in enumerate(summaries)}  # one per study, all panels
    mfac = [summary for summary in summaries if summary.has("lr") and summary.has("num_grads")]
    figure, axes = plt.subplots(1, 3 if mfac else 2, figsize=(18 if mfac else 12, 4.5))
    plot_progress(axes[0], summaries, colours, title)
    plot_importance(axes[1], summaries, colours, title)
    if mfac:
        plot_step_scale(axes[2], mfac, colours, title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_progress(axis, summaries: list[StudySummary], colours: dict[str, str], title: str) -> None:
    for summary in summaries:
        values = summary.best_so_far()
        spent = list(itertools.accumulate(trial_cost(trial) for trial in summary.trials))
        points = [(cost, value) for cost, value in zip(spent, values) if value is not None]
        if points:
            axis.step(*zip(*points), where="post", marker="o", color=colours[summary.name],
                      label=f"{summary.name} ({summary.spent:.2f}/{summary.budget:g} full runs, "
                      f"{len(summary.trials)} trials)")
    axis.set_xlabel("budget spent (full-run equivalents)")
    axis.set_ylabel(f"best validation {summaries[0].metric} so far" if summaries else "")
    axis.set_title(f"{title}: search progress")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def plot_importance(axis, summaries: list[StudySummary], colours: dict[str, str], title: str) -> None:
    """One bar per hyperparameter and study; AdamW's learning_rate and M-FAC's lr share one row, "lr"."""
    importances = [{SHARED_NAMES.get(name, name): value for name, value in summary.importances.items()}
                   for summary in summaries]
    names = sorted({name for shares in importances for name in shares})
    height = 0.8 / max(1, len(summaries))
    for index, (summary, shares) in enumerate(zip(summaries, importances)):
        positions = [row + index * height for row in range(len(names))]
        axis.barh(positions, [shares.get(name, 0.0) for name in names], height=height,
                  color=colours[summary.name], label=summary.name)
    axis.set_yticks([row + 0.4 - height / 2 for row in range(len(names))], names)
    axis.set_xlabel("importance (fANOVA, complete trials)")
    axis.set_title(f"{title}: hyperparameter importance")
    axis.legend(fontsize=8)


def plot_step_scale(axis, summaries: list[StudySummary], colours: dict[str, str], title: str) -> None:
    """Complete trials filled, pruned ones hollow at their last reported value."""
    for summary in summaries:
        colour = colours[summary.name]
        for complete in (True, False):
            points = [(summary.value_of(trial, "lr") * summary.value_of(trial, "num_grads"), last_value(trial))
                      for trial in summary.trials if (trial.state == TrialState.COMPLETE) == complete
                      and last_value(trial) is not None]
            if not points:
                continue
            x, y = zip(*points)
            axis.scatter(x, y, edgecolors=colour, facecolors=colour if complete else "none",
                         label=f"{summary.name}{'' if complete else ' (pruned)'}")
    axis.set_xscale("log")
    axis.set_xlabel("lr × num_grads")
    axis.set_ylabel(f"validation {summaries[0].metric}")
    axis.set_title(f"{title}: M-FAC trials by step scale")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def last_value(trial: FrozenTrial) -> Optional[float]:
    """A complete trial's value, or the last value a pruned one reported."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    return trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None


def report(study_dir: Path, storage: Optional[str] = None) -> int:
    summaries = load_summaries(study_dir, storage)
    print("\n".join(report_lines(study_dir, summaries)))
    path = StudyFolder(study_dir).plot
    plot(summaries, " / ".join(sorted({summary.task or study_dir.name for summary in summaries})), path)
    print(f"plot written to {path}")
    return 0
