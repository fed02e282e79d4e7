"""GLUE's .tsv files as distributed (CoLA without a header, MRPC with its byte-order mark, text labels), and
local data files checked for the columns a task needs, all before any model loads."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from . import UsageError

if TYPE_CHECKING:
    from datasets import DatasetDict

GLUE_ON_THE_HUB = "nyu-mll/glue"

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
LOCAL_FILE_FLAGS = ("train_file", "validation_file", "validation_mismatched_file", "test_file")


def check_data_arguments(data_args) -> None:
    """The task and the local files' names and existence, as one line each, before anything is read."""
    if data_args.task_name is not None:
        data_args.task_name = data_args.task_name.lower()
        if data_args.task_name not in TASK_TO_KEYS:
            raise UsageError(f"--task_name: unknown task {data_args.task_name!r} (allowed: {', '.join(TASK_TO_KEYS)})")
    if data_args.validation_mismatched_file and data_args.task_name != "mnli":
        raise UsageError("--validation_mismatched_file: only used with --task_name mnli")
    for flag in LOCAL_FILE_FLAGS:
        path = getattr(data_args, flag)
        if path is None:
            continue
        if not path.endswith(DATA_EXTENSIONS):
            raise UsageError(f"--{flag}: {path!r} must end with one of {', '.join(DATA_EXTENSIONS)}")
        if not Path(path).is_file():
            raise UsageError(f"--{flag}: file not found: {path}")
    if data_args.task_name is None and data_args.dataset_name is None and data_args.train_file is None:
        raise UsageError("need --task_name, --dataset_name, or --train_file/--validation_file")
    if data_args.task_name is None and data_args.dataset_name is None and data_args.validation_file is None:
        raise UsageError("--validation_file: required with --train_file when no --task_name is given")


def hub_split_name(task: Optional[str], split: str) -> str:
    """A GLUE split's name on the Hub: MNLI has matched and mismatched validation and test splits, and the plain
    names mean the matched ones (as in HF's script)."""
    return f"{split}_matched" if task == "mnli" and split in ("validation", "test") else split


def first_rows_of_each_split(raw_datasets: DatasetDict, data_args) -> DatasetDict:
    """The splits cut to the rows --max_train_samples, --max_eval_samples and --max_predict_samples keep (their
    first rows), so that only those are tokenized: the rows and their features are the ones HF's script keeps by
    cutting after tokenizing every row of every split."""
    from datasets import DatasetDict

    limits = {"train": data_args.max_train_samples,
              hub_split_name(data_args.task_name, "validation"): data_args.max_eval_samples,
              "validation_mismatched": data_args.max_eval_samples,  # MNLI's, cut as its matched split
              hub_split_name(data_args.task_name, "test"): data_args.max_predict_samples}

    def first_rows(split: str, rows):
        limit = limits.get(split)
        return rows.select(range(limit)) if limit is not None and limit < len(rows) else rows

    return DatasetDict({split: first_rows(split, rows) for split, rows in raw_datasets.items()})


def glue_split_from_hub(task: str, split: str, cache_dir: Optional[str] = None):
    """One split of a GLUE task from the Hub (or its cache), by its plain name ("train", "validation", "test")."""
    from datasets import load_dataset

    return load_dataset(GLUE_ON_THE_HUB, task.lower(), split=hub_split_name(task.lower(), split), cache_dir=cache_dir)


def local_data_files(data_args) -> dict[str, str]:
    """Split name -> local file, for the files given; MNLI's splits named as on the Hub (validation_matched, ...)."""
    task = data_args.task_name
    splits = {"train": data_args.train_file, hub_split_name(task, "validation"): data_args.validation_file,
              "validation_mismatched": data_args.validation_mismatched_file,
              hub_split_name(task, "test"): data_args.test_file}
    return {split: path for split, path in splits.items() if path is not None}


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


def load_local_datasets(data_args, cache_dir: Optional[str]):
    """The local files as a `DatasetDict` (GLUE .tsv read with the task's layout; others through `datasets`)."""
    from datasets import Dataset, DatasetDict, load_dataset

    splits = {}
    for split, path in local_data_files(data_args).items():
        if path.endswith(".tsv") and data_args.task_name is not None:
            splits[split] = Dataset.from_dict(read_glue_tsv(path, data_args.task_name))
        else:
            builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}[Path(path).suffix]
            options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.endswith(".tsv") else {}
            splits[split] = load_dataset(builder, data_files={split: path}, cache_dir=cache_dir, **options)[split]
    return DatasetDict(splits)


def check_splits_given(data_args, training_args) -> None:
    """With local files, each requested stage needs its own file (nothing falls back to the Hub silently)."""
    for stage, flag in (("do_train", "train_file"), ("do_eval", "validation_file"), ("do_predict", "test_file")):
        if getattr(training_args, stage) and getattr(data_args, flag) is None:
            raise UsageError(f"--{flag}: required for --{stage} when data comes from local files")


def check_columns(local_datasets, data_args) -> None:
    files = local_data_files(data_args)
    for split, dataset in local_datasets.items():
        required = [key for key in sentence_keys(data_args.task_name, dataset.column_names) if key]
        if not split.startswith("test"):
            required.append("label")
        missing = [name for name in required if name not in dataset.column_names]
        if missing:
            raise UsageError(f"{files[split]}: missing column(s) {', '.join(missing)} "
                             f"(has {', '.join(dataset.column_names)})")


def most_ids_in_a_batch(dataset, tokenizer, keys: tuple[str, Optional[str]], batch_size: int, max_length: int) -> int:
    """The most distinct token ids a batch of `batch_size` examples of `dataset` can hold: the sum of the
    `batch_size` largest counts of distinct ids in one example, tokenized as training tokenizes it (special tokens
    included, truncated to `max_length`). A batch's distinct ids are at most the sum of its examples', so this
    bounds the embedding rows one gradient can touch, from the data rather than from batch × length."""
    texts = [list(dataset[key]) for key in keys if key]  # a datasets column is not a list the tokenizer takes
    counts = sorted((len(set(ids)) for ids in tokenizer(*texts, truncation=True, max_length=max_length)["input_ids"]),
                    reverse=True)
    return sum(counts[:batch_size])


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
