"""Compares finished run_glue.py runs: mean ± sample std over seeds per task, metric and optimizer setting.

    python scripts/compare.py runs/bert-mini_sst2_*/seed* --markdown --plot sst2.png

Runs are grouped by what they recorded in run_info.json (task, model, data settings, optimizer and its
arguments; everything but the seed), never by folder names; a local model folder counts as one however it was
spelled. A group's label names only what differs between the groups of its task; the table's title line lists
what they share. Metrics are shown ×100, as GLUE results are quoted.
`--plot` draws the training loss and the main eval metric over steps per group: the mean over seeds, with a
band of ± one standard deviation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Prefixes of the eval entries that are not quality metrics (MNLI adds "_mm" copies of each).
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
    mean: float
    std: Optional[float]  # sample standard deviation (n − 1); None for one run
    n: int
    best: float
    best_seed: int


def summarize(runs: list[Run], metric: str) -> Optional[Summary]:
    scored = [(run.metrics[metric], run.seed) for run in runs if metric in run.metrics]
    if not scored:
        return None
    values = [value for value, _ in scored]
    best, best_seed = max(scored)
    return Summary(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None,
                   len(values), best, best_seed)


def table_rows(groups: dict[str, list[Run]]) -> list[tuple[str, str, Summary]]:
    metrics = sorted({metric for runs in groups.values() for run in runs for metric in run.metrics})
    rows = []
    for metric in metrics:
        for label, runs in groups.items():
            summary = summarize(runs, metric)
            if summary is not None:
                rows.append((metric.removeprefix("eval_"), label, summary))
    return rows


def format_table(task: str, rows: list[tuple[str, str, Summary]], shared: str, markdown: bool) -> str:
    header = ["metric (×100)", "runs", "mean ± std", "n", "best (seed)"]
    body = [[metric, label, f"{100 * s.mean:.2f} ± {100 * s.std:.2f}" if s.std is not None else f"{100 * s.mean:.2f}",
             str(s.n), f"{100 * s.best:.2f} ({s.best_seed})"] for metric, label, s in rows]
    if markdown:
        lines = [f"**{task}** (all runs: {shared})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = [f"{task} (all runs: {shared})", "  ".join(cell.ljust(width) for cell, width in zip(header, widths))]
    return "\n".join(lines + ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in body])


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders written by run_glue.py")
    parser.add_argument("--plot", type=Path, help="write a PNG of loss and eval metric over steps")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        runs = [load_run(path) for path in args.runs]
    except NotARunError as error:
        parser.error(str(error))
    grouped = group_runs(runs)
    print("\n\n".join(format_table(task, table_rows(task_groups.groups), task_groups.shared, args.markdown)
                       for task, task_groups in sorted(grouped.items())))
    if args.plot:
        plot(grouped, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
