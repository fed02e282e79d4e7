"""The HF Trainer with M-FAC: `MFACTrainer` builds `MFAC` through the Trainer's own machinery when the arguments
say `--optim MFAC` (param groups with and without weight decay, LR schedule, clipping, checkpoints), keeps one
optimizer state file per process for a sharded window (checkpoints.py), logs the optimizer's memory and the
training time, and adds M-FAC's and the adapters' sections to the model card (cards.py).

    trainer = MFACTrainer(model=model, args=training_args, ...)   # args: MFACTrainingArguments
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from ..memory import optimizer_state_bytes
from ..optimizer import MFAC
from .arguments import MFAC_NAME
from .cards import MODEL_CARD, adapter_card_section, mfac_card_section
from .checkpoints import SHARD_STATE, mfac_is_sharded
from .training_log import LOAD_AVERAGE, TRAIN_SECONDS

logger = logging.getLogger(__name__)


class OptimizerMemoryLogger(TrainerCallback):
    """Measures the optimizer state's size once, after the first step (M-FAC allocates its window there, AdamW its
    moments), logs it next to the upper bound estimated before loading, if any, and keeps it in `measured_bytes`
    so that scripts can record it with the run's metrics."""

    def __init__(self, bound: Optional[int]) -> None:
        self.bound = bound
        self.measured_bytes: Optional[int] = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.measured_bytes is not None or optimizer is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        self.measured_bytes = optimizer_state_bytes(inner)
        estimate = "" if self.bound is None else \
            f"; estimated before loading: at most {self.bound / 2**30:.3f} GiB with the step's buffers"
        logger.info("Optimizer state: %.3f GiB (%s)%s", self.measured_bytes / 2**30, type(inner).__name__, estimate)


class TrainingClock(TrainerCallback):
    """Adds to each evaluation's entry of the log history, and to the entry that ends training, `train_seconds`:
    the wall time spent training up to it with the evaluations' and checkpoint saves' own time taken out (the
    time-to-result clock, as AlgoPerf keeps it; a save's time grows with the optimizer state, not with training),
    and `load_average`, the machine's 1-minute load then, which tells whether the run had the cores to itself. A
    resumed run's clock goes on from the last time its history recorded."""

    def __init__(self) -> None:
        self.started: Optional[float] = None
        self.stopped: Optional[float] = None
        self.offset = 0.0
        self.excluded = 0.0  # seconds of evaluations and checkpoint saves so far

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work inside the block is not training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.stopped, self.excluded = time.perf_counter(), None, 0.0
        self.offset = max((entry[TRAIN_SECONDS] for entry in state.log_history if TRAIN_SECONDS in entry), default=0.0)

    def on_train_end(self, args, state, control, **kwargs):
        self.stopped = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Evaluation entries (they have a `*_runtime`) and the end-of-training entry (`train_runtime`: the
        clock's final reading) get the clock."""
        if self.started is None or not logs or not any(key.endswith("_runtime") for key in logs):
            return
        if self.stopped is None and "train_runtime" not in logs:
            self.excluded += next(value for key, value in logs.items() if key.endswith("_runtime"))
        now = self.stopped if self.stopped is not None else time.perf_counter()
        state.log_history[-1][TRAIN_SECONDS] = round(self.offset + now - self.started - self.excluded, 3)
        if hasattr(os, "getloadavg"):
            state.log_history[-1][LOAD_AVERAGE] = round(os.getloadavg()[0], 2)


class MFACTrainer(Trainer):
    """HF's Trainer, plus: with `args.optim == "mfac"` it builds MFAC from `args.mfac`; a sharded window saves and
    loads one state file per process (HF saves the optimizer state from the main process alone, which would lose
    the other processes' shards). `optimizer_memory_bound`: the bound to log beside the measured state. Each
    evaluation's log entry gets the training seconds up to it (TrainingClock)."""

    def __init__(self, *args, optimizer_memory_bound: Optional[int] = None, **kwargs) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "optim", None) == MFAC_NAME and kwargs.get("optimizer_cls_and_kwargs") is None:
            kwargs["optimizer_cls_and_kwargs"] = (MFAC, training_args.mfac.kwargs())
        self.memory_logger = OptimizerMemoryLogger(optimizer_memory_bound)
        self.clock = TrainingClock()
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.memory_logger, self.clock]
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs) -> None:
        with self.clock.paused():
            super()._save_checkpoint(*args, **kwargs)

    @property
    def optimizer_state_bytes(self) -> Optional[int]:
        """The optimizer state measured after the first training step (None before it)."""
        return self.memory_logger.measured_bytes

    def create_model_card(self, *args, local_base: Optional[str] = None, **kwargs) -> None:
        """HF's card (README.md in output_dir; `push_to_hub` writes it too), plus, for M-FAC, every optimizer
        argument as the run used it: HF's card prints `--optim_args` as typed, without the defaults it left out.
        `local_base` names a base model that is not on the Hub (HF's card links `finetuned_from` to the Hub, and
        says "trained from scratch" without it)."""
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        card = Path(self.args.output_dir, MODEL_CARD)
        if local_base is not None:
            text = card.read_text(encoding="utf-8").replace(
                "This model was trained from scratch on", f"This model is a fine-tuned version of the local model "
                f"`{local_base}` on", 1)
            base_path = getattr(next(iter(getattr(self.model, "peft_config", {}).values()), None),
                                "base_model_name_or_path", None)
            if base_path:  # PEFT's card names the base model by its path: the record names it instead
                text = text.replace(base_path, local_base)
            card.write_text(text, encoding="utf-8")
        with open(card, "a", encoding="utf-8") as handle:
            handle.write(adapter_card_section(self.model))
            if self.args.optim == MFAC_NAME:
                handle.write(mfac_card_section(self.args.mfac.kwargs()))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not mfac_is_sharded(self.args):
            return super()._save_optimizer_and_scheduler(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        torch.save(self.optimizer.state_dict(), self._shard_state_file(output_dir))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """M-FAC's state is read memory-mapped: the optimizer copies what it loads, and a window read whole
        beside that copy would take twice its memory (21 GiB for a 10.4 GiB window) while resuming."""
        if checkpoint is None or self.args.optim != MFAC_NAME:
            return super()._load_optimizer_and_scheduler(checkpoint)
        state_file = self._shard_state_file(checkpoint) if mfac_is_sharded(self.args) else \
            os.path.join(checkpoint, OPTIMIZER_NAME)
        self.optimizer.load_state_dict(torch.load(state_file, map_location="cpu", weights_only=True, mmap=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _shard_state_file(self, folder: str) -> str:
        return os.path.join(folder, SHARD_STATE.format(rank=self.args.process_index, world_size=self.args.world_size))
