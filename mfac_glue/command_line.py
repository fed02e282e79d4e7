"""The command line of run_glue.py: its arguments (from a JSON file that later flags override, see json_config) and
every check that can fail before a model loads (arguments, local data files, the checkpoint to resume, model
configs), each reported as one error line with exit status 2 instead of a traceback."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from mfac_optim.hf.arguments import MFAC_NAME
from mfac_optim.hf.preflight import check_mfac_fits, mfac_memory_bound
from mfac_optim.hf.checkpoints import check_optimizer_state_matches, last_complete_checkpoint
from . import exit_with_usage_error
from .adapters import LoraPlan, lora_plan
from .data import check_columns, check_splits_given, load_local_datasets, local_data_files
from .json_config import expand_json_config
from .model_types import check_model_configs


def parse_and_check_inputs(parser, argv: list[str]):
    """`parser` (an HfArgumentParser of model, data and training arguments) over `argv`, with the local data files,
    the checkpoint to resume and the model configs checked before any model is loaded: a mistake in them exits with
    one line (status 2). Returns the three argument dataclasses and the local datasets (or None)."""
    # argparse would print the usage of all ~150 flags before its one line of error.
    parser.error = exit_with_usage_error
    try:
        flags = expand_json_config(argv)
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=flags)
        log_often_on_a_cpu(training_args, flags)
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


CPU_LOGGING_STEPS = 50  # on a CPU a step takes about a second: HF's 500 would first log after minutes


def log_often_on_a_cpu(training_args, flags: list[str]) -> None:
    """Without a GPU, and unless --logging_steps was given, the loss is logged every CPU_LOGGING_STEPS steps, so
    that a run says how it goes within its first minutes; with a GPU, HF's default stays."""
    given = any(flag.split("=")[0] in ("--logging_steps", "--logging-steps") for flag in flags)
    if not given and training_args.logging_strategy == "steps" and not torch.cuda.is_available():
        training_args.logging_steps = CPU_LOGGING_STEPS


def checkpoint_to_resume(training_args) -> Optional[str]:
    """--resume_from_checkpoint, else the newest complete checkpoint in an existing output_dir: HF's script resumed
    from the last one in transformers 4 (its 4.57 version no longer does), and scripts/sweep.py relies on it to
    resume an interrupted run. A newer folder left incomplete by a kill during a save is skipped with a warning."""
    if training_args.resume_from_checkpoint is None and os.path.isdir(training_args.output_dir):
        return last_complete_checkpoint(training_args.output_dir)
    return training_args.resume_from_checkpoint


@contextmanager
def quiet_transformers_logging() -> Iterator[None]:
    """transformers logs warnings and errors only, inside the block (its INFO lines: the files read, the config)."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


@dataclass(frozen=True)
class Preflight:
    """What run_glue.py settles from the model config before the weights load."""

    lora: Optional[LoraPlan]  # the adapters of --lora_r > 0, checked against the model
    optimizer_memory_bound: Optional[int]  # for --optim MFAC: the bound of its memory in each process


def check_before_loading_weights(config, model_class, model_args, training_args, tokens_per_example: int,
                                 ids_per_batch: Optional[Callable[[], int]] = None) -> Preflight:
    """The LoRA plan, checked against the model built from `config` on the meta device, and for --optim MFAC the
    optimizer's memory bound over what will train (`ids_per_batch`, called only then: the most distinct token
    ids a training batch can hold); a bad target module, or a window that cannot fit in the training device's
    memory, ends the run with one line, before any weights load."""
    try:
        lora = lora_plan(model_args, config, model_class)
        counted = ids_per_batch() if ids_per_batch is not None and training_args.optim == MFAC_NAME else None
        bound = mfac_memory_bound(config, model_class, training_args, tokens_per_example,
                                  model_args.trust_remote_code, adapt=lora.apply if lora is not None else None,
                                  ids_per_batch=counted)
        if bound is not None:
            check_mfac_fits(bound, training_args)
    except ValueError as error:
        exit_with_usage_error(str(error))
    return Preflight(lora, bound)
