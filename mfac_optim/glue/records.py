"""The run's own record, run_info.json: what scripts/compare.py groups runs by (task, model, training length and
schedule, optimizer with its arguments), never folder names."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..hf_arguments import MFAC_NAME

RUN_INFO = "run_info.json"


def write_run_info(output_dir: str, model_args, data_args, training_args) -> dict[str, Any]:
    """Writes run_info.json into `output_dir` and returns the record."""
    record = run_record(model_args, data_args, training_args)
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
