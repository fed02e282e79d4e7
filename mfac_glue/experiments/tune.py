"""Tunes one optimizer for one run_glue.py configuration with Optuna, scored on a validation split carved from the
training file, and writes the best trial as a run_glue.py config that scripts/sweep.py runs as it is.

    python scripts/tune.py configs/bert-mini_stsb_mfac.json --space configs/search/mfac.json \\
        --study_dir runs/tune/stsb -- --model_name_or_path path/to/model \\
        --train_file path/to/STS-B/train.tsv --validation_file path/to/STS-B/dev.tsv
    python scripts/tune.py --report runs/tune/stsb          # every optimizer tuned in that folder, side by side

Each search space (configs/search/*.json) is one study named after its file, kept in STUDY_DIR/study.db
(SQLite) or in --storage (any Optuna RDB URL, e.g. PostgreSQL, for workers on several machines; or the
MFAC_TUNE_STORAGE environment variable, so that a password stays off command lines): run the command
again and an interrupted search resumes where it stopped; finished trials are never repeated, and a trial that was
running when its worker stopped runs again with the same parameters. Several workers may run the same command at
once: they share the study, and each starts a new trial only while budget is left.

The budget is counted in full-run equivalents (--budget, default 6, the same for every optimizer unless you change
it): a trial that trains to the end costs 1, one pruned after its first epoch of three costs 1/3. Pruning is
successive halving over epochs: trials are scored on the validation split at the end of each epoch, and after
--min_epochs epochs (then --min_epochs × --reduction_factor, ...) a trial goes on only if its score is in the best
1/--reduction_factor of the trials that reached that epoch.

Selection never sees the dev set, nor the evaluation seeds: STUDY_DIR/data/ holds the training file split once
(seeded; stratified by label for classification) into a training part and a validation part of --validation_size
examples. Trials train on the first at --trial_seed and are scored on the second, by the task's main metric at the
end of training. The best config, STUDY_DIR/<task>_<space>_tuned.json, trains on the same training part and
evaluates on --validation_file (the dev set; for GLUE from the Hub, its validation split), for the seed runs
(scripts/sweep.py gives each its seed). Arguments after `--` go to every trial, last, so they override the config.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import datasets
import optuna
import sqlalchemy
from optuna.trial import TrialState

from ..arguments import DataTrainingArguments, parse_arguments

from .. import UsageError, exit_with_usage_error
from ..json_config import config_flags, read_json_object
from ..metrics import metric_names
from ..data import GLUE_ON_THE_HUB, glue_split_from_hub, load_local_datasets
from ..records import ALL_RESULTS, file_source_record, model_source_record
from mfac_optim.hf.optim_args import typed_value
from .search_space import SearchSpace, load_search_space, widened_range
from .study_folder import STORAGE_VARIABLE, StudyFolder, storage_for_display, tuned_name
from .sweep import DEFAULT_SEEDS, split_at_double_dash
from .tune_report import TRAINED_FRACTION, WIDENED, format_params, report, successive_halving, trial_cost
from .tune_trial import PRUNED_EXIT, MetricError, not_reported, score

TRIAL_MODULE = "mfac_glue.experiments.tune_trial"  # each trial runs in a process of its own
DEFAULT_BUDGET = 6.0  # full-run equivalents per optimizer
# Summed fractions of a run fall short of whole numbers by rounding (four full runs and six pruned thirds, in the
# order one study finished them, added up to 5.999999999999999): so small a shortfall is no budget left.
BUDGET_ROUNDING = 1e-9
STARTUP_TRIALS = 4  # random trials before TPE models the space
DEFAULT_TRIAL_SEED = 42  # HF's default seed; never one of the evaluation seeds
HF_DEFAULT_EPOCHS = 3.0  # TrainingArguments.num_train_epochs when a config gives none
# A worker that stops beating for GRACE_SECONDS is taken for dead: its running trial fails and runs again.
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 300
RETRIES = 3  # runs of one trial's parameters after its worker died, before the study gives up on them
STORAGE_ATTEMPTS = 5
MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}  # else accuracy
USAGE_EXIT = 2  # run_glue.py's status for a mistake in its arguments
MINIMIZED = ("loss", "mse")  # metrics where lower is better; every other one is maximised


# --------------------------------------------------------------------------------------------------------------
# Arguments and the trials' base configuration
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = split_at_double_dash(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", type=Path, help="run_glue.py JSON config: the setting to tune")
    parser.add_argument("--space", type=Path, help="search space JSON (configs/search/*.json)")
    parser.add_argument("--study_dir", type=Path, help="folder of the study: its SQLite storage, data split, trials")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help=f"full-run equivalents per optimizer: a trial that trains to the end costs 1, one "
                        f"pruned earlier its fraction of the steps (default {DEFAULT_BUDGET:g})")
    parser.add_argument("--min_epochs", type=int, default=1,
                        help="epochs every trial trains before it may be pruned (the smallest rung; default 1)")
    parser.add_argument("--reduction_factor", type=int, default=3,
                        help="successive halving: at each rung the best 1/N of the trials go on (default 3)")
    parser.add_argument("--trial_seed", type=int, default=DEFAULT_TRIAL_SEED,
                        help=f"seed of every trial's run (default {DEFAULT_TRIAL_SEED}; not an evaluation seed)")
    parser.add_argument("--storage", default=os.environ.get(STORAGE_VARIABLE),
                        help=f"Optuna storage URL shared by the workers (default: ${STORAGE_VARIABLE}, else sqlite "
                        "in STUDY_DIR; e.g. postgresql+psycopg://user@host/db for workers on several machines). "
                        "Its password is never written out")
    parser.add_argument("--grace_period", type=float, default=GRACE_SECONDS,
                        help=f"seconds after which a worker whose heartbeat stopped is taken for dead: its running "
                        f"trial fails and runs again (default {GRACE_SECONDS})")
    parser.add_argument("--metric", help="eval metric to select by (default: the task's main metric; loss and mse "
                        "are minimised, the others maximised)")
    parser.add_argument("--validation_size", type=float, default=0.1,
                        help="examples carved from the training file for selection: a fraction < 1, or a count")
    parser.add_argument("--sampler_seed", type=int, default=0,
                        help="seed of the data split and of the TPE sampler (each trial adds its number)")
    parser.add_argument("--report", type=Path, metavar="STUDY_DIR",
                        help="print the studies in STUDY_DIR side by side and plot them (STUDY_DIR/tuning.png)")
    args = parser.parse_args(argv)
    if args.report is not None:
        if args.config or args.space or extra:
            exit_with_usage_error("--report: takes a study folder (and its --storage, if not the folder's) alone")
        return args, extra
    for flag, value in (("config", args.config), ("--space", args.space), ("--study_dir", args.study_dir)):
        if value is None:
            exit_with_usage_error(f"{flag}: required (or --report STUDY_DIR)")
    if not args.grace_period > 0:
        exit_with_usage_error(f"--grace_period: seconds, must be > 0 (got {args.grace_period:g})")
    if not args.budget > 0:
        exit_with_usage_error(f"--budget: full-run equivalents, must be > 0 (got {args.budget:g})")
    if args.min_epochs < 1 or args.reduction_factor < 2:
        exit_with_usage_error(f"--min_epochs must be at least 1 and --reduction_factor at least 2 (got "
                              f"{args.min_epochs} and {args.reduction_factor})")
    if args.trial_seed in DEFAULT_SEEDS:
        exit_with_usage_error(f"--trial_seed: {args.trial_seed} is one of the evaluation seeds "
                              f"({DEFAULT_SEEDS[0]}-{DEFAULT_SEEDS[-1]}); selection must not see them")
    if not (0 < args.validation_size < 1 or (args.validation_size >= 1 and args.validation_size.is_integer())):
        exit_with_usage_error(f"--validation_size: a fraction in (0, 1) or a whole count (got {args.validation_size})")
    return args, extra


def flags_config(flags: list[str]) -> dict[str, Any]:
    """Command-line flags as a config dict, as run_glue.py's JSON configs hold them (the inverse of config_flags):
    `--do_train` -> true, `--seed 5` -> 5, `--optim_args '{...}'` -> an object, `--report_to none wandb` -> a list."""
    config: dict[str, Any] = {}
    key, values = None, []
    for token in [*flags, "--"]:
        if token.startswith("--"):
            if key is not None:
                config[key] = True if not values else values[0] if len(values) == 1 else values
            key, values = token[2:], []
        elif key is None:
            raise UsageError(f"arguments after --: {token!r} does not follow a --flag")
        else:
            values.append(json_object(token, key) if token.lstrip().startswith("{") else typed_value(token))
    return config


def json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--{flag}: not valid JSON ({error.msg} at char {error.pos}): {text}") from None


def base_config(config_path: Path, extra: list[str]) -> dict[str, Any]:
    """The config file with the flags after `--` applied, as one dict."""
    return {**read_json_object(config_path, "config file", "arguments"), **flags_config(extra)}


def main_metric(task: Optional[str]) -> str:
    return MAIN_METRIC.get(task, "accuracy")


def check_metric(metric: str, task: Optional[str]) -> None:
    """A GLUE task's metrics are known before any trial runs: a --metric it does not report is one line then (with
    local files and no task, the first trial's results tell)."""
    if task is None:
        return
    reported = metric_names(task, is_regression=task == "stsb")
    if metric not in (*reported, "loss"):
        raise UsageError(str(not_reported(metric, reported)))


