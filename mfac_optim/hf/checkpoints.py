"""Checkpoints of a run with M-FAC: one optimizer state file per process for a sharded window, whether a checkpoint
folder was written to the end (a run killed while saving leaves one that was not), and whether its optimizer state
was saved by the sharding this run has."""
from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Optional

from transformers.trainer import OPTIMIZER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arguments import MFAC_NAME, launched_processes
from .optim_args import MFACArgumentError

logger = logging.getLogger(__name__)

# One optimizer state file per process for a sharded M-FAC window (the name HF uses for per-rank optimizer state).
SHARD_STATE = "rank{rank}-of-{world_size}-" + OPTIMIZER_NAME
CHECKPOINT_FOLDER = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def mfac_is_sharded(training_args) -> bool:
    return training_args.optim == MFAC_NAME and training_args.mfac.shard


def sharded_state_world_sizes(checkpoint: Path) -> list[int]:
    """The process counts of the sharded optimizer state files in a checkpoint (normally none or one)."""
    pattern = re.compile(re.escape(SHARD_STATE).replace(r"\{rank\}", r"\d+").replace(r"\{world_size\}", r"(\d+)"))
    return sorted({int(match.group(1)) for path in checkpoint.iterdir() if (match := pattern.fullmatch(path.name))})


def incomplete_checkpoint_reason(checkpoint: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete. The Trainer writes the weights,
    then every process's optimizer state, the scheduler and RNG states, and trainer_state.json last: a folder whose
    trainer_state.json parses, and whose optimizer files are whole, was written to the end. torch.save writes a zip
    archive whose directory comes last, so a file cut short by a kill is not a zip archive."""
    state = checkpoint / TRAINER_STATE_NAME
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME}, the file the Trainer writes last"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_NAME} was cut short"
    shard_counts = sharded_state_world_sizes(checkpoint)
    optimizer_files = [checkpoint / OPTIMIZER_NAME] if (checkpoint / OPTIMIZER_NAME).exists() else []
    for world_size in shard_counts:
        optimizer_files += [checkpoint / SHARD_STATE.format(rank=rank, world_size=world_size)
                            for rank in range(world_size)]
    missing = [path.name for path in optimizer_files if not path.exists()]
    if missing:
        return f"no {', '.join(missing)}"
    cut = [path.name for path in optimizer_files if not zipfile.is_zipfile(path)]
    return f"{', '.join(cut)} cut short" if cut else None


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest checkpoint in `output_dir` that was written to the end, warning in one line about each newer one
    skipped (a run killed while saving leaves such a folder; HF's resume would stop at it)."""
    folders = [path for path in Path(output_dir).iterdir()
               if path.is_dir() and CHECKPOINT_FOLDER.fullmatch(path.name)]
    for folder in sorted(folders, key=lambda path: int(CHECKPOINT_FOLDER.fullmatch(path.name).group(1)), reverse=True):
        reason = incomplete_checkpoint_reason(folder)
        if reason is None:
            return str(folder)
        logger.warning("Skipping %s, which is incomplete (%s): a run was stopped while saving it", folder, reason)
    return None


def check_optimizer_state_matches(checkpoint: Path, training_args) -> None:
    """Refuses to resume when the checkpoint's optimizer state was saved by another number of M-FAC shards, or
    sharded vs not: the Trainer would otherwise load a wrong shard, or silently start with an empty window."""
    if not checkpoint.is_dir():
        raise MFACArgumentError(f"--resume_from_checkpoint: no such checkpoint folder: {checkpoint}")
    saved_by = sharded_state_world_sizes(checkpoint)
    world_size = launched_processes()
    if mfac_is_sharded(training_args):
        if (checkpoint / OPTIMIZER_NAME).exists():
            raise MFACArgumentError(f"{checkpoint}: holds unsharded optimizer state ({OPTIMIZER_NAME}); resume it "
                                    "without \"shard\": true in --optim_args")
        if saved_by and world_size not in saved_by:
            raise MFACArgumentError(f"{checkpoint}: holds M-FAC state sharded over {saved_by[0]} processes, but this "
                                    f"run has {world_size}: resume with {saved_by[0]} processes (e.g. torchrun "
                                    f"--nproc_per_node {saved_by[0]})")
    elif saved_by and not (checkpoint / OPTIMIZER_NAME).exists():
        raise MFACArgumentError(f"{checkpoint}: holds M-FAC state sharded over {saved_by[0]} processes; resume with "
                                f"--optim MFAC, \"shard\": true in --optim_args and {saved_by[0]} processes")
