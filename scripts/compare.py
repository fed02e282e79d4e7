"""Compares finished run_glue.py runs: mean ± sample std over seeds per task, metric and optimizer setting.

    python scripts/compare.py runs/bert-mini_sst2_*/seed* --markdown --plot sst2.png

Runs are grouped by what they recorded in run_info.json (task, model, data settings, optimizer and its
arguments; everything but the seed), never by folder names; a local model folder counts as one however it was
spelled. A group's label names only what differs between the groups of its task; the table's title line lists
what they share. Metrics are shown ×100, as GLUE results are quoted.
Each group is set against a reference group of its task (`--reference FOLDER`: the group whose runs lie in that
folder; else the task's first group): the difference of means with its 95% confidence interval and Welch's
p-value (unequal variances, over seeds), and the verdict "separates" when the interval excludes zero, "does not
separate" otherwise. The table also gives each group's mean training time and optimizer state.
`--plot` draws the training loss and the main eval metric over steps per group: the mean over seeds, with a
band of ± one standard deviation.

    python scripts/compare.py runs/fair/stsb/seeds/*/seed* --reference runs/fair/stsb/seeds/stsb_adamw_tuned
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Prefixes of the eval entries that are not quality metrics (MNLI adds "_mm" copies of each).
SEEDS_SECTION = "## Results over seeds"  # the model card section --model_card writes (and replaces)
NOT_METRICS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_samples")


def eval_metrics(results: dict) -> dict[str, float]:
    """The quality metrics among a run's results (eval_accuracy, eval_f1, …)."""
    return {key: value for key, value in results.items() if key.startswith("eval_") and not key.startswith(NOT_METRICS)}


class NotARunError(ValueError):
    pass


@dataclass
class Run:
    path: Path
    info: dict
    results: dict
    log_history: list

    @property
    def seed(self) -> int:
        return self.info["seed"]

    @property
    def task(self) -> str:
        return self.info["task_name"] or "custom"

    @property
    def metrics(self) -> dict[str, float]:
        return eval_metrics(self.results)


def load_run(path: Path) -> Run:
    """A run folder as run_glue.py leaves it; a clear error for anything else."""
    missing = [name for name in ("run_info.json", "all_results.json") if not (path / name).is_file()]
    if missing:
        raise NotARunError(f"{path} is not a finished run_glue.py run (no {' or '.join(missing)})")
    state_file = path / "trainer_state.json"
    log_history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    return Run(path, json.loads((path / "run_info.json").read_text()),
               json.loads((path / "all_results.json").read_text()), log_history)


def normalised_model(model: str) -> str:
    """A local folder as its absolute, symlink-free path (runs record it so; older records may not), so that one
    folder spelled two ways is one model; a Hub id as it is."""
    return str(Path(model).resolve()) if os.path.isdir(model) else model


def model_name(model: str) -> str:
    """A Hub id whole; a folder by its last two names."""
    return "/".join(Path(model).parts[-2:])


def setting(info: dict) -> tuple[dict, set[str]]:
    """What defines a run apart from its task and seed, as flat key -> value (model, data limits, optimizer and its
    arguments), and the keys that belong to its optimizer alone (num_grads for MFAC, adam_beta1 for Adam, …)."""
    flat = {"model": normalised_model(str(info["model"]))}
    flat.update({key: value for key, value in info.items() if key not in ("task_name", "seed", "model", "optimizer")})
    optimizer = info["optimizer"]
    if optimizer["optim"] == "MFAC":
        arguments = dict(optimizer["optim_args"])
        lr, weight_decay = arguments.pop("lr"), arguments.pop("weight_decay", 0.0)
    else:
        arguments = {key: value for key, value in optimizer.items() if key != "optim" and value is not None}
        lr, weight_decay = arguments.pop("learning_rate"), arguments.pop("weight_decay", 0.0)
    flat.update(optim=optimizer["optim"], lr=lr, weight_decay=weight_decay, **arguments)
    return flat, set(arguments)


def describe(key: str, value) -> str:
    if key == "model":
        return model_name(value)
    if key == "optim":
        return str(value)
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def distinguishing_labels(settings: list[tuple[dict, set[str]]]) -> tuple[list[str], str]:
    """A label per setting naming only what differs between them, and one line of what they share. An optimizer's
    own keys are compared among the settings of that optimizer only (Adam's betas do not set it apart from M-FAC;
    the optimizer's name does)."""
    def peers(key: str, flat: dict, own: set[str]) -> list[dict]:
        return [other for other, _ in settings if key not in own or other["optim"] == flat["optim"]]

    labels = []
    shared: dict[str, dict[str, None]] = defaultdict(dict)  # "" or an optimizer -> its shared items, in order
    for flat, own in settings:
        parts = []
        for key, value in flat.items():
            if len({json.dumps(other.get(key), sort_keys=True) for other in peers(key, flat, own)}) > 1:
                parts.append(describe(key, value))
            else:
                shared[flat["optim"] if key in own else ""][describe(key, value)] = None
        labels.append(" ".join(parts) or str(flat["optim"]))
    general = ", ".join(shared.pop("", {}))
    return labels, "; ".join([general] + [f"{optim}: {' '.join(items)}" for optim, items in shared.items()])