# --------------------------------------------------------------------------------------------------------------
# The validation split carved from the training file
# --------------------------------------------------------------------------------------------------------------
def training_examples(config: dict[str, Any]):
    """The configuration's training data as a `datasets.Dataset` with HF's columns: a local file, else GLUE's
    train split from the Hub (or its cache)."""
    task, train_file = config.get("task_name"), config.get("train_file")
    if train_file is not None:
        # DataTrainingArguments wants an evaluation file beside a training file without a task: only train is read.
        data_args = DataTrainingArguments(task_name=task, train_file=train_file,
                                          validation_file=None if task else train_file)
        return load_local_datasets(data_args, config.get("cache_dir"))["train"]
    if task is None:
        raise UsageError("--train_file: needed (or --task_name for GLUE from the Hub) to carve a validation split")
    return glue_split_from_hub(task, "train", config.get("cache_dir"))


def write_jsonl(examples, rows: Iterable[int], path: Path) -> None:
    """Written whole, then moved into place: workers that start together carve the same split, and none of them
    reads a file another is still writing."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(partial, "w") as handle:
        for row in rows:
            handle.write(json.dumps(examples[row]) + "\n")
    os.replace(partial, path)


def dev_set_file(config: dict[str, Any], study: StudyFolder) -> str:
    """The seed runs' evaluation data: the configuration's --validation_file, else GLUE's validation split from the
    Hub, written into the study folder once the search is over (trials never read it)."""
    if "validation_file" in config:
        return config["validation_file"]
    path = study.dev_set
    if not path.is_file():
        dev = glue_split_from_hub(config["task_name"], "validation", config.get("cache_dir"))
        write_jsonl(dev, range(len(dev)), path)
    return str(path)


def carve_validation(config: dict[str, Any], size: float, seed: int, study: StudyFolder) -> dict[str, Any]:
    """Splits the training data once into the study's training part and validation split (file order kept in
    both), stratified by label for classification; returns what was done (also kept in the split record). A
    folder that holds a split already is used as it is; one that holds only its record (a study's kept evidence)
    is carved again, identically."""
    record_file = study.split_record
    if all(path.is_file() for path in study.split_files):
        return json.loads(record_file.read_text())
    from sklearn.model_selection import train_test_split

    examples = training_examples(config)
    labels = examples["label"]
    stratified = not any(isinstance(label, float) for label in labels)
    count = int(size) if size >= 1 else max(1, round(size * len(examples)))
    if not 0 < count < len(examples):
        raise UsageError(f"--validation_size: {count} examples of {len(examples)} leaves nothing to train on")
    train_rows, validation_rows = train_test_split(list(range(len(examples))), test_size=count, random_state=seed,
                                                   stratify=labels if stratified else None)
    study.data.mkdir(parents=True, exist_ok=True)
    for path, rows in ((study.train_part, train_rows), (study.validation_split, validation_rows)):
        write_jsonl(examples, sorted(rows), path)
    source = config.get("train_file")
    record = {"source": file_source_record(source) if source else f"{GLUE_ON_THE_HUB} {config.get('task_name')} train",
              "train": len(train_rows), "validation": len(validation_rows), "stratified": stratified, "seed": seed}
    partial = record_file.with_name(f"{record_file.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, record_file)  # last: a folder with the record holds the whole split
    return record


# --------------------------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------------------------
def trial_config(base: dict[str, Any], values: dict[str, dict[str, Any]], space: SearchSpace) -> dict[str, Any]:
    """The base configuration with a trial's values and optimizer; `--optim_args` only from the space."""
    config = {key: value for key, value in base.items() if key not in ("optim", "optim_args")}
    config.update(values["flags"], optim=space.optim)
    if values["optim_args"]:
        config["optim_args"] = values["optim_args"]
    if "lr" in values["optim_args"]:  # --learning_rate says the same (run_glue.py warns when they differ)
        config["learning_rate"] = values["optim_args"]["lr"]
    return config


def search_run_config(config: dict[str, Any], study: StudyFolder, output_dir: Path, seed: int) -> dict[str, Any]:
    """A trial's run: the carved training part and validation split, at the selection seed, scored at the end of
    each epoch for successive halving, nothing saved but the results."""
    run = {**config, "do_train": True, "do_eval": True, "train_file": str(study.train_part),
           "validation_file": str(study.validation_split), "output_dir": str(output_dir), "save_strategy": "no",
           "eval_strategy": "epoch", "seed": seed}
    for key in ("do_predict", "test_file", "eval_steps"):
        run.pop(key, None)
    return run


def final_config(config: dict[str, Any], study: StudyFolder, name: str) -> dict[str, Any]:
    """The selected setting for the seed runs: the same training part, evaluated on the dev set; the seed is the
    sweep's to give."""
    final = {**config, "do_train": True, "do_eval": True, "train_file": str(study.train_part),
             "validation_file": dev_set_file(config, study), "output_dir": f"runs/{name}"}
    final.pop("seed", None)
    return final


def trial_sampler(seed: int, trial_number: int) -> optuna.samplers.TPESampler:
    """TPE seeded for one trial. A sampler seeded once per process draws from the start of its sequence again in
    every new process: a resumed search would repeat its first trials' parameters, and workers that start
    together would draw the same ones. Seeding by the trial's number, which the storage hands out once, keeps a
    search reproducible and every trial new. The constant liar counts other workers' running trials as bad, so
    that TPE does not send two workers to one point."""
    return optuna.samplers.TPESampler(seed=seed + trial_number, n_startup_trials=STARTUP_TRIALS, constant_liar=True)


def shared_storage(url: str, grace_period: float = GRACE_SECONDS) -> optuna.storages.RDBStorage:
    """The study's storage, with heartbeats: a trial whose worker died (killed, or its machine lost) is failed by
    the next worker that looks, once its heartbeat is `grace_period` seconds old, and runs again with the same
    parameters. A worker beats several times within the grace period."""
    heartbeat = max(1, min(HEARTBEAT_SECONDS, int(grace_period / 4)))
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}  # workers wait for the file
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=math.ceil(grace_period),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES))
        except sqlalchemy.exc.DBAPIError:
            # Workers that start together race to make the tables and their version row; the loser
            # finds them made when it tries again.
            if attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(1 + attempt)


