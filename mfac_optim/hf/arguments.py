"""`--optim MFAC` for any script that parses HF's `TrainingArguments`: `MFACTrainingArguments` accepts MFAC (any
case) next to HF's own optimizers, and parses `--optim_args` once into a typed, validated `MFACArguments`, from the
model cards' JSON (`'{"lr": 1e-4, "num_grads": 1024}'`) or HF's own form (`lr=1e-4,num_grads=1024`).

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, MFACTrainingArguments))
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from ..config import MFACConfig, settings
from .optim_args import MFACArgumentError, parse_optim_args

logger = logging.getLogger(__name__)

MFAC_NAME = "mfac"
HF_OPTIMIZERS = [name.value for name in OptimizerNames]
# HF optimizers whose Trainer handler reads no `--optim_args`: giving some would silently do nothing.
OPTIMIZERS_WITHOUT_ARGS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor")


@dataclass(frozen=True)
class MFACArguments(MFACConfig):
    """MFAC's settings (MFACConfig: their defaults and checks), as `--optim_args` gives them, with the keys it
    named."""

    given: tuple[str, ...] = field(default=(), compare=False)  # the keys --optim_args named, for the record

    @classmethod
    def parse(cls, optim_args: Optional[str], learning_rate: float, weight_decay: float) -> MFACArguments:
        """From `--optim_args`; `lr` and `weight_decay` default to `--learning_rate` and `--weight_decay`."""
        given = parse_optim_args(optim_args) if optim_args else {}
        unknown = sorted(set(given) - set(settings()))
        if unknown:
            raise MFACArgumentError(f"--optim_args: unknown key(s) {', '.join(unknown)} for MFAC (allowed: "
                                    f"{', '.join(settings())})")
        try:
            return cls(**{"lr": learning_rate, "weight_decay": weight_decay, **given}, given=tuple(given))
        except ValueError as error:
            raise MFACArgumentError(f"--optim_args: {error}") from None

    def kwargs(self) -> dict[str, Any]:
        """For `MFAC(params, **kwargs)`."""
        return self.as_dict()

    def record(self) -> dict[str, Any]:
        """lr, weight_decay and what --optim_args named: how the run was made."""
        return {key: getattr(self, key) for key in ("lr", "weight_decay", *self.given)}


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch


def check_fsdp(fsdp: Any, use_cpu: bool, mfac: bool) -> None:
    """--fsdp is refused where it would not do what it says: on the CPU, accelerate makes a multi-process run DDP
    and drops the FSDP plugin without a word (any optimizer); with M-FAC on GPUs, accelerate's FSDP checkpoints
    would resume an empty window (its load fills a fresh optimizer's state, which holds no window entries). M-FAC
    runs on FSDP2 in a loop of one's own: fully_shard, and DCP through MFACLoadPlanner (docs/usage.md)."""
    import torch

    if not fsdp:
        return
    if use_cpu or not torch.cuda.is_available():
        raise MFACArgumentError("--fsdp: the Trainer's FSDP (accelerate) runs on GPUs only; on the CPU it would train "
                                "as DDP without a word. For M-FAC on FSDP2 on the CPU, shard the model with "
                                "fully_shard in a loop of your own (docs/usage.md); for DDP, leave out --fsdp")
    if mfac:
        raise MFACArgumentError("--fsdp: with --optim MFAC the Trainer's FSDP checkpoints would resume an empty M-FAC "
                                "window (accelerate loads into a fresh optimizer's state); run M-FAC on FSDP2 in a "
                                "loop of your own with DCP and MFACLoadPlanner (docs/usage.md), or under DDP with "
                                "shard=true")


def check_processes_form_ddp(use_cpu: bool) -> None:
    """Without a GPU, the Trainer runs several launched processes as DDP only with --use_cpu; otherwise each
    trains alone on all the data, into the same output_dir."""
    import torch

    if launched_processes() > 1 and not use_cpu and not torch.cuda.is_available():
        raise MFACArgumentError(f"--use_cpu: {launched_processes()} processes were launched on a machine without a "
                                "GPU; add --use_cpu so that the Trainer runs them as one DDP job")


@dataclass
class MFACTrainingArguments(TrainingArguments):
    """`TrainingArguments` whose `--optim` also accepts MFAC (transformers checks it against its own enum). With
    MFAC, `mfac` holds the parsed arguments and `optim_args` their JSON record (saved with the run)."""

    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={"help": f"The optimizer: MFAC (any case) or one of HF's: {', '.join(HF_OPTIMIZERS)}."},
    )
    mfac: Optional[MFACArguments] = field(default=None, init=False)  # not a flag: parsed from --optim_args

    def __post_init__(self) -> None:
        check_processes_form_ddp(self.use_cpu)
        check_fsdp(self.fsdp, self.use_cpu, str(self.optim).lower() == MFAC_NAME)
        if str(self.optim).lower() == MFAC_NAME:
            self.mfac = MFACArguments.parse(self.optim_args, self.learning_rate, self.weight_decay)
            warn_if_overridden(self.mfac.lr, "lr", "--learning_rate", self.learning_rate)
            warn_if_overridden(self.mfac.weight_decay, "weight_decay", "--weight_decay", self.weight_decay)
            # Saved training arguments then say how the run was made, and the Trainer gives the decay param
            # group args.weight_decay (the other group 0.0), as for HF's own optimizers.
            self.learning_rate, self.weight_decay = self.mfac.lr, self.mfac.weight_decay
            self.optim_args = json.dumps(self.mfac.record())
            self.optim = TrainingArguments.default_optim
            super().__post_init__()
            self.optim = MFAC_NAME
            return
        if self.optim not in HF_OPTIMIZERS:
            raise MFACArgumentError(f"--optim: unknown optimizer {self.optim!r} (allowed: MFAC, "
                                    f"{', '.join(HF_OPTIMIZERS)})")
        if self.optim_args and self.optim in OPTIMIZERS_WITHOUT_ARGS:
            raise MFACArgumentError(f"--optim_args: {self.optim} takes no optimizer arguments (got {self.optim_args!r})")
        super().__post_init__()


def warn_if_overridden(value: float, key: str, flag: str, flag_value: float) -> None:
    if value != flag_value:
        logger.warning("--optim_args %s=%g overrides %s %g", key, value, flag, flag_value)