@dataclass
class TaskGroups:
    groups: dict[str, list[Run]]  # label -> runs, one per seed
    shared: str  # the settings every group of the task has in common


def group_runs(runs: list[Run]) -> dict[str, TaskGroups]:
    """task -> its groups of seeds, grouped on everything run_info.json holds except the seed."""
    by_task: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_task[run.task][json.dumps(setting(run.info)[0], sort_keys=True)].append(run)
    grouped = {}
    for task, by_setting in by_task.items():
        labels, shared = distinguishing_labels([setting(members[0].info) for members in by_setting.values()])
        grouped[task] = TaskGroups({label: sorted(members, key=lambda run: run.seed)
                                    for label, members in zip(labels, by_setting.values())}, shared)
    return grouped


@dataclass
class Summary:
    values: list[float]  # one per seed, in seed order
    best: float
    best_seed: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation (n − 1); None for one run."""
        return statistics.stdev(self.values) if self.n > 1 else None


def summarize(runs: list[Run], metric: str) -> Optional[Summary]:
    scored = [(run.metrics[metric], run.seed) for run in runs if metric in run.metrics]
    if not scored:
        return None
    values = [value for value, _ in scored]
    best, best_seed = max(scored)
    return Summary(values, best, best_seed)


@dataclass
class Difference:
    """mean(a) − mean(b) with its confidence interval and Welch's two-sided p-value."""
    delta: float
    low: float
    high: float
    p_value: float

    @property
    def separates(self) -> bool:
        return self.low > 0 or self.high < 0


def welch_difference(a: list[float], b: list[float], confidence: float = 0.95) -> Optional[Difference]:
    """Welch's t interval for the difference of two means with unequal variances (Welch–Satterthwaite degrees of
    freedom); None when either group has fewer than two values."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    delta = statistics.mean(a) - statistics.mean(b)
    share_a, share_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if share_a + share_b == 0:  # both groups constant: the difference is exact
        return Difference(delta, delta, delta, 1.0 if delta == 0 else 0.0)
    degrees = (share_a + share_b) ** 2 / (share_a ** 2 / (len(a) - 1) + share_b ** 2 / (len(b) - 1))
    half_width = stats.t.ppf((1 + confidence) / 2, degrees) * math.sqrt(share_a + share_b)
    p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Difference(delta, delta - half_width, delta + half_width, p_value)


@dataclass
class Row:
    metric: str
    label: str
    summary: Summary
    difference: Optional[Difference]  # against the reference group; None for the reference itself or too few runs
    is_reference: bool
    train_seconds: Optional[float]  # mean train_runtime over the group's runs
    optimizer_bytes: Optional[float]  # mean optimizer state after the first step


def mean_result(runs: list[Run], key: str) -> Optional[float]:
    values = [run.results[key] for run in runs if run.results.get(key) is not None]
    return statistics.mean(values) if values else None


def table_rows(groups: dict[str, list[Run]], reference: str) -> list[Row]:
    metrics = sorted({metric for runs in groups.values() for run in runs for metric in run.metrics})
    rows = []
    for metric in metrics:
        baseline = summarize(groups[reference], metric)
        for label, runs in groups.items():
            summary = summarize(runs, metric)
            if summary is None:
                continue
            difference = None if label == reference or baseline is None else \
                welch_difference(summary.values, baseline.values)
            rows.append(Row(metric.removeprefix("eval_"), label, summary, difference, label == reference,
                            mean_result(runs, "train_runtime"), mean_result(runs, "optimizer_state_bytes")))
    return rows


def difference_cells(row: Row) -> list[str]:
    if row.is_reference:
        return ["reference", "", ""]
    if row.difference is None:
        return ["n/a (needs 2+ runs in each group)", "", ""]
    d = row.difference
    return [f"{100 * d.delta:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]", f"{d.p_value:.3g}",
            "separates" if d.separates else "does not separate"]


def format_table(task: str, rows: list[Row], shared: str, reference: str, markdown: bool) -> str:
    header = ["metric (×100)", "runs", "mean ± std", "n", "best (seed)", "Δ vs reference [95% CI]", "p (Welch)",
              "verdict", "train s", "optimizer GiB"]
    body = []
    for row in rows:
        s = row.summary
        body.append([row.metric, row.label,
                     f"{100 * s.mean:.2f} ± {100 * s.std:.2f}" if s.std is not None else f"{100 * s.mean:.2f}",
                     str(s.n), f"{100 * s.best:.2f} ({s.best_seed})", *difference_cells(row),
                     f"{row.train_seconds:.0f}" if row.train_seconds is not None else "-",
                     f"{row.optimizer_bytes / 2**30:.2f}" if row.optimizer_bytes is not None else "-"])
    context = f"(all runs: {shared}; reference: {reference})"
    if markdown:
        lines = [f"**{task}** {context}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = [f"{task} {context}", "  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    return "\n".join(lines + ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                              for row in body])


def reference_label(task_groups: TaskGroups, folder: Optional[Path]) -> str:
    """The group whose runs lie in `folder`, else the task's first group."""
    if folder is None:
        return next(iter(task_groups.groups))
    folder = folder.resolve()
    matches = [label for label, runs in task_groups.groups.items()
               if any(folder in run.path.resolve().parents for run in runs)]
    if len(matches) != 1:
        raise NotARunError(f"--reference {folder}: {'no' if not matches else 'more than one'} group of runs lies in it")
    return matches[0]


