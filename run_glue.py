#!/usr/bin/env python
"""Fine-tunes a transformer for sequence classification on GLUE, with HF's `run_glue.py` flags plus M-FAC.

    python run_glue.py --model_name_or_path prajjwal1/bert-mini --task_name sst2 --do_train --do_eval \\
        --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 1e-4 --num_train_epochs 3 \\
        --output_dir out_dir/ --optim MFAC --optim_args '{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}'

Differences from HF's script, all additive:
- `--optim MFAC` (any case) trains with `mfac_optim.MFAC`; `--optim_args` is then its constructor arguments, as a
  JSON object or HF's key=value form (mfac_optim.hf_arguments). Every other `--optim` behaves as in HF.
- A config.json without "model_type" (prajjwal1/bert-mini) gets the type transformers 4 inferred from the name.
- An M-FAC window that cannot fit in the training device's memory is refused before the weights load.
- Local GLUE `.tsv` files as distributed (with `--task_name`), next to `.csv` and `.json`/`.jsonl`.
- Metrics are computed locally (scikit-learn, scipy): nothing is fetched from the Hub for them.
- Without `--model_name_or_path`, `--config_name` and `--tokenizer_name` train a randomly initialised model.
- The first argument may be a JSON file of arguments; later command-line flags override its values.
- Under torchrun or accelerate, `--optim_args '{"shard": true, ...}'` splits M-FAC's window across the processes;
  each saves its own optimizer state in a checkpoint (`rank{r}-of-{n}-optimizer.pt`).
"""
from __future__ import annotations

import csv
import functools
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from mfac_optim.hf_arguments import MFAC_NAME, MFACTrainingArguments
from mfac_optim.hf_trainer import MFACTrainer, check_mfac_fits, check_optimizer_state_matches, mfac_memory_bound

logger = logging.getLogger(__name__)

# HF `glue` column names of each task's sentence(s).
TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

# HF `glue` label names in id order (None: regression).
TASK_LABELS = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
    "stsb": None,
    "wnli": ["not_entailment", "entailment"],
}


@dataclass(frozen=True)
class GlueTsvLayout:
    """Where a task's fields sit in GLUE's distributed .tsv files: header names, or column positions for the
    files that ship without a header (CoLA train/dev)."""

    fields: dict[str, str]  # HF field -> GLUE header name
    label: str
    positions: Optional[dict[str, int]] = None  # HF field (and "label") -> column, for headerless files


