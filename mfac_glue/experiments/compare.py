"""Compares finished run_glue.py runs: mean ± sample std over seeds per task, metric and optimizer setting.

    python scripts/compare.py runs/bert-mini_sst2_*/seed* --markdown --plot sst2.png

Runs are grouped by what they recorded in run_info.json (task, model, data settings, optimizer and its
arguments; everything but the seed), never by folder names. A group's label names only what differs between the
groups of its task; the table's title line lists what they share. Metrics are shown ×100, as GLUE results are
quoted.
Each group is set against a reference group of its task (`--reference FOLDER`: the group whose runs lie in that
folder; else the task's first group). When every group shares two or more seeds with the reference (the same data
order and head initialisation), the comparisons are paired by seed (over the shared seeds; `--unpaired` turns
this off); else the groups are independent samples:
- the difference of means with its 95% interval (paired t over the per-seed differences; else Welch's, unequal
  variances), and, where the runs kept their per-example dev predictions, a bootstrap 95% interval over seeds ×
  examples (seeds resampled together for both groups when paired, else within each; the same examples for both);
- p-values of the paired t test, the exact Wilcoxon signed-rank test and the paired TOST within ±--margin points
  (else Welch's, the exact Mann–Whitney test and the TOST), each adjusted by Holm–Bonferroni over every comparison
  of the task's table (groups × metrics);
- the verdict: "separates" when the paired t test's adjusted p is below 0.05 (unpaired: Welch's and
  Mann–Whitney's both); "equivalent within ±δ" when the adjusted TOST p is; "inconclusive" otherwise. With
  `--sequential 5 10` a paired comparison is judged by a group-sequential rule instead: looks at 5 and 10 seeds
  per group, each look's level from an O'Brien–Fleming-type boundary (Lan–DeMets spending, overall α 0.05); at a
  look before the last, a comparison neither separated nor equivalent gets the seeds up to the next look;
- the t test's power to detect a true difference of 0.5 and 1 point at the comparison's seeds and observed σ, and
  the seeds it needs for 80% power, at the level of Holm's first step (0.05 / comparisons).
The table also gives each group's mean training time (evaluations excluded, where the runs recorded that
clock), optimizer state, the training time at which its mean score first reaches the reference's final mean (time
to result, as AlgoPerf scores it), the equal-wall-clock reading (the group's mean score at the reference's
training seconds, and the reference's at the group's, from the evaluations during training), and the highest
1-minute load average seen at its evaluations (above the core count, the runs shared the CPU and their times are
not comparable).
With `--max_load L`, a run whose load average went above L at any evaluation counts as having shared the CPU: its
clock is left out of the training time, the time to result, the equal-wall-clock reading and the time plot's
seconds (the table says from how many runs its time comes); its scores count as any other's, on the curves too.
`--summary` prints one line per group: each metric's mean ± std and its difference from the reference with Welch's
interval and the verdict. `--controls FILE...` adds each task's scores without training (controls.py --output) as
rows of its table and dashed lines of its time plot.
`--plot` draws the training loss and the main eval metric over steps per group; `--time_plot` the main eval
metric against training seconds (evaluations excluded), both as the mean over seeds with a band of ± one
standard deviation.

    python scripts/compare.py runs/fair/stsb/seeds/*/seed* --reference runs/fair/stsb/seeds/stsb_adamw_tuned
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..records import ALL_RESULTS, EVAL_PREDICTIONS, PROVENANCE_KEYS, RUN_INFO, TRAINER_STATE
from mfac_optim.hf.training_log import LOAD_AVERAGE, TRAIN_SECONDS
from .controls import read_controls
from .paired import (ALPHA, TARGET_POWER, PairedDifference, SequentialRule, paired_difference, seeds_needed,
                     t_statistics, t_test_power)

# Prefixes of the eval entries that are not quality metrics (MNLI adds "_mm" copies of each).
SEEDS_SECTION = "## Results over seeds"  # the model card section --model_card writes (and replaces)
# combined_score is the mean of the others: not a metric of its own.
NOT_METRICS = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_samples",
               "eval_combined_score")
DEFAULT_MARGIN = 1.0  # points (×100): the equivalence margin δ of the TOST
TARGET_ROUNDING = 1e-9  # the reference's final mean, summed in another order, may differ from its own curve's end
DEFAULT_RESAMPLES = 2000  # bootstrap resamples over seeds × examples
PLANNING_EFFECTS = (0.005, 0.01)  # true differences (0.5 and 1 point) whose power and seeds needed the table gives


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

    def predictions(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The dev set's per-example predictions and labels run_glue.py kept, if it did."""
        path = self.path / EVAL_PREDICTIONS.format(task=self.task)
        if not path.is_file():
            return None
        table = np.loadtxt(path, delimiter="\t", skiprows=1, ndmin=2)
        return table[:, 1], table[:, 2]

    @property
    def train_seconds(self) -> Optional[float]:
        """Training time with the evaluations' time taken out, where the run's Trainer recorded that clock (its last
        reading, at the end of training); else the Trainer's train_runtime, evaluations included."""
        ends = [entry[TRAIN_SECONDS] for entry in self.log_history if "train_runtime" in entry and TRAIN_SECONDS in entry]
        return ends[-1] if ends else self.results.get("train_runtime")

    @property
    def max_load(self) -> Optional[float]:
        loads = [entry[LOAD_AVERAGE] for entry in self.log_history if LOAD_AVERAGE in entry]
        return max(loads) if loads else None

    def had_the_cpu(self, max_load: Optional[float]) -> bool:
        """Whether the run's times are its own: no threshold, or no load above it at any evaluation (a run that
        recorded no load cannot show it had the cores, so it counts only without a threshold)."""
        return max_load is None or (self.max_load is not None and self.max_load <= max_load)


