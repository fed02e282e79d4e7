"""run_glue.py that kills itself while saving one checkpoint, at one stage of the write, as a machine that loses
power or a scheduler's SIGKILL would:

    python tests/killed_save.py STAGE STEP RUN_GLUE_ARGUMENTS...

STAGE is where in checkpoint-STEP's write the process dies, in the order the Trainer writes: after the model
("model"), halfway through the optimizer state ("optimizer_cut"), after the optimizer and scheduler ("optimizer"),
after the RNG states ("rng"), halfway through trainer_state.json ("state_cut"), or after it ("state", a complete
checkpoint not yet rotated).
"""
import os
import signal
import sys

import torch
from transformers import Trainer, TrainerState

import run_glue

STAGE, STEP = sys.argv[1], int(sys.argv[2])
TARGET = f"checkpoint-{STEP}"


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
run_glue.main(sys.argv[3:])