def series(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps logged by every run, and the mean and sample std of `key` over the runs at each of them."""
    per_run = [{entry["step"]: entry[key] for entry in run.log_history if key in entry} for run in runs]
    steps = sorted(set.intersection(*(set(values) for values in per_run))) if per_run else []
    means = [statistics.mean(values[step] for values in per_run) for step in steps]
    stds = [statistics.stdev(values[step] for values in per_run) if len(per_run) > 1 else 0.0 for step in steps]
    return steps, means, stds


def plot(grouped: dict[str, TaskGroups], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(grouped), 2, figsize=(12, 4 * len(grouped)), squeeze=False)
    for row, (task, task_groups) in enumerate(sorted(grouped.items())):
        groups = task_groups.groups
        main_metric = next(iter(next(iter(groups.values()))[0].metrics), None)
        for column, (key, title) in enumerate((("loss", "training loss"), (main_metric, main_metric))):
            axis = axes[row][column]
            for label, runs in groups.items():
                steps, means, stds = series(runs, key) if key else ([], [], [])
                if not steps:
                    continue
                line, = axis.plot(steps, means, marker="o" if len(steps) < 3 else None, label=f"{label} (n={len(runs)})")
                axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                  color=line.get_color(), alpha=0.2)
            axis.set_title(f"{task}: {title}")
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
    # One legend under the plots: group labels are long, and every panel uses the same colours.
    handles = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    legend_rows = len(handles)
    figure.legend(list(handles.values()), list(handles), loc="lower center", fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.03 * legend_rows / len(grouped), 1, 1))
    figure.savefig(path, dpi=120)


def add_to_model_card(run: Run, table: str) -> None:
    """Puts the seeds' table under the model card run_glue.py wrote for `run` (replacing an earlier one), as the
    M-FAC authors' cards give mean ± std over seeds beside the best run."""
    from mfac_optim.hf_trainer import MODEL_CARD

    card = run.path / MODEL_CARD
    if not card.is_file():
        raise NotARunError(f"--model_card {run.path}: no model card ({MODEL_CARD}) in it; run_glue.py writes one")
    text = card.read_text()
    if SEEDS_SECTION in text:
        text = text[:text.index(SEEDS_SECTION)].rstrip() + "\n"
    card.write_text(f"{text}\n{SEEDS_SECTION}\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by run_glue.py")
    parser.add_argument("--plot", type=Path, help="write a PNG of loss and eval metric over steps")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--reference", type=Path,
                        help="folder holding the reference group's runs (default: each task's first group)")
    parser.add_argument("--model_card", type=Path, metavar="RUN",
                        help="add the run's task table (Markdown) to the model card in this run folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = [load_run(path) for path in args.runs]
        card_run = load_run(args.model_card) if args.model_card else None
        grouped = group_runs(runs)
        references = {task: reference_label(task_groups, args.reference) for task, task_groups in grouped.items()}
        if card_run is not None and card_run.task not in grouped:
            raise NotARunError(f"--model_card {args.model_card}: its task {card_run.task} is not among the runs")
    except NotARunError as error:
        parser.error(str(error))

    def table(task: str, markdown: bool) -> str:
        task_groups = grouped[task]
        return format_table(task, table_rows(task_groups.groups, references[task]), task_groups.shared,
                            references[task], markdown)

    print("\n\n".join(table(task, args.markdown) for task in sorted(grouped)))
    if card_run is not None:
        try:
            add_to_model_card(card_run, table(card_run.task, markdown=True))
        except NotARunError as error:
            parser.error(str(error))
        print(f"\ntable added to the model card in {card_run.path}")
    if args.plot:
        plot(grouped, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