def timed_runs(runs: list[Run], max_load: Optional[float]) -> list[Run]:
    """The runs whose wall times measure the optimizer, not whatever shared the CPU with it."""
    return [run for run in runs if run.had_the_cpu(max_load)]


def load_run(path: Path) -> Run:
    """A run folder as run_glue.py leaves it; a clear error for anything else."""
    missing = [name for name in (RUN_INFO, ALL_RESULTS) if not (path / name).is_file()]
    if missing:
        raise NotARunError(f"{path} is not a finished run_glue.py run (no {' or '.join(missing)})")
    state_file = path / TRAINER_STATE
    log_history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    return Run(path, json.loads((path / RUN_INFO).read_text()), json.loads((path / ALL_RESULTS).read_text()),
               log_history)


def model_name(model: str) -> str:
    """The model as run_glue.py records it, its weights' hash shortened to 8 digits (enough to tell two apart)."""
    name, _, digest = model.partition("@sha256:")
    return f"{name}@{digest[:8]}" if digest else name


def setting(info: dict) -> tuple[dict, set[str]]:
    """What defines a run apart from its task and seed, as flat key -> value (model, data limits, optimizer and its
    arguments), and the keys that belong to its optimizer alone (num_grads for MFAC, adam_beta1 for Adam, …)."""
    flat = {"model": str(info["model"])}
    flat.update({key: value for key, value in info.items()
                 if key not in ("task_name", "seed", "model", "optimizer", *PROVENANCE_KEYS)})
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
    if key == "warmup_steps" and isinstance(value, float) and 0 < value < 1:  # HF reads a value below 1 as a ratio
        return f"warmup={value:.0%}"
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
    """task -> its groups of seeds, grouped on everything run_info.json holds except the seed. Two runs of one
    setting at one seed (a run folder and its kept copy, say) are refused: they would count one seed twice."""
    by_task: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        members = by_task[run.task][json.dumps(setting(run.info)[0], sort_keys=True)]
        twin = next((member for member in members if member.seed == run.seed), None)
        if twin is not None:
            raise NotARunError(f"{twin.path} and {run.path} are runs of the same setting at seed {run.seed}; "
                               "give one of them")
        members.append(run)
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
    """mean(a) − mean(b): Welch's interval and the p-values of the three tests (raw; `adjusted` after Holm over
    the task's comparisons), and the bootstrap interval where predictions were kept."""
    delta: float
    low: float
    high: float
    p_welch: float
    p_mann_whitney: float
    p_tost: float  # H0: |Δ| ≥ margin
    margin: float
    bootstrap: Optional[tuple[float, float]] = None
    adjusted: Optional[tuple[float, float, float]] = None  # Welch, Mann–Whitney, TOST after Holm

    @property
    def p_values(self) -> tuple[float, float, float]:
        return self.p_welch, self.p_mann_whitney, self.p_tost