GLUE_TSV_LAYOUTS = {
    "cola": GlueTsvLayout({"sentence": "sentence"}, "label", positions={"sentence": 3, "label": 1}),
    "mnli": GlueTsvLayout({"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label"),
    "mrpc": GlueTsvLayout({"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "qnli": GlueTsvLayout({"question": "question", "sentence": "sentence"}, "label"),
    "qqp": GlueTsvLayout({"question1": "question1", "question2": "question2"}, "is_duplicate"),
    "rte": GlueTsvLayout({"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
    "sst2": GlueTsvLayout({"sentence": "sentence"}, "label"),
    "stsb": GlueTsvLayout({"sentence1": "sentence1", "sentence2": "sentence2"}, "score"),
    "wnli": GlueTsvLayout({"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
}

DATA_EXTENSIONS = (".tsv", ".csv", ".json", ".jsonl")

RUN_INFO = "run_info.json"


class UsageError(ValueError):
    """A mistake in the command line or its files: reported as one line, without a traceback."""


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DataTrainingArguments:
    task_name: Optional[str] = field(default=None, metadata={"help": f"GLUE task: {', '.join(TASK_TO_KEYS)}"})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset (instead of GLUE)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    max_seq_length: int = field(default=128, metadata={"help": "Maximum tokens per example after tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenized datasets."})
    pad_to_max_length: bool = field(
        default=True,
        metadata={"help": "Pad every example to max_seq_length; False pads each batch to its longest example."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use the first N training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use the first N evaluation examples."})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "Use the first N test examples."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training data: .tsv, .csv, .json or .jsonl."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data (same formats)."})
    validation_mismatched_file: Optional[str] = field(
        default=None, metadata={"help": "MNLI only: the mismatched evaluation data (GLUE's dev_mismatched.tsv)."}
    )
    test_file: Optional[str] = field(default=None, metadata={"help": "Prediction data (same formats)."})

    def __post_init__(self) -> None:
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise UsageError(f"--task_name: unknown task {self.task_name!r} (allowed: {', '.join(TASK_TO_KEYS)})")
        if self.validation_mismatched_file and self.task_name != "mnli":
            raise UsageError("--validation_mismatched_file: only used with --task_name mnli")
        for flag in ("train_file", "validation_file", "validation_mismatched_file", "test_file"):
            path = getattr(self, flag)
            if path is None:
                continue
            if not path.endswith(DATA_EXTENSIONS):
                raise UsageError(f"--{flag}: {path!r} must end with one of {', '.join(DATA_EXTENSIONS)}")
            if not os.path.isfile(path):
                raise UsageError(f"--{flag}: file not found: {path}")
        if self.task_name is None and self.dataset_name is None and self.train_file is None:
            raise UsageError("need --task_name, --dataset_name, or --train_file/--validation_file")
        if self.task_name is None and self.dataset_name is None and self.validation_file is None:
            raise UsageError("--validation_file: required with --train_file when no --task_name is given")

    @property
    def local_files(self) -> dict[str, str]:
        """Split name -> local file, for the files given."""
        splits = {"train": self.train_file, "validation": self.validation_file,
                  "validation_mismatched": self.validation_mismatched_file, "test": self.test_file}
        return {split: path for split, path in splits.items() if path is not None}


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local folder of a pretrained model."}
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config name or folder; alone (no --model_name_or_path): random init."}
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer name or folder."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Model branch, tag or commit."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Load a checkpoint whose classifier head has another number of labels."}
    )

    @property
    def hub_options(self) -> dict[str, Any]:
        """Where and which version to read from the Hub (or its cache): for every from_pretrained."""
        return dict(cache_dir=self.cache_dir, revision=self.model_revision, token=self.token)

    def __post_init__(self) -> None:
        if self.model_name_or_path is None and self.config_name is None:
            raise UsageError("--model_name_or_path: required (or --config_name with --tokenizer_name for random init)")
        if self.model_name_or_path is None and self.tokenizer_name is None:
            raise UsageError("--tokenizer_name: required with --config_name when no --model_name_or_path is given")


def expand_json_config(argv: list[str]) -> list[str]:
    """`run_glue.py config.json --seed 5` -> the config's entries as flags, then the flags that override them."""
    if not argv or not argv[0].endswith(".json"):
        return argv
    return config_flags(read_json_object(argv[0], "config file", "arguments")) + argv[1:]


def read_json_object(path: str | Path, kind: str, contents: str) -> dict[str, Any]:
    """A JSON file that holds one object; a UsageError naming the file for anything else."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{kind} not found: {path}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: must hold a JSON object of {contents}")
    return value


def config_flags(config: dict[str, Any]) -> list[str]:
    """A JSON config's entries as command-line flags."""
    flags = []
    for key, value in config.items():
        if isinstance(value, dict):  # --optim_args '{"num_grads": 512}'
            values = [json.dumps(value)]
        elif isinstance(value, list):  # --report_to none tensorboard
            values = [str(item) for item in value]
        else:
            values = [str(value)]
        flags += [f"--{key}", *values]
    return flags


def parse_and_check_inputs(argv: list[str]):
    """Arguments, local data files and model configs, checked before any model is loaded: a mistake in them exits
    with one line (status 2) instead of a traceback. Returns the three argument dataclasses and the local datasets
    (or None)."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, MFACTrainingArguments))
    # argparse would print the usage of all ~150 flags before its one line of error.
    parser.error = exit_with_usage_error
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=expand_json_config(argv))
        local_datasets = None
        if data_args.local_files:
            check_splits_given(data_args, training_args)
            local_datasets = load_local_datasets(data_args, model_args.cache_dir)
            check_columns(local_datasets, data_args)
        if training_args.do_train:
            training_args.resume_from_checkpoint = checkpoint_to_resume(training_args)
            if training_args.resume_from_checkpoint:
                check_optimizer_state_matches(Path(training_args.resume_from_checkpoint), training_args)
        check_model_configs(model_args)
    except ValueError as error:  # UsageError, and TrainingArguments' own checks
        exit_with_usage_error(str(error))
    return model_args, data_args, training_args, local_datasets


def exit_with_usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
    sys.exit(2)


def checkpoint_to_resume(training_args) -> Optional[str]:
    """--resume_from_checkpoint, else (as HF's script) the last checkpoint in an existing output_dir."""
    if training_args.resume_from_checkpoint is None and os.path.isdir(training_args.output_dir):
        return get_last_checkpoint(training_args.output_dir)
    return training_args.resume_from_checkpoint


# --------------------------------------------------------------------------------------------------------------
# Local data
# --------------------------------------------------------------------------------------------------------------
def read_glue_tsv(path: str, task: str) -> dict[str, list]:
    """A GLUE .tsv as distributed, as HF `glue` columns (label -1 where the file has none, as in test splits)."""
    layout = GLUE_TSV_LAYOUTS[task]
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise UsageError(f"{path}: empty file")
    header = rows[0]
    names = list(layout.fields.values())
    hf_names = list(layout.fields)
    if all(name in header for name in names) or all(name in header for name in hf_names):
        use_hf = not all(name in header for name in names)
        positions = {field: header.index(field if use_hf else glue) for field, glue in layout.fields.items()}
        label_header = "label" if use_hf else layout.label
        if label_header in header:
            positions["label"] = header.index(label_header)
        body = rows[1:]
    elif layout.positions is not None and len(header) > max(layout.positions.values()):
        positions, body = layout.positions, rows
    else:
        expected = ", ".join(names + [layout.label])
        raise UsageError(f"{path}: no {task} columns ({expected}) in its header {header}")
    columns = {field: [row[index] for row in body] for field, index in positions.items() if field != "label"}
    columns["label"] = [parse_label(row[positions["label"]], task, path) for row in body] \
        if "label" in positions else [-1] * len(body)
    return columns


def parse_label(text: str, task: str, path: str) -> float | int:
    labels = TASK_LABELS[task]
    if labels is None:
        return float(text)
    if text in labels:
        return labels.index(text)
    if text.lstrip("-").isdigit() and int(text) < len(labels):
        return int(text)
    raise UsageError(f"{path}: label {text!r} is not one of {task}'s labels {labels} or their ids")


def load_local_datasets(data_args: DataTrainingArguments, cache_dir: Optional[str]):
    """The local files as a `DatasetDict` (GLUE .tsv read with the task's layout; others through `datasets`)."""
    from datasets import Dataset, DatasetDict, load_dataset

    splits = {}
    for split, path in data_args.local_files.items():
        if path.endswith(".tsv") and data_args.task_name is not None:
            splits[split] = Dataset.from_dict(read_glue_tsv(path, data_args.task_name))
        else:
            builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}[Path(path).suffix]
            options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.endswith(".tsv") else {}
            splits[split] = load_dataset(builder, data_files={split: path}, cache_dir=cache_dir, **options)[split]
    return DatasetDict(splits)


def check_splits_given(data_args: DataTrainingArguments, training_args) -> None:
    """With local files, each requested stage needs its own file (nothing falls back to the Hub silently)."""
    for stage, flag in (("do_train", "train_file"), ("do_eval", "validation_file"), ("do_predict", "test_file")):
        if getattr(training_args, stage) and getattr(data_args, flag) is None:
            raise UsageError(f"--{flag}: required for --{stage} when data comes from local files")


def check_columns(local_datasets, data_args: DataTrainingArguments) -> None:
    for split, dataset in local_datasets.items():
        required = [key for key in sentence_keys(data_args.task_name, dataset.column_names) if key]
        if split != "test":
            required.append("label")
        missing = [name for name in required if name not in dataset.column_names]
        if missing:
            raise UsageError(f"{data_args.local_files[split]}: missing column(s) {', '.join(missing)} "
                             f"(has {', '.join(dataset.column_names)})")


def sentence_keys(task: Optional[str], column_names: list[str]) -> tuple[str, Optional[str]]:
    """The task's sentence columns; without a task, HF's rule: sentence1/sentence2, else the first two others."""
    if task is not None:
        return TASK_TO_KEYS[task]
    others = [name for name in column_names if name != "label"]
    if not others:
        raise UsageError(f"no text column besides label in {column_names}")
    if "sentence1" in others and "sentence2" in others:
        return "sentence1", "sentence2"
    return (others[0], others[1]) if len(others) >= 2 else (others[0], None)


# --------------------------------------------------------------------------------------------------------------
# Model configs without "model_type" (prajjwal1/bert-mini, bert-tiny, Google's converted checkpoints)
# --------------------------------------------------------------------------------------------------------------
def check_model_configs(model_args: ModelArguments) -> None:
    """Reads the config of the model and of the tokenizer before anything loads, so that a config.json without
    "model_type" whose type cannot be inferred ends with one line (and an inferred one is logged once)."""
    config_flag, config_source = model_config_source(model_args)
    model_type_to_infer(config_source, config_flag, model_args)
    tokenizer_flag, tokenizer_source = tokenizer_source_of(model_args)
    model_type_to_infer(tokenizer_source, tokenizer_flag, model_args, required=False)


def model_config_source(model_args: ModelArguments) -> tuple[str, str]:
    """(flag, Hub id or folder) of the model's config."""
    if model_args.config_name:
        return "--config_name", model_args.config_name
    return "--model_name_or_path", model_args.model_name_or_path


def tokenizer_source_of(model_args: ModelArguments) -> tuple[str, str]:
    if model_args.tokenizer_name:
        return "--tokenizer_name", model_args.tokenizer_name
    return "--model_name_or_path", model_args.model_name_or_path


def model_type_to_infer(source: str, flag: str, model_args: ModelArguments, required: bool = True) -> Optional[str]:
    """None when `source`'s config.json declares its "model_type" (or, for an optional config, does not exist);
    else the model type inferred from its name. Config files come from a folder, the Hub or the Hub's cache."""
    try:
        return undeclared_model_type(source, **model_args.hub_options)
    except OSError as error:  # transformers' "not found / cannot connect", usually several lines
        if not required:
            return None
        raise UsageError(f"{flag}: cannot read the config of {source!r}: {' '.join(str(error).split())}") from None
    except UsageError as error:
        raise UsageError(f"{flag}: {error}") from None


@functools.lru_cache(maxsize=None)  # the model and tokenizer often share a source: infer and warn once
def undeclared_model_type(source: str, cache_dir: Optional[str], revision: str, token: Optional[str]) -> Optional[str]:
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(source, cache_dir=cache_dir, revision=revision, token=token)
    if "model_type" in config_dict:
        return None
    model_type = model_type_from_name(source)
    if model_type is None:
        raise UsageError(f"the config.json of {source!r} has no \"model_type\" and its name names no known model "
                         "type: add \"model_type\" (e.g. \"bert\") to config.json, or pass --config_name with a "
                         "config that has one")
    check_keys_fit(config_dict, model_type, source)
    logger.warning("%s: config.json has no \"model_type\"; inferred %r from the name, as transformers 4 did",
                   source, model_type)
    return model_type


def model_type_from_name(source: str) -> Optional[str]:
    """transformers 4's rule: the longest known model type that occurs in the name, here a Hub id, a local
    folder's own name, or the repository of a Hub cache folder (models--org--name/snapshots/<revision>)."""
    from transformers import CONFIG_MAPPING

    names = [source]
    if os.path.isdir(source):
        path = Path(source).resolve()
        names = [path.name] + [part for part in path.parts if part.startswith("models--")]
    for name in names:
        found = [model_type for model_type in CONFIG_MAPPING.keys() if model_type in name.lower()]
        if found:
            return max(found, key=len)
    return None


def check_keys_fit(config_dict: dict, model_type: str, source: str) -> None:
    """An inferred type must know most of the config's own keys: a name can mislead (a GPT-2 config in a folder
    called bert-gpt2), and a wrong type would silently build another architecture."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    config_class = CONFIG_MAPPING[model_type]
    known = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
    generic = set(PretrainedConfig().to_dict())
    own = [key for key in config_dict if key not in generic]
    unknown = [key for key in own if key not in known]
    if not own or 2 * len(unknown) > len(own):
        raise UsageError(f"the config.json of {source!r} has no \"model_type\"; its name suggests {model_type!r}, but "
                         f"its keys do not fit that type (unknown to it: {', '.join(unknown) or 'all'}): add "
                         "\"model_type\" to config.json, or pass --config_name with a config that has one")


def load_config(source: str, flag: str, model_args: ModelArguments, **kwargs):
    """`AutoConfig.from_pretrained`, or the inferred type's config class when config.json has no model_type."""
    from transformers import CONFIG_MAPPING, AutoConfig

    hub = model_args.hub_options
    model_type = model_type_to_infer(source, flag, model_args)
    if model_type is None:
        return AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code, **hub, **kwargs)
    return CONFIG_MAPPING[model_type].from_pretrained(source, **hub, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Metrics (local, same keys as HF's `evaluate` GLUE metric)
# --------------------------------------------------------------------------------------------------------------
def glue_metrics(task: Optional[str], predictions: np.ndarray, labels: np.ndarray, is_regression: bool) -> dict:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    if task == "cola":
        result = {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    elif task == "stsb":
        result = {"pearson": float(pearsonr(predictions, labels)[0]), "spearmanr": float(spearmanr(predictions, labels)[0])}
    elif task in ("mrpc", "qqp"):
        result = {"accuracy": float((predictions == labels).mean()), "f1": float(f1_score(labels, predictions))}
    elif task is None and is_regression:
        result = {"mse": float(((predictions - labels) ** 2).mean())}
    else:
        result = {"accuracy": float((predictions == labels).mean())}
    if len(result) > 1:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


# --------------------------------------------------------------------------------------------------------------
# Model, optimizer and records
# --------------------------------------------------------------------------------------------------------------
def model_config(model_args: ModelArguments, num_labels: int, task: Optional[str], label_list):
    flag, source = model_config_source(model_args)
    config = load_config(source, flag, model_args, num_labels=num_labels, finetuning_task=task)
    if label_list is not None:
        config.label2id = {label: index for index, label in enumerate(label_list)}
        config.id2label = {index: label for index, label in enumerate(label_list)}
    return config


def load_model_and_tokenizer(model_args: ModelArguments, config):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hub = dict(model_args.hub_options, trust_remote_code=model_args.trust_remote_code)
    tokenizer_flag, tokenizer_source = tokenizer_source_of(model_args)
    # AutoTokenizer reads the config to pick the tokenizer class, and would fail on one without model_type.
    inferred = model_type_to_infer(tokenizer_source, tokenizer_flag, model_args, required=False)
    given_config = {"config": load_config(tokenizer_source, tokenizer_flag, model_args)} if inferred else {}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **given_config, **hub)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        # transformers 5 can build a vocabulary of special tokens alone from a bad tokenizer folder, and then maps
        # every word to [UNK] without complaint.
        raise RuntimeError(f"tokenizer from {tokenizer_source} has only its {len(tokenizer)} special tokens; the "
                           "folder needs its vocab.txt or tokenizer.json")
    if model_args.model_name_or_path is None:
        logger.info("No --model_name_or_path: training a randomly initialised model from %s", model_args.config_name)
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub)
    return model, tokenizer


def run_record(model_args: ModelArguments, data_args: DataTrainingArguments, training_args) -> dict[str, Any]:
    """How the run was made, for a reader and for scripts/compare.py: written to the run's run_info.json."""
    return {
        "task_name": data_args.task_name,
        "model": model_source_record(model_args.model_name_or_path or model_args.config_name),
        "seed": training_args.seed,
        "max_train_samples": data_args.max_train_samples,
        "max_seq_length": data_args.max_seq_length,
        # How long and on which schedule it trained: runs that differ here do not belong in one group.
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "warmup_steps": training_args.warmup_steps,
        "optimizer": optimizer_record(training_args),
    }


def model_source_record(source: str) -> str:
    """A Hub id as given; a local folder as its absolute, symlink-free path, so that runs of one model group
    together however the folder was spelled."""
    return str(Path(source).resolve()) if os.path.isdir(source) else source


def optimizer_record(training_args) -> dict[str, Any]:
    """The optimizer and its settings (for HF optimizers, the arguments the Trainer builds it from)."""
    if training_args.optim == MFAC_NAME:
        return {"optim": "MFAC", "optim_args": training_args.mfac.record()}
    return {
        "optim": str(training_args.optim.value if hasattr(training_args.optim, "value") else training_args.optim),
        "optim_args": training_args.optim_args,
        "learning_rate": training_args.learning_rate,
        "weight_decay": training_args.weight_decay,
        "adam_beta1": training_args.adam_beta1,
        "adam_beta2": training_args.adam_beta2,
        "adam_epsilon": training_args.adam_epsilon,
    }


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None, callbacks: Optional[list] = None) -> None:
    """`argv`: the command line's arguments; `callbacks`: extra TrainerCallbacks (scripts/tune.py's reporter)."""
    model_args, data_args, training_args, local_datasets = parse_and_check_inputs(sys.argv[1:] if argv is None else argv)

    import datasets
    import transformers
    from datasets import load_dataset
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, default_data_collator,
                              set_seed)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:  # as HF: info on the main process unless --log_level says otherwise
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("mfac_optim").setLevel(log_level)  # the Trainer glue logs the optimizer's memory
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("Training/evaluation parameters %s", training_args)

    if training_args.do_train and training_args.resume_from_checkpoint:
        logger.info("Resuming from checkpoint %s", training_args.resume_from_checkpoint)

    set_seed(training_args.seed)

    # Data: local files, else GLUE or another dataset from the Hub.
    if local_datasets is not None:
        raw_datasets = local_datasets
    else:
        name, config_name = ("nyu-mll/glue", data_args.task_name) if data_args.task_name else \
            (data_args.dataset_name, data_args.dataset_config_name)
        raw_datasets = load_dataset(name, config_name, cache_dir=model_args.cache_dir, token=model_args.token)
    reference_split = raw_datasets["train"] if "train" in raw_datasets else raw_datasets["validation"]

    if data_args.task_name is not None:
        label_list = TASK_LABELS[data_args.task_name]
        is_regression = label_list is None
    else:
        is_regression = reference_split.features["label"].dtype in ("float32", "float64")
        label_list = None if is_regression else sorted(set(reference_split["label"]))
    num_labels = 1 if is_regression else len(label_list)

    config = model_config(model_args, num_labels, data_args.task_name,
                          None if is_regression else [str(label) for label in label_list])
    optimizer_bound = mfac_memory_bound(config, AutoModelForSequenceClassification, training_args,
                                        data_args.max_seq_length, model_args.trust_remote_code)
    if optimizer_bound is not None:
        try:
            check_mfac_fits(optimizer_bound, training_args)
        except ValueError as error:
            exit_with_usage_error(str(error))
    model, tokenizer = load_model_and_tokenizer(model_args, config)
    key1, key2 = sentence_keys(data_args.task_name, reference_split.column_names)
    label_to_id = None
    if data_args.task_name is None and not is_regression:
        label_to_id = {label: index for index, label in enumerate(label_list)}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning("max_seq_length %d exceeds the model's maximum %d: using %d", data_args.max_seq_length,
                       tokenizer.model_max_length, tokenizer.model_max_length)
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples):
        texts = (examples[key1],) if key2 is None else (examples[key1], examples[key2])
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        if label_to_id is not None and "label" in examples:
            result["label"] = [label_to_id[label] if label != -1 else -1 for label in examples["label"]]
        return result

    def select(split: str, limit: Optional[int]):
        """The first `limit` examples of a split, tokenized (only those: a 2-core machine feels 67k examples)."""
        dataset = raw_datasets[split]
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        with training_args.main_process_first(desc="dataset map pre-processing"):
            return dataset.map(preprocess, batched=True, load_from_cache_file=not data_args.overwrite_cache,
                               desc=f"Running tokenizer on {split}")

    mnli = data_args.task_name == "mnli"
    train_dataset = select("train", data_args.max_train_samples) if training_args.do_train else None
    eval_datasets = {}
    if training_args.do_eval:
        eval_datasets["eval"] = select("validation_matched" if mnli and "validation_matched" in raw_datasets
                                       else "validation", data_args.max_eval_samples)
        if mnli and "validation_mismatched" in raw_datasets:
            eval_datasets["eval_mm"] = select("validation_mismatched", data_args.max_eval_samples)
    predict_datasets = {}
    if training_args.do_predict:
        predict_datasets[data_args.task_name or "predict"] = select(
            "test_matched" if mnli and "test_matched" in raw_datasets else "test", data_args.max_predict_samples)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        return glue_metrics(data_args.task_name, predictions, prediction.label_ids, is_regression)

    data_collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(
        tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)

    trainer = MFACTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_datasets.get("eval"),
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
        optimizer_memory_bound=optimizer_bound,
        callbacks=callbacks,
    )
    os.makedirs(training_args.output_dir, exist_ok=True)
    record = run_record(model_args, data_args, training_args)
    if trainer.is_world_process_zero():
        Path(training_args.output_dir, RUN_INFO).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("Optimizer: %s", json.dumps(record["optimizer"]))

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        metrics["optimizer_state_bytes"] = trainer.optimizer_state_bytes
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        combined = {}
        for prefix, dataset in eval_datasets.items():
            metrics = trainer.evaluate(eval_dataset=dataset)
            metrics["eval_samples"] = len(dataset)
            if prefix == "eval_mm":
                metrics = {f"{key}_mm": value for key, value in metrics.items()}
            combined.update(metrics)
            trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", combined)

    for task, dataset in predict_datasets.items():
        if "label" in dataset.column_names:
            dataset = dataset.remove_columns("label")
        logits = trainer.predict(dataset, metric_key_prefix="predict").predictions
        predictions = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        output = Path(training_args.output_dir, f"predict_results_{task}.txt")
        if trainer.is_world_process_zero():
            with open(output, "w") as writer:
                writer.write("index\tprediction\n")
                for index, value in enumerate(predictions):
                    writer.write(f"{index}\t{value:3.3f}\n" if is_regression else f"{index}\t{label_list[value]}\n")


if __name__ == "__main__":
    main()
