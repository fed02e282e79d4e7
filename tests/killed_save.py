"""run_glue.py killed while saving one checkpoint, at each stage of the write, as a machine that loses power or a
scheduler's SIGKILL would:

    python tests/killed_save.py STEP OUTPUT_ROOT STAGE[,STAGE...] RUN_GLUE_ARGUMENTS...

For each STAGE, a process forked from this one (which has imported run_glue once) runs RUN_GLUE_ARGUMENTS with
--output_dir OUTPUT_ROOT/STAGE and dies while writing checkpoint-STEP. The stages, in the order the Trainer writes:
after the model ("model"), halfway through the optimizer state ("optimizer_cut"), after the optimizer and scheduler
("optimizer"), after the RNG states ("rng"), halfway through trainer_state.json ("state_cut"), or after it ("state", a
complete checkpoint not yet rotated). OUTPUT_ROOT/exits.json records how each process ended: -9 when it was killed.
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerState

import run_glue

STEP, OUTPUT_ROOT, STAGES, RUN_GLUE_ARGUMENTS = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
TARGET = f"checkpoint-{STEP}"
STAGE = None  # set in each forked process


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def cut_short(path: str) -> None:
    """The file as a kill during its write leaves it: its first half."""
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    die()


def after(method, stage: str, folder_of):
    def patched(*args, **kwargs):
        result = method(*args, **kwargs)
        if STAGE == stage and TARGET in str(folder_of(*args, **kwargs)):
            die()
        return result
    return patched


original_save = torch.save


def save(obj, path, *args, **kwargs):
    original_save(obj, path, *args, **kwargs)
    if STAGE == "optimizer_cut" and TARGET in str(path) and str(path).endswith("optimizer.pt"):
        cut_short(str(path))


torch.save = save
Trainer.save_model = after(Trainer.save_model, "model", lambda self, output_dir=None, **_: output_dir)
Trainer._save_optimizer_and_scheduler = after(Trainer._save_optimizer_and_scheduler, "optimizer",
                                              lambda self, output_dir: output_dir)
Trainer._save_rng_state = after(Trainer._save_rng_state, "rng", lambda self, output_dir: output_dir)
original_state_save = TrainerState.save_to_json


def save_state(self, json_path):
    original_state_save(self, json_path)
    if TARGET in str(json_path):
        if STAGE == "state_cut":
            cut_short(json_path)
        if STAGE == "state":
            die()


TrainerState.save_to_json = save_state


def run_killed_at(stage: str) -> int:
    """The exit status of a forked run that was to die at `stage`: -signal, or its exit code."""
    child = os.fork()
    if child == 0:  # imports only so far in the parent: no threads or open pools to inherit
        global STAGE
        STAGE = stage
        try:
            run_glue.main([*RUN_GLUE_ARGUMENTS, "--output_dir", str(OUTPUT_ROOT / stage)])
        finally:
            os._exit(0)  # not killed: the parent reports it
    _, status = os.waitpid(child, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


exits = {stage: run_killed_at(stage) for stage in STAGES}
(OUTPUT_ROOT / "exits.json").write_text(json.dumps(exits))