def verdict(difference: Union[Difference, PairedDifference], rule: Optional[SequentialRule] = None) -> str:
    """Unpaired: "separates" when Welch's and Mann–Whitney's adjusted p are both below α. Paired: when the paired t
    test's is (the exact Wilcoxon test is shown beside it; with 5 pairs its smallest two-sided p is 2/32 = 0.0625,
    so demanding it too would make 5 seeds unable to separate anything); with a sequential rule, by the rule's
    level at this look. "Equivalent within ±δ" when the adjusted TOST p is below that level; else inconclusive."""
    if rule is not None and isinstance(difference, PairedDifference):
        return rule.verdict(difference)
    first, second, tost = difference.adjusted or difference.p_values
    if first < ALPHA and (isinstance(difference, PairedDifference) or second < ALPHA):
        return "separates"
    if tost < ALPHA:
        return f"equivalent within ±{100 * difference.margin:g}"
    return "inconclusive"


def welch_parts(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) − mean(b), its standard error, and the Welch–Satterthwaite degrees of freedom."""
    delta = statistics.mean(a) - statistics.mean(b)
    share_a, share_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if share_a + share_b == 0:
        return delta, 0.0, math.inf
    degrees = (share_a + share_b) ** 2 / (share_a ** 2 / (len(a) - 1) + share_b ** 2 / (len(b) - 1))
    return delta, math.sqrt(share_a + share_b), degrees


def compare_groups(a: list[float], b: list[float], margin: float, confidence: float = 0.95) -> Optional[Difference]:
    """Welch's t interval and test, the exact Mann–Whitney test, and the TOST within ±margin (two one-sided Welch
    tests); None when either group has fewer than two values."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    delta, error, degrees = welch_parts(a, b)
    mann_whitney = float(stats.mannwhitneyu(a, b, alternative="two-sided", method="exact").pvalue)
    low, high, p_welch, p_tost = t_statistics(delta, error, degrees, margin, confidence)
    return Difference(delta, low, high, p_welch, mann_whitney, p_tost, margin)


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, kept monotone), in the order given."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def bootstrap_intervals(group: list[Run], reference: list[Run], metrics: list[str], resamples: int,
                        confidence: float = 0.95, seed: int = 0,
                        paired: bool = False) -> Optional[dict[str, tuple[float, float]]]:
    """Percentile interval of mean(group) − mean(reference) in each of `metrics`, resampling seeds within each group
    (`paired`: the shared seeds, one draw for both groups) and dev examples (the same ones for both groups, which
    saw the same dev set); None without kept predictions. The metrics share each resample, and a run drawn twice
    in one is scored once."""
    from mfac_glue.metrics import GlueMetric

    if paired:
        group, reference = shared_seed_runs(group, reference)
    kept = [[run.predictions() for run in runs] for runs in (group, reference)]
    if any(prediction is None for runs in kept for prediction in runs):
        return None
    labels = kept[0][0][1]
    task = group[0].task
    scorer = GlueMetric(task, is_regression=task == "stsb")
    rng = np.random.default_rng(seed)
    differences: dict[str, list[float]] = {metric: [] for metric in metrics}
    for _ in range(resamples):
        examples = rng.integers(0, len(labels), len(labels))
        means = []
        pair_draw = rng.integers(0, len(kept[0]), len(kept[0])).tolist() if paired else None
        for runs in kept:
            chosen = pair_draw or rng.integers(0, len(runs), len(runs)).tolist()
            scores = {index: scorer.compute(runs[index][0][examples], labels[examples]) for index in set(chosen)}
            means.append({metric: statistics.mean(scores[index][metric] for index in chosen) for metric in metrics})
        for metric in metrics:
            differences[metric].append(means[0][metric] - means[1][metric])
    bounds = [(1 - confidence) / 2, (1 + confidence) / 2]
    return {metric: tuple(float(bound) for bound in np.quantile(values, bounds))
            for metric, values in differences.items()}


