"""Compares finished run_glue.py runs: mean ± sample std over seeds per task, metric and optimizer setting.

    python scripts/compare.py runs/bert-mini_sst2_*/seed* --markdown --plot sst2.png

Runs are grouped by what they recorded in run_info.json (task, model, data settings, optimizer and its
arguments; everything but the seed), never by folder names. Metrics are shown ×100, as GLUE results are quoted.
`--plot` draws the training loss and the main eval metric over steps per group: the mean over seeds, with a
band of ± one standard deviation.
"""
from __future__ import annotations

import argparse
import json
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


def optimizer_label(optimizer: dict) -> str:
    if optimizer["optim"] == "MFAC":
        return "MFAC " + " ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                                  for key, value in optimizer["optim_args"].items() if key != "weight_decay" or value)
    label = f"{optimizer['optim']} lr={optimizer['learning_rate']:g}"
    if optimizer.get("weight_decay"):
        label += f" weight_decay={optimizer['weight_decay']:g}"
    return label + (f" {optimizer['optim_args']}" if optimizer.get("optim_args") else "")


def group_label(info: dict) -> str:
    """Model, optimizer and any data limits: what distinguishes one group of seeds from another."""
    model = "/".join(Path(str(info["model"])).parts[-2:])  # a Hub id whole; a folder by its last two names
    limits = "".join(f" {key}={info[key]}" for key in ("max_train_samples",) if info.get(key) is not None)
    return f"{model}{limits}, {optimizer_label(info['optimizer'])}"


def group_runs(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """task -> group label -> runs, grouping on everything run_info.json holds except the seed."""
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        key = json.dumps({k: v for k, v in run.info.items() if k != "seed"}, sort_keys=True)
        by_key[key].append(run)
    grouped: dict[str, dict[str, list[Run]]] = defaultdict(dict)
    for members in by_key.values():
        label = group_label(members[0].info)
        while label in grouped[members[0].task]:  # same label, other settings (e.g. sequence length)
            label += f" max_seq_length={members[0].info.get('max_seq_length')}"
        grouped[members[0].task][label] = sorted(members, key=lambda run: run.seed)
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


def format_table(task: str, rows: list[tuple[str, str, Summary]], markdown: bool) -> str:
    header = ["metric (×100)", "runs", "mean ± std", "n", "best (seed)"]
    body = [[metric, label, f"{100 * s.mean:.2f} ± {100 * s.std:.2f}" if s.std is not None else f"{100 * s.mean:.2f}",
             str(s.n), f"{100 * s.best:.2f} ({s.best_seed})"] for metric, label, s in rows]
    if markdown:
        lines = [f"**{task}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = [task, "  ".join(cell.ljust(width) for cell, width in zip(header, widths))]
    return "\n".join(lines + ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in body])


def series(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps logged by every run, and the mean and sample std of `key` over the runs at each of them."""
    per_run = [{entry["step"]: entry[key] for entry in run.log_history if key in entry} for run in runs]
    steps = sorted(set.intersection(*(set(values) for values in per_run))) if per_run else []
    means = [statistics.mean(values[step] for values in per_run) for step in steps]
    stds = [statistics.stdev(values[step] for values in per_run) if len(per_run) > 1 else 0.0 for step in steps]
    return steps, means, stds


def plot(grouped: dict[str, dict[str, list[Run]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(grouped), 2, figsize=(12, 4 * len(grouped)), squeeze=False)
    for row, (task, groups) in enumerate(sorted(grouped.items())):
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
    print("\n\n".join(format_table(task, table_rows(groups), args.markdown) for task, groups in sorted(grouped.items())))
    if args.plot:
        plot(grouped, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
