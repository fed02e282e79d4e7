"""LoRA adapters through PEFT for run_glue.py (`--lora_r 8`): the flags' checks, which modules train in full, and the
wrapping of the model, the same for the model on the meta device (the memory preflight counts what will train)
and for the loaded one.

What trains: the adapters of --lora_target_modules, the classification head (PEFT's rule for sequence
classification) and, under `--lora_train_pooler auto`, a pooler the checkpoint never trained. A pooler counts as
never trained when the checkpoint lacks it or its bias is exactly zero, its initial value, which any training
moves (all-MiniLM-L6-v2 was trained through mean pooling: its pooler bias is all zeros). It is read from the
checkpoint file itself (a few hundred numbers) before the weights load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mfac_optim.hf.cards import names_module
from . import UsageError

POOLER_CHOICES = ("auto", "true", "false")


def check_lora_arguments(model_args) -> None:
    """The LoRA flags' values, from the arguments alone (the target modules are checked against the model later)."""
    if model_args.lora_r < 0:
        raise UsageError(f"--lora_r: must be ≥ 0 (0 trains the whole model), got {model_args.lora_r}")
    if not model_args.lora_alpha > 0:
        raise UsageError(f"--lora_alpha: must be > 0, got {model_args.lora_alpha}")
    if not 0 <= model_args.lora_dropout < 1:
        raise UsageError(f"--lora_dropout: must be in [0, 1), got {model_args.lora_dropout}")
    if model_args.lora_train_pooler not in POOLER_CHOICES:
        raise UsageError(f"--lora_train_pooler: must be one of {', '.join(POOLER_CHOICES)}, "
                         f"got {model_args.lora_train_pooler!r}")


@dataclass(frozen=True)
class LoraPlan:
    """What `--lora_r` > 0 does to the model: PEFT's LoRA settings and the modules that train in full."""

    rank: int
    alpha: float
    dropout: float
    target_modules: Optional[tuple[str, ...]]  # None: PEFT's default for the model type
    full_modules: tuple[str, ...]  # besides the head, which PEFT trains in full for sequence classification

    def peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(task_type=TaskType.SEQ_CLS, r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules) if self.target_modules else None,
                          modules_to_save=list(self.full_modules) or None)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with LoRA adapters; only they, the head and `full_modules` keep requires_grad."""
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config())


def lora_plan(model_args, config, model_class) -> Optional[LoraPlan]:
    """The plan for `--lora_r` > 0 (None for 0), checked against the model built from `config` on the meta device
    (no weights, no memory): every target module must name modules of the model, one error line otherwise."""
    if model_args.lora_r == 0:
        return None
    with torch.device("meta"):
        model = model_class.from_config(config, trust_remote_code=model_args.trust_remote_code)
    targets = tuple(model_args.lora_target_modules) if model_args.lora_target_modules else None
    if targets:
        check_target_modules(model, targets)
    pooler = pooler_name(model)
    full = (pooler,) if pooler is not None and pooler_trains(model_args, pooler, model.base_model_prefix) else ()
    return LoraPlan(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, targets, full)


def check_target_modules(model: torch.nn.Module, targets: tuple[str, ...]) -> None:
    """Each target names modules as PEFT matches them (a module's name, or its name's last parts)."""
    names = [name for name, _ in model.named_modules() if name]
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d))})
    for target in targets:
        if not any(names_module(name, target) for name in names):
            raise UsageError(f"--lora_target_modules: {target!r} names no module of this model; its layers are "
                             f"named {', '.join(leaves)}")


def pooler_name(model: torch.nn.Module) -> Optional[str]:
    """The base model's pooler (BERT's tanh(W·h_[CLS] + b), which its classification head reads), if it has one."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None or getattr(base, "pooler", None) is None:
        return None
    return f"{model.base_model_prefix}.pooler"


def pooler_trains(model_args, pooler: str, prefix: str) -> bool:
    """`--lora_train_pooler`, with `auto` deciding by the checkpoint (module docstring)."""
    if model_args.lora_train_pooler != "auto":
        return model_args.lora_train_pooler == "true"
    if model_args.model_name_or_path is None:  # a randomly initialised model: its pooler is random
        return True
    bias = checkpoint_tensor(model_args, [f"{pooler}.dense.bias", f"{pooler}.dense.bias".removeprefix(prefix + ".")])
    return bias is None or not bool(bias.any())


def checkpoint_tensor(model_args, keys: list[str]) -> Optional[torch.Tensor]:
    """The first of `keys` in the checkpoint's weight files (a folder, the Hub or its cache), read alone: from
    safetensors by its offset, from a .bin through a memory map. None if no file holds any of them."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    from .model_types import hub_options

    def weight_file(name: str) -> Optional[str]:
        return cached_file(model_args.model_name_or_path, name, _raise_exceptions_for_missing_entries=False,
                           **hub_options(model_args))

    index = weight_file("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        key = next((key for key in keys if key in weight_map), None)
        if key is None:
            return None
        with safe_open(weight_file(weight_map[key]), "pt") as handle:
            return handle.get_tensor(key)
    single = weight_file("model.safetensors")
    if single is not None:
        with safe_open(single, "pt") as handle:
            key = next((key for key in keys if key in handle.keys()), None)
            return None if key is None else handle.get_tensor(key)
    legacy = weight_file("pytorch_model.bin")
    if legacy is not None:
        state = torch.load(legacy, map_location="cpu", mmap=True, weights_only=True)
        return next((state[key] for key in keys if key in state), None)
    return None