@dataclass
class Row:
    metric: str
    label: str
    summary: Summary
    difference: Optional[Union[Difference, PairedDifference]]  # against the reference; None for the reference itself
    is_reference: bool
    train_seconds: Optional[float]  # mean training time over the timed runs, evaluations excluded where recorded
    timed: int  # how many of the group's runs the training time comes from (those that had the CPU)
    optimizer_bytes: Optional[float]  # mean optimizer state after the first step
    max_load: Optional[float]  # the highest 1-minute load average at any evaluation of the group's runs
    seconds_to_reference: Optional[float]  # when the group's mean first reached the reference's (seconds_to_reach)
    # Equal wall-clock: this group's mean score at the reference's training seconds, and the reference's at this
    # group's (score_at_seconds).
    at_reference_seconds: Optional[float] = None
    reference_at_own_seconds: Optional[float] = None
    power: Optional[tuple[float, ...]] = None  # the t test's power for each of PLANNING_EFFECTS at this n and σ
    seeds_needed: Optional[tuple[Optional[int], ...]] = None  # seeds for TARGET_POWER at each of PLANNING_EFFECTS
    rule: Optional[SequentialRule] = None

    @property
    def verdict(self) -> str:
        return verdict(self.difference, self.rule) if self.difference is not None else ""


def seconds_to_reach(runs: list[Run], key: str, target: float, max_load: Optional[float] = None) -> Optional[float]:
    """Time to result as AlgoPerf scores it: the mean training seconds at the first evaluation where the runs' mean
    `key` reaches `target` (GLUE's metrics: higher is better), up to the rounding of a mean; inf if none does,
    None without training clocks. Seconds and scores as `time_series` pairs them."""
    seconds, means, _ = time_series(runs, key, max_load)
    if not seconds:
        return None
    return next((time for time, mean in zip(seconds, means) if mean >= target - TARGET_ROUNDING), math.inf)


def score_at_seconds(runs: list[Run], key: str, seconds: Optional[float],
                     max_load: Optional[float] = None) -> Optional[float]:
    """The runs' mean `key` at `seconds` of training: at the last evaluation whose mean clock (`time_series`) is at
    or before then, the final one when they trained for less. None without clocks, or before the first evaluation."""
    if seconds is None:
        return None
    clock, means, _ = time_series(runs, key, max_load)
    reached = [mean for time, mean in zip(clock, means) if time <= seconds + TARGET_ROUNDING]
    return reached[-1] if reached else None


def equal_wall_clock(runs: list[Run], reference: list[Run], key: str, is_reference: bool,
                     max_load: Optional[float] = None) -> tuple[Optional[float], Optional[float]]:
    """The group's mean `key` at the reference's mean training seconds, and the reference's at the group's (the
    seconds from the runs that had the CPU; nothing for the reference itself)."""
    if is_reference:
        return None, None
    own_seconds, reference_seconds = (mean_train_seconds(group, max_load) for group in (runs, reference))
    return (score_at_seconds(runs, key, reference_seconds, max_load),
            score_at_seconds(reference, key, own_seconds, max_load))


def mean_train_seconds(runs: list[Run], max_load: Optional[float]) -> Optional[float]:
    """The mean training time of the runs that had the CPU (`max_load`)."""
    return mean_of([run.train_seconds for run in timed_runs(runs, max_load)])


def mean_result(runs: list[Run], key: str) -> Optional[float]:
    return mean_of([run.results.get(key) for run in runs])


def mean_of(values: list[Optional[float]]) -> Optional[float]:
    known = [value for value in values if value is not None]
    return statistics.mean(known) if known else None


def shared_seed_runs(group: list[Run], reference: list[Run]) -> tuple[list[Run], list[Run]]:
    """Both groups' runs at the seeds they share, in seed order."""
    by_seed = [{run.seed: run for run in runs} for runs in (group, reference)]
    seeds = sorted(by_seed[0].keys() & by_seed[1].keys())
    return [by_seed[0][seed] for seed in seeds], [by_seed[1][seed] for seed in seeds]


def can_pair(groups: dict[str, list[Run]], reference: str) -> bool:
    """Whether every group shares at least two seeds with the reference: then every comparison is paired."""
    return all(len(shared_seed_runs(runs, groups[reference])[0]) >= 2
               for label, runs in groups.items() if label != reference)