def portable(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration as a study records it: a local model folder or data file as its name and a hash of its
    contents, so the record holds no machine's paths and a study resumes from a copy of the files elsewhere."""
    recorded = dict(config)
    for key in ("model_name_or_path", "config_name", "tokenizer_name"):
        if isinstance(recorded.get(key), str):
            recorded[key] = model_source_record(recorded[key])
    for key in ("train_file", "validation_file", "test_file"):
        if isinstance(recorded.get(key), str) and Path(recorded[key]).is_file():
            recorded[key] = file_source_record(recorded[key])
    return recorded


class Search:
    """One optimizer's study: runs trials until its budget of full-run equivalents is spent, beside any other
    workers of the same study, resuming a stopped search."""

    def __init__(self, args: argparse.Namespace, base: dict[str, Any], space: SearchSpace) -> None:
        self.args, self.base, self.file_space = args, base, space
        self.metric = args.metric or main_metric(base.get("task_name"))
        self.folder = StudyFolder(args.study_dir)
        self.storage_url = args.storage or self.folder.storage_url
        self.study = optuna.create_study(
            study_name=space.name, storage=shared_storage(self.storage_url, args.grace_period), load_if_exists=True,
            direction="minimize" if self.metric in MINIMIZED else "maximize",
            pruner=successive_halving(vars(args)),  # its rungs only: the full setting hashes the model's weights
            # A grid's points are handed out through the storage, so workers and a resumed search share one grid.
            sampler=optuna.samplers.GridSampler(space.grid_points(), seed=args.sampler_seed) if space.grid else None)
        self.check_same_setting()
        self.space = space.with_ranges(self.study.user_attrs.get(WIDENED, {}))

    def setting(self) -> dict[str, Any]:
        """What a study's trials share: a resumed study, and every worker, must be given the same."""
        return {"space": json.loads(self.args.space.read_text()), "metric": self.metric, "base": portable(self.base),
                "validation_size": self.args.validation_size, "sampler_seed": self.args.sampler_seed,
                "trial_seed": self.args.trial_seed, "min_epochs": self.args.min_epochs,
                "reduction_factor": self.args.reduction_factor}

    def check_same_setting(self) -> None:
        """A resumed study must be given the same setting; its budget may grow (the report prints it)."""
        recorded = self.study.user_attrs.get("setting")
        if recorded is None:
            self.study.set_user_attr("setting", self.setting())
        else:
            changed = [key for key, value in self.setting().items() if recorded.get(key) != value]
            if changed:
                raise UsageError(f"{self.args.study_dir}: study {self.file_space.name!r} was made with another "
                                 f"{', '.join(changed)}: use another --study_dir, or the same arguments to resume it")
        self.study.set_user_attr("budget", self.args.budget)

    def rung_fraction(self) -> float:
        """The share of a full run that a trial trains before it may be pruned: what a running trial will cost
        at least."""
        return min(1.0, self.args.min_epochs / float(self.base.get("num_train_epochs", HF_DEFAULT_EPOCHS)))

    def spent(self) -> float:
        """Full-run equivalents the study has used: its finished trials' trained fractions, and the least that
        each running trial will use. A worker whose heartbeat stopped is found first, so that its trial counts
        as the retry that replaces it."""
        optuna.storages.fail_stale_trials(self.study)
        trials = self.study.get_trials(deepcopy=False)
        finished = sum(trial_cost(trial) for trial in trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED))
        running = sum(trial.state == TrialState.RUNNING for trial in trials)
        return finished + running * self.rung_fraction()

    def requeue_interrupted(self) -> None:
        """Trials stopped by Ctrl-C or SIGTERM run again with the same parameters (the heartbeat takes care of
        workers that died without a word)."""
        trials = self.study.get_trials(deepcopy=False)
        retried = {trial.user_attrs.get("retry_of") for trial in trials}
        for trial in trials:
            if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") and trial.number not in retried:
                print(f"{self.space.name}: trial {trial.number} was interrupted; it runs again", flush=True)
                self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})

    def run(self) -> None:
        carve_validation(self.base, self.args.validation_size, self.args.sampler_seed, self.folder)
        self.check_trial_arguments()
        self.requeue_interrupted()
        while budget_left(self.spent(), self.args.budget) and not self.grid_covered():
            self.space = widen_at_the_edges(self.study, self.file_space)
            self.study.optimize(self.objective, n_trials=1)

    def grid_covered(self) -> bool:
        """For a grid space: whether every point has a finished trial (TPE spaces are never covered)."""
        if not self.space.grid:
            return False
        finished = {tuple(sorted(trial.params.items())) for trial in self.study.get_trials(deepcopy=False)
                    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)}
        return len(finished) >= math.prod(len(choices) for choices in self.space.grid_points().values())

    def check_trial_arguments(self) -> None:
        """run_glue.py's own checks of a trial's arguments (flags, M-FAC's keys, data columns, the model's config),
        with each range at its low end, before any trial runs: a mistake ends with one line, no model loaded."""
        lowest = {name: lowest_value(distribution) for name, (_, distribution) in self.space.sampled.items()}
        run = search_run_config(trial_config(self.base, self.space.arrange(lowest), self.space), self.folder,
                                self.folder.trial(self.space.name, "check"), self.args.trial_seed)
        datasets.disable_progress_bars()  # the check reads the carved files: no bars between tune.py's lines
        parse_arguments(config_flags(run))

    def objective(self, trial: optuna.Trial) -> float:
        if not self.space.grid:
            self.study.sampler = trial_sampler(self.args.sampler_seed, trial.number)
        values = self.space.suggest(trial)
        output_dir = self.folder.trial(self.space.name, str(trial.number))
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
        run = search_run_config(trial_config(self.base, values, self.space), self.folder, output_dir,
                                self.args.trial_seed)
        # Optuna's Trial takes the storage's id of the trial (its number counts within the study only). The storage
        # URL goes through the environment: a command line is visible to every user of the machine.
        command = [sys.executable, "-m", TRIAL_MODULE, self.space.name, str(trial._trial_id), self.metric,
                   *config_flags(run)]
        start, cpu_start = time.perf_counter(), children_cpu_seconds()
        try:
            with open(StudyFolder.trial_log(output_dir), "w") as log:
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, STORAGE_VARIABLE: self.storage_url})
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        seconds = time.perf_counter() - start
        trial.set_user_attr("wall_seconds", seconds)
        # The cores the trial kept busy on average: below the machine's count, it shared them with other work.
        trial.set_user_attr("cores_used", (children_cpu_seconds() - cpu_start) / seconds)
        prefix = f"{self.space.name} trial {trial.number}"
        if code == PRUNED_EXIT:
            fraction = self.study._storage.get_trial(trial._trial_id).user_attrs.get(TRAINED_FRACTION, 0.0)
            print(f"{prefix}: pruned after {fraction:.2f} of a run, {seconds:.0f} s {format_params(trial.params)}",
                  flush=True)
            raise optuna.TrialPruned()
        if code == USAGE_EXIT:  # a mistake in the arguments (run_glue.py's checks, or --metric): its one line
            raise UsageError(f"{prefix}: {last_line(StudyFolder.trial_log(output_dir))}")
        results_file = output_dir / ALL_RESULTS
        if code != 0 or not results_file.is_file():
            raise TrialFailed(f"{prefix}: run_glue.py failed (exit {code}); see {StudyFolder.trial_log(output_dir)}")
        results = json.loads(results_file.read_text())
        trial.set_user_attr("optimizer_state_bytes", results.get("optimizer_state_bytes"))
        trial.set_user_attr(TRAINED_FRACTION, 1.0)
        try:
            value = score(results, self.metric)
        except MetricError as error:
            raise UsageError(f"{prefix}: {error}") from None
        print(f"{prefix}: {self.metric} {value:.4f} in {seconds:.0f} s {format_params(trial.params)}", flush=True)
        return value

    def write_best_config(self) -> Path:
        best = self.study.best_trial
        task = self.base.get("task_name")
        config = final_config(trial_config(self.base, self.space.arrange(best.params), self.space), self.folder,
                              tuned_name(task, self.space.name))
        path = self.folder.tuned_config(task, self.space.name)
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path


