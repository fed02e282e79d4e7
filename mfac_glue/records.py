"""The run folder's records: run_info.json, what the comparison groups runs by (task, model, training length and
schedule, optimizer with its arguments), never folder names; the per-example dev predictions; and the names of
the files the tools read from a run folder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Optional

import numpy as np

# The run folder's files that the tools read: this module names them, and no other.
RUN_INFO = "run_info.json"
ALL_RESULTS = "all_results.json"  # the Trainer's metrics of training and evaluation; written last, so a run is done
TRAINER_STATE = "trainer_state.json"  # the Trainer's log history (its TRAINER_STATE_NAME, spelled out so that
                                      # reading runs needs no transformers; a test holds the two equal)
EVAL_PREDICTIONS = "eval_predictions_{task}.tsv"  # one row per evaluation example: index, prediction, label
CHECKPOINTS = "checkpoint-*"  # the Trainer's checkpoint folders (its PREFIX_CHECKPOINT_DIR), there to resume a run


# Provenance kept in run_info.json that does not define a setting: runs of one setting made by other code versions
# still form one group (compare.py leaves these keys out of its grouping).
PROVENANCE_KEYS = ("code",)


def write_run_info(output_dir: str, model_args, data_args, training_args,
                   train_examples: Optional[int] = None) -> dict[str, Any]:
    """Writes run_info.json into `output_dir` and returns the record. `train_examples`: how many examples the run
    trains on (None without training)."""
    record = run_record(model_args, data_args, training_args)
    if train_examples is not None:
        record["train_examples"] = train_examples
    record["code"] = code_version()
    os.makedirs(output_dir, exist_ok=True)
    Path(output_dir, RUN_INFO).write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_record(model_args, data_args, training_args) -> dict[str, Any]:
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
        **adapters_record(model_args),
    }


def adapters_record(model_args) -> dict[str, Any]:
    """LoRA's settings under "adapters" (nothing for a run that trains the whole model, as records made before
    adapters existed say)."""
    if not getattr(model_args, "lora_r", 0):
        return {}
    return {"adapters": {"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha,
                         "lora_dropout": model_args.lora_dropout, "lora_target_modules": model_args.lora_target_modules,
                         "lora_train_pooler": model_args.lora_train_pooler}}


def code_version() -> str:
    """The commit of the git checkout this package runs from (`+changes` when its tracked files differ from it),
    else the installed package's version (an installed copy is not tracked, even inside a checkout's venv)."""
    here = Path(__file__).resolve()
    git = ["git", "-C", str(here.parent)]
    try:
        subprocess.run([*git, "ls-files", "--error-unmatch", here.name], capture_output=True, check=True)
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"mfac-optim {package_version('mfac-optim')}"
    return commit + ("+changes" if changed else "")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first a folder holds is what its hash stands for
HASHED_PREFIX_LENGTH = 16  # hex digits of sha256 kept: enough to tell two weight files apart


def model_source_record(source: str) -> str:
    """A Hub id as given; a local folder as its last two names and a hash of its weights (`pkg/model@sha256:…`),
    never its path, so that records carry no machine's paths and runs of one model group together wherever it
    lies."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    name = "/".join(folder.resolve().parts[-2:])
    return name if weights is None else f"{name}@sha256:{file_sha256(weights)[:HASHED_PREFIX_LENGTH]}"


def file_source_record(path: str) -> str:
    """A data file as its name and a hash of its bytes: what a study records instead of the path."""
    return f"{Path(path).name}@sha256:{file_sha256(Path(path))[:HASHED_PREFIX_LENGTH]}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_record(training_args) -> dict[str, Any]:
    """The optimizer and its settings (for HF optimizers, the arguments the Trainer builds it from)."""
    from mfac_optim.hf.arguments import MFAC_NAME  # here, not at the top: the tools that only read records skip transformers

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


def write_eval_predictions(output_dir: str, task: Optional[str], predictions, labels, is_regression: bool) -> Path:
    """The evaluation set's predictions beside its labels, one example per row in the set's order: a score for
    regression, the predicted class id for classification (the model's outputs are logits)."""
    outputs = predictions[0] if isinstance(predictions, tuple) else predictions
    outputs = np.squeeze(outputs) if is_regression else np.argmax(outputs, axis=1)
    path = Path(output_dir, EVAL_PREDICTIONS.format(task=task or "custom"))
    with open(path, "w") as handle:
        handle.write("index\tprediction\tlabel\n")
        for index, (prediction, label) in enumerate(zip(np.atleast_1d(outputs), np.atleast_1d(labels))):
            handle.write(f"{index}\t{prediction:.9g}\t{label:.9g}\n" if is_regression else
                         f"{index}\t{int(prediction)}\t{int(label)}\n")
    return path


def copy_records(run_dir: Path, target: Path) -> None:
    """A finished run's records without its weights (run_info, results, the Trainer's log history, the dev
    predictions): all that the comparison reads, small enough to keep in a repository."""
    target.mkdir(parents=True, exist_ok=True)
    for path in [run_dir / RUN_INFO, run_dir / ALL_RESULTS, run_dir / TRAINER_STATE,
                 *sorted(run_dir.glob(EVAL_PREDICTIONS.format(task="*")))]:
        if path.is_file():
            shutil.copy2(path, target / path.name)


def remove_checkpoints(run_dir: Path) -> None:
    """A finished run's checkpoints: they exist to resume it, and an M-FAC window's state makes each one as large
    as the optimizer's memory."""
    for folder in run_dir.glob(CHECKPOINTS):
        shutil.rmtree(folder)