def compare_metric(runs: list[Run], reference: list[Run], metric: str, margin: float,
                   paired: bool) -> Optional[Union[Difference, PairedDifference]]:
    if paired:
        own, theirs = shared_seed_runs(runs, reference)
        return paired_difference([run.metrics[metric] for run in own], [run.metrics[metric] for run in theirs],
                                 margin)
    values = [[run.metrics[metric] for run in group if metric in run.metrics] for group in (runs, reference)]
    return compare_groups(values[0], values[1], margin)


def planning(difference: Union[Difference, PairedDifference], group: Summary, reference: Summary,
             alpha: float) -> tuple[tuple[float, ...], tuple[Optional[int], ...]]:
    """The t test's power at this comparison's n and observed σ (of the differences, paired; else the groups'
    pooled), and the seeds it needs for TARGET_POWER, for each of PLANNING_EFFECTS."""
    paired = isinstance(difference, PairedDifference)
    if paired:
        n, sd = difference.pairs, difference.sd
    else:
        n, sd = min(group.n, reference.n), math.sqrt((statistics.variance(group.values) +
                                                      statistics.variance(reference.values)) / 2)
    return (tuple(t_test_power(n, effect, sd, alpha, paired) for effect in PLANNING_EFFECTS),
            tuple(seeds_needed(effect, sd, alpha, paired=paired) for effect in PLANNING_EFFECTS))


def table_rows(groups: dict[str, list[Run]], reference: str, margin: float, resamples: int,
               max_load: Optional[float] = None, unpaired: bool = False,
               rule: Optional[SequentialRule] = None) -> list[Row]:
    """Every group against the reference in every metric, the p-values adjusted by Holm over all of them; paired
    by seed when every group shares two or more seeds with the reference (unless `unpaired`), and then judged by
    the sequential `rule` if one is given; the power and seeds needed at the Bonferroni level α / comparisons (the
    level of Holm's first step); the training time from the runs that had the CPU (`max_load`)."""
    paired = not unpaired and can_pair(groups, reference)
    metrics = sorted({metric for runs in groups.values() for run in runs for metric in run.metrics})
    bootstraps: dict[str, Optional[dict[str, tuple[float, float]]]] = {}  # per group, every metric in one pass
    rows = []
    for metric in metrics:
        baseline = summarize(groups[reference], metric)
        for label, runs in groups.items():
            summary = summarize(runs, metric)
            if summary is None:
                continue
            difference = None if label == reference or baseline is None else \
                compare_metric(runs, groups[reference], metric, margin, paired)
            if difference is not None and resamples:
                if label not in bootstraps:
                    bootstraps[label] = bootstrap_intervals(runs, groups[reference],
                                                            [name.removeprefix("eval_") for name in metrics], resamples,
                                                            paired=paired)
                if bootstraps[label] is not None:
                    difference.bootstrap = bootstraps[label][metric.removeprefix("eval_")]
            loads = [run.max_load for run in runs if run.max_load is not None]
            timed = timed_runs(runs, max_load)
            rows.append(Row(metric.removeprefix("eval_"), label, summary, difference, label == reference,
                            mean_train_seconds(runs, max_load), len(timed),
                            mean_result(runs, "optimizer_state_bytes"),
                            max(loads) if loads else None,
                            seconds_to_reach(runs, metric, baseline.mean, max_load) if baseline is not None else None,
                            *equal_wall_clock(runs, groups[reference], metric, label == reference, max_load),
                            rule=rule))
    compared = [row for row in rows if row.difference is not None]
    for row, adjusted in zip(compared, zip(*(holm([row.difference.p_values[test] for row in compared])
                                             for test in range(3)))):
        row.difference.adjusted = adjusted
        row.power, row.seeds_needed = planning(row.difference, row.summary,
                                               summarize(groups[reference], "eval_" + row.metric),
                                               ALPHA / len(compared))
    return rows


def difference_cells(row: Row) -> list[str]:
    """Δ with its interval, the bootstrap interval, the three adjusted p-values and the verdict."""
    if row.is_reference:
        return ["reference", "", "", "", "", ""]
    if row.difference is None:
        return ["n/a (needs 2+ runs in each group)", "", "", "", "", ""]
    d = row.difference
    bootstrap = f"[{100 * d.bootstrap[0]:+.2f}, {100 * d.bootstrap[1]:+.2f}]" if d.bootstrap else "-"
    first, second, tost = d.adjusted
    return [f"{100 * d.delta:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]", bootstrap, f"{first:.2g}",
            f"{second:.2g}", f"{tost:.2g}", row.verdict]