def widen_at_the_edges(study: optuna.Study, space: SearchSpace) -> SearchSpace:
    """The edge rule. Once STARTUP_TRIALS trials have finished, a log range whose edge the best complete trial
    reaches (search_space.edges_reached) is widened past that edge, and every later trial samples the wider range:
    the rest of the budget is spent there. A best score tied with another trial's singles out no value, and widens
    nothing. The widened ranges are kept in the study, so that every worker and a resumed search share them.
    Returns `space` (the file's) with the study's ranges."""
    widened = dict(study.user_attrs.get(WIDENED, {}))
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    if space.grid or len(trials) < STARTUP_TRIALS or not complete:
        return space.with_ranges(widened)
    best = study.best_trial
    if any(trial.value == best.value for trial in complete if trial.number != best.number):
        return space.with_ranges(widened)
    current = space.with_ranges(widened)
    for name, (_, distribution) in current.sampled.items():
        wider = widened_range(best.params[name], distribution)
        if wider is not None:
            widened[name] = wider
            print(f"{space.name}: best {name} {best.params[name]:.3g} (trial {best.number}) lies at the edge of "
                  f"[{distribution.low:.3g}, {distribution.high:.3g}]: the search goes on in [{wider[0]:.3g}, "
                  f"{wider[1]:.3g}]", flush=True)
    if widened != study.user_attrs.get(WIDENED, {}):
        study.set_user_attr(WIDENED, widened)
    return space.with_ranges(widened)


