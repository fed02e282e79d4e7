"""Tunes one optimizer for one run_glue.py configuration with Optuna, scored on a validation split carved from the
training file, and writes the best trial as a run_glue.py config that scripts/sweep.py runs as it is.

    python scripts/tune.py configs/bert-mini_stsb_mfac.json --space configs/search/mfac.json \\
        --study_dir runs/tune/stsb -- --model_name_or_path path/to/model \\
        --train_file path/to/STS-B/train.tsv --validation_file path/to/STS-B/dev.tsv
    python scripts/tune.py --report runs/tune/stsb          # every optimizer tuned in that folder, side by side

Each search space (configs/search/*.json) is one study named after its file, kept in STUDY_DIR/study.db
(SQLite): run the command again and an interrupted search resumes where it stopped; finished trials are never
repeated, and a trial that was running when the search stopped runs again with the same parameters. Every study
gets --trials finished trials (complete or pruned; default 12, the same for every optimizer unless you change it).

Selection never sees the dev set: STUDY_DIR/data/ holds the training file split once (seeded; stratified by label
for classification) into a training part and a validation part of --validation_size examples. Trials train on the
first and are scored on the second, by the task's main metric at the end of training. Evaluations during training
(--eval_strategy steps --eval_steps 0.25 unless the configuration sets its own) feed a median pruner: from a
trial's second evaluation on, it stops the trial when its best score so far is below the median of the complete
trials at that step. The best config, STUDY_DIR/<task>_<space>_tuned.json, trains on the same training part and
evaluates on --validation_file (the dev set; for GLUE from the Hub, its validation split), for the seed runs.
Arguments after `--` go to every trial, last, so they override the config.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import datasets
import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mfac_optim.glue import UsageError  # noqa: E402
from mfac_optim.glue.command_line import config_flags, exit_with_usage_error, read_json_object  # noqa: E402
from mfac_optim.glue.data import load_local_datasets  # noqa: E402
from run_glue import DataTrainingArguments, parse_arguments  # noqa: E402
from mfac_optim.hf_arguments import typed_value  # noqa: E402
from search_space import SearchSpace, load_search_space  # noqa: E402
from sweep import split_at_double_dash  # noqa: E402
from tune_report import DATA_FOLDER, STORAGE_FILE, format_params, report  # noqa: E402
from tune_trial import PRUNED_EXIT, MetricError, score  # noqa: E402

TRIAL_SCRIPT = Path(__file__).resolve().parent / "tune_trial.py"
DEFAULT_TRIALS = 12
STARTUP_TRIALS = 4  # random trials before TPE models the space, and before the pruner compares
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
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                        help=f"finished trials per optimizer (default {DEFAULT_TRIALS})")
    parser.add_argument("--metric", help="eval metric to select by (default: the task's main metric; loss and mse "
                        "are minimised, the others maximised)")
    parser.add_argument("--validation_size", type=float, default=0.1,
                        help="examples carved from the training file for selection: a fraction < 1, or a count")
    parser.add_argument("--sampler_seed", type=int, default=0,
                        help="seed of the data split and of the TPE sampler (a resumed study adds the trials it holds)")
    parser.add_argument("--report", type=Path, metavar="STUDY_DIR",
                        help="print the studies in STUDY_DIR side by side and plot them (STUDY_DIR/tuning.png)")
    args = parser.parse_args(argv)
    if args.report is not None:
        if args.config or args.space or extra:
            exit_with_usage_error("--report: takes a study folder alone")
        return args, extra
    for flag, value in (("config", args.config), ("--space", args.space), ("--study_dir", args.study_dir)):
        if value is None:
            exit_with_usage_error(f"{flag}: required (or --report STUDY_DIR)")
    if args.trials < 1:
        exit_with_usage_error(f"--trials: must be at least 1 (got {args.trials})")
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
    return glue_from_hub(config, "train")


def glue_from_hub(config: dict[str, Any], split: str):
    from datasets import load_dataset

    return load_dataset("nyu-mll/glue", config["task_name"].lower(), split=split, cache_dir=config.get("cache_dir"))


def write_jsonl(examples, rows: Iterable[int], path: Path) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(examples[row]) + "\n")


def dev_set_file(config: dict[str, Any], data: Path) -> str:
    """The seed runs' evaluation data: the configuration's --validation_file, else GLUE's validation split from the
    Hub, written to data/dev.jsonl once the search is over (trials never read it)."""
    if "validation_file" in config:
        return config["validation_file"]
    path = data / "dev.jsonl"
    if not path.is_file():
        dev = glue_from_hub(config, "validation_matched" if config["task_name"].lower() == "mnli" else "validation")
        write_jsonl(dev, range(len(dev)), path)
    return str(path)


def carve_validation(config: dict[str, Any], size: float, seed: int, folder: Path) -> dict[str, Any]:
    """Splits the training data once into folder/train.jsonl and folder/validation.jsonl (file order kept in
    both), stratified by label for classification; returns what was done (also kept in folder/split.json). A
    folder that holds a split already is used as it is."""
    record_file = folder / "split.json"
    if record_file.is_file():
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
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("validation", validation_rows)):
        write_jsonl(examples, sorted(rows), folder / f"{name}.jsonl")
    record = {"source": config.get("train_file") or f"nyu-mll/glue {config.get('task_name')} train",
              "train": len(train_rows), "validation": len(validation_rows), "stratified": stratified, "seed": seed}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
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


def search_run_config(config: dict[str, Any], data: Path, output_dir: Path) -> dict[str, Any]:
    """A trial's run: the carved training part and validation split, evaluations during training for the pruner,
    nothing saved but the results."""
    run = {**config, "do_train": True, "do_eval": True, "train_file": str(data / "train.jsonl"),
           "validation_file": str(data / "validation.jsonl"), "output_dir": str(output_dir), "save_strategy": "no"}
    run.pop("do_predict", None)
    run.pop("test_file", None)
    if run.get("eval_strategy", "no") == "no":
        run.update(eval_strategy="steps", eval_steps=0.25)
    return run


def final_config(config: dict[str, Any], data: Path, name: str) -> dict[str, Any]:
    """The selected setting for the seed runs: the same training part, evaluated on the dev set."""
    return {**config, "do_train": True, "do_eval": True, "train_file": str(data / "train.jsonl"),
            "validation_file": dev_set_file(config, data), "output_dir": f"runs/{name}"}


def resumed_sampler(seed: int, trials_so_far: int) -> optuna.samplers.TPESampler:
    """TPE for a study that holds `trials_so_far` trials. A seeded sampler in a new process draws its random values
    from the start of its sequence again: a resumed search seeded as at its start would repeat its first trials'
    parameters. Offsetting the seed by the trials already run keeps a resumed search reproducible and new."""
    return optuna.samplers.TPESampler(seed=seed + trials_so_far, n_startup_trials=STARTUP_TRIALS)


class Search:
    """One optimizer's study in a study folder: runs trials until the budget is met, resuming a stopped search."""

    def __init__(self, args: argparse.Namespace, base: dict[str, Any], space: SearchSpace) -> None:
        self.args, self.base, self.space = args, base, space
        self.metric = args.metric or main_metric(base.get("task_name"))
        self.data = args.study_dir / DATA_FOLDER
        self.storage = f"sqlite:///{(args.study_dir / STORAGE_FILE).resolve()}"
        self.study = optuna.create_study(
            study_name=space.name, storage=self.storage, load_if_exists=True,
            direction="minimize" if self.metric in MINIMIZED else "maximize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS))
        self.study.sampler = resumed_sampler(args.sampler_seed, len(self.study.get_trials(deepcopy=False)))
        self.check_same_setting()

    def setting(self) -> dict[str, Any]:
        """What a study's trials share: a resumed study must be given the same."""
        return {"space": json.loads(self.args.space.read_text()), "metric": self.metric, "base": self.base,
                "validation_size": self.args.validation_size, "sampler_seed": self.args.sampler_seed}

    def check_same_setting(self) -> None:
        """A resumed study must be given the same setting; its budget may grow (the report prints it)."""
        recorded = self.study.user_attrs.get("setting")
        if recorded is None:
            self.study.set_user_attr("setting", self.setting())
        else:
            changed = [key for key, value in self.setting().items() if recorded.get(key) != value]
            if changed:
                raise UsageError(f"{self.args.study_dir}: study {self.space.name!r} was made with another "
                                 f"{', '.join(changed)}: use another --study_dir, or the same arguments to resume it")
        self.study.set_user_attr("trials", self.args.trials)

    def finished(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))

    def requeue_interrupted(self) -> None:
        """Trials left running by a search that stopped (or failed because it was interrupted) run again with the
        same parameters; nobody else runs this study (the lock), so a running trial is a stopped one."""
        trials = self.study.get_trials(deepcopy=False)
        retried = {trial.user_attrs.get("retry_of") for trial in trials}
        for trial in trials:
            interrupted = trial.state == TrialState.RUNNING or \
                (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted"))
            if not interrupted or trial.number in retried:
                continue
            if trial.state == TrialState.RUNNING:
                self.study.tell(trial.number, state=TrialState.FAIL)
            print(f"{self.space.name}: trial {trial.number} was interrupted; it runs again", flush=True)
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})

    def run(self) -> None:
        carve_validation(self.base, self.args.validation_size, self.args.sampler_seed, self.data)
        self.check_trial_arguments()
        self.requeue_interrupted()
        while len(self.finished()) < self.args.trials:
            self.study.optimize(self.objective, n_trials=1)

    def check_trial_arguments(self) -> None:
        """run_glue.py's own checks of a trial's arguments (flags, M-FAC's keys, data columns, the model's config),
        with each range at its low end, before any trial runs: a mistake ends with one line, no model loaded."""
        lowest = {name: lowest_value(distribution) for name, (_, distribution) in self.space.sampled.items()}
        run = search_run_config(trial_config(self.base, self.space.arrange(lowest), self.space), self.data,
                                self.args.study_dir / "trials" / self.space.name / "check")
        datasets.disable_progress_bars()  # the check reads the carved files: no bars between tune.py's lines
        parse_arguments(config_flags(run))

    def objective(self, trial: optuna.Trial) -> float:
        values = self.space.suggest(trial)
        output_dir = self.args.study_dir / "trials" / self.space.name / str(trial.number)
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
        run = search_run_config(trial_config(self.base, values, self.space), self.data, output_dir)
        # Optuna's Trial takes the storage's id of the trial (its number counts within the study only).
        command = [sys.executable, str(TRIAL_SCRIPT), self.storage, self.space.name, str(trial._trial_id),
                   self.metric, *config_flags(run)]
        start = time.perf_counter()
        try:
            with open(output_dir / "trial.log", "w") as log:
                code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        seconds = time.perf_counter() - start
        trial.set_user_attr("wall_seconds", seconds)
        prefix = f"{self.space.name} trial {trial.number} ({len(self.finished()) + 1}/{self.args.trials})"
        if code == PRUNED_EXIT:
            print(f"{prefix}: pruned after {seconds:.0f} s {format_params(trial.params)}", flush=True)
            raise optuna.TrialPruned()
        if code == USAGE_EXIT:  # a mistake in the arguments (run_glue.py's checks, or --metric): its one line
            raise UsageError(f"{prefix}: {last_line(output_dir / 'trial.log')}")
        results_file = output_dir / "all_results.json"
        if code != 0 or not results_file.is_file():
            raise TrialFailed(f"{prefix}: run_glue.py failed (exit {code}); see {output_dir / 'trial.log'}")
        results = json.loads(results_file.read_text())
        trial.set_user_attr("optimizer_state_bytes", results.get("optimizer_state_bytes"))
        try:
            value = score(results, self.metric)
        except MetricError as error:
            raise UsageError(f"{prefix}: {error}") from None
        print(f"{prefix}: {self.metric} {value:.4f} in {seconds:.0f} s {format_params(trial.params)}", flush=True)
        return value

    def write_best_config(self) -> Path:
        best = self.study.best_trial
        name = f"{self.base.get('task_name') or 'custom'}_{self.space.name}_tuned"
        config = final_config(trial_config(self.base, self.space.arrange(best.params), self.space), self.data, name)
        path = self.args.study_dir / f"{name}.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class TrialFailed(RuntimeError):
    """A trial's run_glue.py ended with an error: the search stops (a rerun resumes it) rather than count it."""


def lowest_value(distribution: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return distribution.choices[0]
    return distribution.low


class StudyLock:
    """One search per study at a time: a second would take the first one's running trials for interrupted ones."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> StudyLock:
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{self.path}: another tune.py is searching this study") from None
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()


def search(args: argparse.Namespace, extra: list[str]) -> int:
    space = load_search_space(args.space)
    base = base_config(args.config, extra)
    if "validation_file" not in base and (base.get("train_file") is not None or base.get("task_name") is None):
        raise UsageError("--validation_file: needed with --train_file, for the best config's seed runs (the dev set; "
                         "the search never reads it)")
    args.study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported once, by main()
    # A stop by SIGTERM (a scheduler's time limit) goes through the same path as Ctrl-C: the running trial is marked.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with StudyLock(args.study_dir / f"{space.name}.lock"):
        study_search = Search(args, base, space)
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
            return report(args.report)
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