def planning_cells(row: Row) -> list[str]:
    """The power at each of PLANNING_EFFECTS, and the seeds each needs."""
    if row.power is None:
        return ["", ""]
    needed = [str(n) if n is not None else "more" for n in row.seeds_needed]
    return [" / ".join(f"{power:.2f}" for power in row.power), " / ".join(needed)]


def score_cell(score: Optional[float]) -> str:
    return f"{100 * score:.2f}" if score is not None else "-"


def seconds_to_reference_cell(row: Row) -> str:
    if row.seconds_to_reference is None:
        return "-"
    return "not reached" if math.isinf(row.seconds_to_reference) else f"{row.seconds_to_reference:.0f}"


def train_seconds_cell(row: Row) -> str:
    if row.train_seconds is None:
        return "-"
    seconds = f"{row.train_seconds:.0f}"
    return seconds if row.timed == row.summary.n else f"{seconds} ({row.timed} of {row.summary.n} runs)"


Controls = dict[str, dict[str, float]]  # a task's scores without training: control name -> metric -> score


def load_controls(paths: list[Path]) -> dict[str, Controls]:
    """task -> its controls, from the files controls.py wrote."""
    by_task: dict[str, Controls] = defaultdict(dict)
    for path in paths:
        try:
            task, scores = read_controls(path)
        except ValueError as error:
            raise NotARunError(f"--controls {error}")
        by_task[task].update(scores)
    return by_task


def control_label(name: str) -> str:
    return f"control: {name}"


def format_table(task: str, rows: list[Row], shared: str, reference: str, markdown: bool,
                 controls: Optional[Controls] = None) -> str:
    """Every group in every metric; each metric's controls (scores without training) after its groups."""
    paired = any(isinstance(row.difference, PairedDifference) for row in rows)
    tests = ["paired t", "Wilcoxon"] if paired else ["Welch", "Mann–Whitney"]
    effects = " / ".join(f"{100 * effect:g}" for effect in PLANNING_EFFECTS)
    header = ["metric (×100)", "runs", "mean ± std", "n", "best (seed)", f"Δ vs reference [{tests[0]} 95% CI]",
              "bootstrap 95% CI" + (" (paired seeds)" if paired else ""), *(f"p {test} (Holm)" for test in tests),
              "p TOST (Holm)", "verdict", f"power at {effects} pt", f"seeds for {effects} pt ({TARGET_POWER:.0%})",
              "train s", "optimizer GiB", "s to reference's mean", "at reference's s", "reference at this s",
              "max load"]
    body = []
    for index, row in enumerate(rows):
        s = row.summary
        body.append([row.metric, row.label,
                     mean_cell(s),
                     str(s.n), f"{100 * s.best:.2f} ({s.best_seed})", *difference_cells(row), *planning_cells(row),
                     *cost_cells(row), seconds_to_reference_cell(row), score_cell(row.at_reference_seconds),
                     score_cell(row.reference_at_own_seconds),
                     f"{row.max_load:.1f}" if row.max_load is not None else "-"])
        if index + 1 == len(rows) or rows[index + 1].metric != row.metric:
            body += [[row.metric, control_label(name), f"{100 * metrics[row.metric]:.2f}", "-", "-", "no training"]
                     + [""] * 7 + ["-"] * 6 for name, metrics in (controls or {}).items() if row.metric in metrics]
    return layout(task, f"(all runs: {shared}; reference: {reference})", header, body, markdown)


def mean_cell(summary: Summary) -> str:
    return f"{100 * summary.mean:.2f}" + (f" ± {100 * summary.std:.2f}" if summary.std is not None else "")


def cost_cells(row: Row) -> list[str]:
    return [train_seconds_cell(row), f"{row.optimizer_bytes / 2**30:.2f}" if row.optimizer_bytes is not None else "-"]