def budget_left(spent: float, budget: float) -> bool:
    """Whether a study that has spent `spent` full-run equivalents may start another trial."""
    return spent < budget - BUDGET_ROUNDING


def children_cpu_seconds() -> float:
    """User and system CPU time of this process's finished children (the trials)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class TrialFailed(RuntimeError):
    """A trial's run_glue.py ended with an error: the search stops (a rerun resumes it) rather than count it."""


def lowest_value(distribution: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return distribution.choices[0]
    return distribution.low


def search(args: argparse.Namespace, extra: list[str]) -> int:
    space = load_search_space(args.space)
    base = base_config(args.config, extra)
    if "validation_file" not in base and (base.get("train_file") is not None or base.get("task_name") is None):
        raise UsageError("--validation_file: needed with --train_file, for the best config's seed runs (the dev set; "
                         "the search never reads it)")
    check_metric(args.metric or main_metric(base.get("task_name")), base.get("task_name"))
    args.study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported once, by main()
    # Heartbeats and their retries are marked experimental in Optuna 4; they are what shared studies rely on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # A stop by SIGTERM (a scheduler's time limit) goes through the same path as Ctrl-C: the running trial is marked.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    study_search = Search(args, base, space)
    print(f"{space.name}: study in {storage_for_display(study_search.storage_url)}", flush=True)
    study_search.run()
    path = study_search.write_best_config()
    best = study_search.study.best_trial
    print(f"{space.name}: best {study_search.metric} {best.value:.4f} (trial {best.number}) "
          f"{format_params(best.params)}; config written to {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.report is not None:
            return report(args.report, args.storage)
        return search(args, extra)
    except UsageError as error:
        exit_with_usage_error(str(error))
    except TrialFailed as error:
        print(f"tune.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tune.py: interrupted; the same command resumes the search", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
