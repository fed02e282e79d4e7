"""The HF Trainer with M-FAC: `MFACTrainer` builds `MFAC` through the Trainer's own machinery when the arguments
say `--optim MFAC` (param groups with and without weight decay, LR schedule, clipping, checkpoints), keeps one
optimizer state file per process for a sharded window, and logs the optimizer's memory. Before a model loads, a
script can bound that memory from the model config and refuse a window that cannot fit, and refuse checkpoints
saved by another sharding.

    trainer = MFACTrainer(model=model, args=training_args, ...)   # args: MFACTrainingArguments
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .hf_arguments import MFAC_NAME, MFACArgumentError, launched_processes
from .memory import memory_bound_bytes, optimizer_state_bytes
from .optimizer import MFAC
from .training_log import LOAD_AVERAGE, TRAIN_SECONDS

logger = logging.getLogger(__name__)

# One optimizer state file per process for a sharded M-FAC window (the name HF uses for per-rank optimizer state).
SHARD_STATE = "rank{rank}-of-{world_size}-" + OPTIMIZER_NAME
MODEL_CARD = "README.md"  # where Trainer.create_model_card writes
CHECKPOINT_FOLDER = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def mfac_is_sharded(training_args) -> bool:
    return training_args.optim == MFAC_NAME and training_args.mfac.shard


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


def mfac_card_section(settings: dict) -> str:
    """The model card's M-FAC section: the optimizer's paper and each of its arguments."""
    rows = "".join(f"| {key} | {value} |\n" for key, value in settings.items())
    return ("\n## Optimizer: M-FAC\n\nTrained with M-FAC (Frantar, Kurtic, Alistarh, \"M-FAC: Efficient Matrix-Free "
            "Approximations of Second-Order Information\", NeurIPS 2021), package `mfac-optim`, with these "
            f"arguments:\n\n| argument | value |\n|---|---|\n{rows}")


def names_module(module: str, target: str) -> bool:
    """Whether a target module name, as PEFT matches them, names the module `module` (its whole name or its last
    parts)."""
    return module == target or module.endswith("." + target)


def adapter_card_section(model: torch.nn.Module) -> str:
    """The model card's lines on the adapters of a PEFT model ("" for any other model)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return ""
    config = next(iter(configs.values()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    module_names = [name for name, _ in model.named_modules()]
    full = [name for name in sorted(config.modules_to_save or [])  # PEFT names heads of other models too
            if any(names_module(module, name) for module in module_names)]
    return (f"\n\n## Adapters: LoRA\n\nTrained as LoRA adapters (PEFT) with r = {config.r}, lora_alpha = "
            f"{config.lora_alpha:g}, lora_dropout = {config.lora_dropout:g} on {', '.join(sorted(config.target_modules))}; "
            f"trained in full: {', '.join(full)}. {trainable:,} of {total:,} parameters train.\n")


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


def mfac_memory_bound(config, model_class, training_args, tokens_per_example: int,
                      trust_remote_code: bool = False,
                      adapt: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
                      ids_per_batch: Optional[int] = None) -> Optional[int]:
    """For --optim MFAC, an upper bound of the optimizer's bytes in each process, from the shapes of the parameters
    that train in `model_class.from_config(config)` (built on the meta device: no weights, no memory), after
    `adapt` if given (adapters: only they and the modules trained in full), and the M-FAC arguments; None for
    other optimizers. Embedding rows stored per gradient are bounded by what one batch can hold, unless weight
    decay makes the embedding gradients dense: a position embedding (as many rows as the config's
    max_position_embeddings) by the tokens of one example, any other by the tokens of one step's batches, or by
    `ids_per_batch`, the most distinct ids those batches of the training data can hold, where the caller counted
    them."""
    if training_args.optim != MFAC_NAME:
        return None
    with torch.device("meta"):
        model = model_class.from_config(config, trust_remote_code=trust_remote_code)
        if adapt is not None:
            model = adapt(model)
    arguments = training_args.mfac
    # One optimizer step's gradient sums the micro-batches of an accumulation.
    tokens_per_batch = examples_per_gradient(training_args) * tokens_per_example
    token_rows = tokens_per_batch if ids_per_batch is None else min(ids_per_batch, tokens_per_batch)
    positions = getattr(config, "max_position_embeddings", None)
    embedding_rows = {} if arguments.weight_decay > 0 else {
        id(module.weight): min(module.num_embeddings,
                               tokens_per_example if module.num_embeddings == positions else token_rows)
        for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    return memory_bound_bytes([p.shape for p in params],
                              {i: embedding_rows[id(p)] for i, p in enumerate(params) if id(p) in embedding_rows},
                              arguments.num_grads, arguments.grad_dtype, arguments.momentum > 0,
                              training_args.world_size if arguments.shard else 1, arguments.density)


def examples_per_gradient(training_args) -> int:
    """The training examples one process's optimizer step sees: its batch times the accumulation steps."""
    return training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps


def check_mfac_fits(bound: int, training_args) -> None:
    """Refuses, before the weights load, an M-FAC window that cannot fit in the training device's free memory."""
    where, available = available_memory(training_args)
    if available is None or bound <= available:
        return
    advice = "use a smaller num_grads"
    if training_args.mfac.grad_dtype == "float32":
        advice += ' or "grad_dtype": "bfloat16"'
    raise MFACArgumentError(f"--optim_args: M-FAC with num_grads={training_args.mfac.num_grads} needs up to "
                            f"{bound / 2**30:.2f} GiB per process for this model, but {where} has "
                            f"{available / 2**30:.2f} GiB available: {advice}")


def available_memory(training_args) -> tuple[str, Optional[int]]:
    """(what, free bytes) of the training device for one process: a GPU's free memory, or the machine's available
    RAM shared by the processes launched on it; None where it cannot be asked."""
    device = training_args.device
    if device.type == "cuda":
        return f"GPU {device}", torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil

        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        share = f" (shared by {local_processes} processes)" if local_processes > 1 else ""
        return f"this machine's RAM{share}", psutil.virtual_memory().available // local_processes
    return str(device), None