def format_summary(task: str, rows: list[Row], shared: str, reference: str, markdown: bool,
                   controls: Optional[Controls] = None) -> str:
    """The same comparisons, one line per group: each metric's mean ± std and its difference from the reference
    with its interval (paired t or Welch, as the full table) and the verdict (p-values, power and the bootstrap are
    in the full table); then a line per control."""
    metrics = list(dict.fromkeys(row.metric for row in rows))
    by_group: dict[str, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        by_group[row.label][row.metric] = row
    header = ["group", "n"] + [cell for metric in metrics for cell in (f"{metric} ×100", f"Δ {metric} [95% CI]")] + \
        ["train s", "optimizer GiB"]
    body = []
    for label, cells_by_metric in by_group.items():
        first = next(iter(cells_by_metric.values()))
        cells = [label, str(first.summary.n)]
        for metric in metrics:
            row = cells_by_metric.get(metric)
            if row is None:
                cells += ["-", "-"]
                continue
            delta, *_, verdict = difference_cells(row)
            cells += [mean_cell(row.summary), f"{delta}, {verdict}" if verdict else delta]
        body.append(cells + cost_cells(first))
    for name, scores in (controls or {}).items():
        body.append([control_label(name), "-"] + [cell for metric in metrics for cell in (
            (f"{100 * scores[metric]:.2f}", "no training") if metric in scores else ("-", "-"))] + ["-", "-"])
    return layout(task, f"(all runs: {shared}; reference: {reference})", header, body, markdown)


def layout(task: str, context: str, header: list[str], body: list[list[str]], markdown: bool) -> str:
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


def time_series(runs: list[Run], key: str,
                max_load: Optional[float] = None) -> tuple[list[float], list[float], list[float]]:
    """At each evaluation step every run logged: the mean training seconds up to it over the runs that had the CPU
    (`max_load`), and the mean and sample std of `key` over all the runs: sharing the cores slows a run's clock,
    not its scores, so a group's curve ends at its final mean. Empty when no run had the CPU."""
    steps, means, stds = series(runs, key)
    clocks = [{entry["step"]: entry[TRAIN_SECONDS] for entry in run.log_history if TRAIN_SECONDS in entry and key in entry}
              for run in timed_runs(runs, max_load)]
    timed = [index for index, step in enumerate(steps) if clocks and all(step in clock for clock in clocks)]
    seconds = [statistics.mean(clock[steps[index]] for clock in clocks) for index in timed]
    return seconds, [means[index] for index in timed], [stds[index] for index in timed]


def time_plot(grouped: dict[str, TaskGroups], path: Path, max_load: Optional[float] = None,
              controls: Optional[dict[str, Controls]] = None) -> None:
    """Per task, the main eval metric against training seconds (evaluations excluded), one line per group (its
    scores from every run, its seconds from those that had the CPU: `max_load`), and a dashed line per control:
    the time-to-result view. Beside it the second half of each group's evaluations, on a scale where differences
    of a point show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(grouped), 2, figsize=(14, 4.5 * len(grouped)), squeeze=False)
    for (whole, second_half), (task, task_groups) in zip(axes, sorted(grouped.items())):
        main_metric = next(iter(next(iter(task_groups.groups.values()))[0].metrics))
        name = main_metric.removeprefix("eval_")
        for label, runs in task_groups.groups.items():
            timed = timed_runs(runs, max_load)
            seconds, means, stds = time_series(runs, main_metric, max_load)
            if not seconds:
                continue
            color = None
            for axis, first in ((whole, 0), (second_half, len(seconds) // 2)):
                line, = axis.plot(seconds[first:], [100 * mean for mean in means[first:]], marker="o", markersize=3,
                                  color=color, label=f"{label} (n={len(runs)}, clock from {len(timed)})")
                color = line.get_color()
                axis.fill_between(seconds[first:], [100 * (m - s) for m, s in zip(means[first:], stds[first:])],
                                  [100 * (m + s) for m, s in zip(means[first:], stds[first:])], color=color, alpha=0.2)
        for axis, title in ((whole, "against training time"), (second_half, "the second half of training")):
            for control, scores in (controls or {}).get(task, {}).items():
                if name in scores:
                    axis.axhline(100 * scores[name], color="gray", linestyle="--", label=control_label(control))
            axis.set_title(f"{task}: dev {name}, {title}")
            axis.set_xlabel("training seconds (evaluations excluded)")
            axis.set_ylabel(f"{name} ×100")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_to_model_card(run: Run, table: str) -> None:
    """Puts the seeds' table under the model card run_glue.py wrote for `run` (replacing an earlier one), as the
    M-FAC authors' cards give mean ± std over seeds beside the best run."""
    from mfac_optim.hf.cards import MODEL_CARD

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
    parser.add_argument("--summary", action="store_true",
                        help="one line per group: each metric with its difference from the reference and the verdict")
    parser.add_argument("--reference", type=Path,
                        help="folder holding the reference group's runs (default: each task's first group)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help=f"equivalence margin δ in points (×100) for the TOST (default {DEFAULT_MARGIN:g})")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                        help=f"bootstrap resamples over seeds × examples (default {DEFAULT_RESAMPLES}; 0: none)")
    parser.add_argument("--time_plot", type=Path,
                        help="write a PNG of the main eval metric against training seconds (time to result)")
    parser.add_argument("--max_load", type=float, metavar="L",
                        help="runs whose 1-minute load average went above L at an evaluation shared the CPU: "
                             "the training time and the time plot leave them out (default: none left out)")
    parser.add_argument("--controls", type=Path, nargs="+", default=[], metavar="FILE",
                        help="scores without training, as controls.py --output writes them: a row of their "
                             "task's table, and a dashed line in its time plot")
    parser.add_argument("--unpaired", action="store_true",
                        help="compare groups as independent samples even where they share seeds (Welch, "
                             "Mann–Whitney)")
    parser.add_argument("--sequential", type=int, nargs="+", metavar="SEEDS",
                        help="judge paired comparisons by a group-sequential rule with looks at these numbers of "
                             "seeds per group and an O'Brien–Fleming-type boundary (e.g. 5 10)")
    parser.add_argument("--model_card", type=Path, metavar="RUN",
                        help="add the run's task table (Markdown) to the model card in this run folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.margin > 0 or args.bootstrap < 0:
        parser.error(f"--margin must be > 0 and --bootstrap ≥ 0 (got {args.margin:g} and {args.bootstrap})")
    if args.max_load is not None and not args.max_load > 0:
        parser.error(f"--max_load must be > 0 (got {args.max_load:g})")
    if args.sequential and (args.unpaired or sorted(set(args.sequential)) != args.sequential or args.sequential[0] < 2):
        parser.error(f"--sequential: growing numbers of seeds, the first 2 or more, and not with --unpaired (got "
                     f"{' '.join(map(str, args.sequential))})")
    rule = SequentialRule(tuple(args.sequential)) if args.sequential else None
    try:
        runs = [load_run(path) for path in args.runs]
        controls = load_controls(args.controls)
        card_run = load_run(args.model_card) if args.model_card else None
        grouped = group_runs(runs)
        references = {task: reference_label(task_groups, args.reference) for task, task_groups in grouped.items()}
        if card_run is not None and card_run.task not in grouped:
            raise NotARunError(f"--model_card {args.model_card}: its task {card_run.task} is not among the runs")
    except NotARunError as error:
        parser.error(str(error))

    def table(task: str, markdown: bool, brief: bool = False) -> str:
        task_groups = grouped[task]
        resamples = 0 if brief else args.bootstrap  # the summary shows no bootstrap interval: nothing to wait for
        if resamples:  # a minute or so on a CPU: say so rather than sit silent
            print(f"compare.py: {task}: drawing {resamples} bootstrap resamples over seeds × dev examples "
                  "(--bootstrap 0 skips them)", file=sys.stderr, flush=True)
        rows = table_rows(task_groups.groups, references[task], args.margin / 100, resamples, args.max_load,
                          args.unpaired, rule)
        return (format_summary if brief else format_table)(task, rows, task_groups.shared, references[task], markdown,
                                                           controls.get(task))

    print("\n\n".join(table(task, args.markdown, args.summary) for task in sorted(grouped)))
    if card_run is not None:
        try:
            add_to_model_card(card_run, table(card_run.task, markdown=True))
        except NotARunError as error:
            parser.error(str(error))
        print(f"\ntable added to the model card in {card_run.path}")
    if args.plot:
        plot(grouped, args.plot)
        print(f"\nplot written to {args.plot}")
    if args.time_plot:
        time_plot(grouped, args.time_plot, args.max_load, controls)
        print(f"\ntime-to-result plot written to {args.time_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
