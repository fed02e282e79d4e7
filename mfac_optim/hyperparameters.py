"""MFAC's hyperparameters and their checks: one precise ValueError per bad value, as torch.optim gives."""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor


GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}

# MFAC's defaults, the one table: MFAC's signature spells them out (tests hold it equal), `--optim_args` and the
# upgrade of param groups saved before a setting existed read them from here.
DEFAULTS = {"lr": 1e-4, "num_grads": 1024, "damp": 1e-6, "momentum": 0.0, "weight_decay": 0.0,
            "grad_dtype": "float32", "shard": False, "density": 1.0}

# Hyperparameters that define the one shared window, so every param group must agree on them.
WINDOW_KEYS = ("num_grads", "damp", "grad_dtype", "shard", "density")


def resolve_grad_dtype(value: Union[str, torch.dtype]) -> str:
    """Returns the canonical name ("float32", "bfloat16", "float16", "float64") of a window dtype given as name or
    dtype."""
    for name, dtype in GRAD_DTYPES.items():
        if value == name or value is dtype:
            return name
    raise ValueError(f"Invalid grad_dtype: {value!r} (allowed: {', '.join(GRAD_DTYPES)} or the torch dtypes)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_group_hyperparameters(group: dict) -> None:
    lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
    if isinstance(lr, Tensor):  # as torch.optim takes it (for LR schedules kept on the device): one number
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Invalid learning rate: a tensor lr must hold one floating-point number (got shape "
                             f"{tuple(lr.shape)}, {lr.dtype})")
        lr = lr.item()
    if not _is_number(lr) or not lr >= 0 or not math.isfinite(lr):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
    if not _is_number(weight_decay) or not weight_decay >= 0 or not math.isfinite(weight_decay):
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be a finite number >= 0)")
    if not _is_number(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"Invalid momentum: {momentum!r} (must satisfy 0 <= momentum < 1)")
    num_grads = group["num_grads"]
    if not isinstance(num_grads, int) or isinstance(num_grads, bool) or num_grads < 1:
        raise ValueError(f"Invalid num_grads: {num_grads!r} (must be a positive integer)")
    damp = group["damp"]
    if not _is_number(damp) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"Invalid damp: {damp!r} (must be a finite number > 0)")
    density = group["density"]
    if not _is_number(density) or not 0 < density <= 1:
        raise ValueError(f"Invalid density: {density!r} (must be a number with 0 < density <= 1)")
    if not isinstance(group["shard"], bool):
        raise ValueError(f"Invalid shard: {group['shard']!r} (must be true or false)")


def check_window_settings(groups: list[dict]) -> None:
    """All param groups share one window, so its settings must agree: the first group that differs names the key.
    Checked when a group is added and at every step, since a group's dict may be edited at any time."""
    first = groups[0]
    for index, group in enumerate(groups[1:], start=1):
        for key in WINDOW_KEYS:
            if group[key] != first[key]:
                raise ValueError(f"Invalid {key} in param group {index}: {group[key]!r} (all groups share one window, "
                                 f"so it must equal param group 0's {first[key]!r})")
