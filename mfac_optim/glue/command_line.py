"""The command line of run_glue.py (and of the scripts that start it): a JSON file of arguments that later flags
override, and every check that can fail before a model loads (arguments, local data files, the checkpoint to
resume, model configs), each reported as one error line with exit status 2 instead of a traceback."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..hf_arguments import parse_optim_args
from ..hf_trainer import check_mfac_fits, check_optimizer_state_matches, last_complete_checkpoint, mfac_memory_bound
from . import UsageError, exit_with_usage_error
from .adapters import LoraPlan, lora_plan
from .data import check_columns, check_splits_given, load_local_datasets, local_data_files
from .model_types import check_model_configs


def expand_json_config(argv: list[str]) -> list[str]:
    """`run_glue.py config.json --seed 5` -> the config's entries as flags, then the flags that override them. An
    `--optim_args` on the command line overrides the keys it names, and the config's other keys stay."""
    if not argv or not argv[0].endswith(".json"):
        return argv
    config, later = read_json_object(argv[0], "config file", "arguments"), list(argv[1:])
    position = last_flag_value(later, "--optim_args")
    if "optim_args" in config and position is not None:
        later[position] = merged_optim_args(config.pop("optim_args"), later[position])
    return config_flags(config) + later


def last_flag_value(argv: list[str], flag: str) -> Optional[int]:
    """The index of the value of the last `flag VALUE` in argv (`flag=VALUE` is split into two first), or None."""
    for index in range(len(argv) - 1, -1, -1):
        if argv[index].startswith(f"{flag}="):
            argv[index:index + 1] = [flag, argv[index][len(flag) + 1:]]
            return index + 1
        if argv[index] == flag and index + 1 < len(argv):
            return index + 1
    return None


def merged_optim_args(config_value: dict[str, Any] | str, given: str) -> str:
    """The config's optim_args with the command line's keys put over them, written in the command line's form
    (a JSON object, or HF's key=value pairs)."""
    base = config_value if isinstance(config_value, dict) else parse_optim_args(config_value)
    merged = {**base, **parse_optim_args(given)}
    if given.lstrip().startswith("{"):
        return json.dumps(merged)
    return ",".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in merged.items())


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


def parse_and_check_inputs(parser, argv: list[str]):
    """`parser` (an HfArgumentParser of model, data and training arguments) over `argv`, with the local data files,
    the checkpoint to resume and the model configs checked before any model is loaded: a mistake in them exits with
    one line (status 2). Returns the three argument dataclasses and the local datasets (or None)."""
    # argparse would print the usage of all ~150 flags before its one line of error.
    parser.error = exit_with_usage_error
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=expand_json_config(argv))
        local_datasets = None
        if local_data_files(data_args):
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


def checkpoint_to_resume(training_args) -> Optional[str]:
    """--resume_from_checkpoint, else the newest complete checkpoint in an existing output_dir: HF's script resumed
    from the last one in transformers 4 (its 4.57 version no longer does), and scripts/sweep.py relies on it to
    resume an interrupted run. A newer folder left incomplete by a kill during a save is skipped with a warning."""
    if training_args.resume_from_checkpoint is None and os.path.isdir(training_args.output_dir):
        return last_complete_checkpoint(training_args.output_dir)
    return training_args.resume_from_checkpoint


@dataclass(frozen=True)
class Preflight:
    """What run_glue.py settles from the model config before the weights load."""

    lora: Optional[LoraPlan]  # the adapters of --lora_r > 0, checked against the model
    optimizer_memory_bound: Optional[int]  # for --optim MFAC: the bound of its memory in each process


def check_before_loading_weights(config, model_class, model_args, training_args,
                                 tokens_per_example: int) -> Preflight:
    """The LoRA plan, checked against the model built from `config` on the meta device, and for --optim MFAC the
    optimizer's memory bound over what will train; a bad target module, or a window that cannot fit in the training
    device's memory, ends the run with one line, before any weights load."""
    try:
        lora = lora_plan(model_args, config, model_class)
        bound = mfac_memory_bound(config, model_class, training_args, tokens_per_example,
                                  model_args.trust_remote_code, adapt=lora.apply if lora is not None else None)
        if bound is not None:
            check_mfac_fits(bound, training_args)
    except ValueError as error:
        exit_with_usage_error(str(error))
    return Preflight(lora, bound)
