"""MFAC's settings, declared once: `MFACConfig`. Each field carries its default, its check (one precise ValueError
per bad value, as torch.optim gives), the words of the README's table, and what the window makes of it. The
optimizer's signature, `defaults` and the upgrade of old param groups, the Trainer glue's `MFACArguments` and the
README's table (its test) all derive from it."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from functools import cache
from types import MappingProxyType
from typing import Any, Callable, Union

import torch
from torch import Tensor

GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}

# What the window makes of a setting: nothing (each param group has its own), shared (every param group must agree,
# and the window follows a change), or fixed (shared, and it cannot change once the window exists).
PER_GROUP, SHARED, FIXED = "per group", "shared", "fixed"


@dataclass(frozen=True)
class Setting:
    """One setting's declaration: `check` returns the value in canonical form or raises ValueError naming the key;
    `allowed` and `meaning` are the README's words."""

    check: Callable[[Any], Any]
    allowed: str
    meaning: str
    window: str = PER_GROUP


def resolve_grad_dtype(value: Union[str, torch.dtype]) -> str:
    """Returns the canonical name ("float32", "bfloat16", "float16", "float64") of a window dtype given as name or
    dtype."""
    for name, dtype in GRAD_DTYPES.items():
        if value == name or value is dtype:
            return name
    raise ValueError(f"Invalid grad_dtype: {value!r} (allowed: {', '.join(GRAD_DTYPES)} or the torch dtypes)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_lr(lr: Union[float, Tensor]) -> Union[float, Tensor]:
    number = lr
    if isinstance(lr, Tensor):  # as torch.optim takes it (for LR schedules kept on the device): one number
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Invalid learning rate: a tensor lr must hold one floating-point number (got shape "
                             f"{tuple(lr.shape)}, {lr.dtype})")
        number = lr.item()
    if not _is_number(number) or not number >= 0 or not math.isfinite(number):
        raise ValueError(f"Invalid learning rate: {number!r} (must be a finite number >= 0)")
    return lr


def _check_weight_decay(value: float) -> float:
    if not _is_number(value) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"Invalid weight_decay: {value!r} (must be a finite number >= 0)")
    return value


def _check_momentum(value: float) -> float:
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"Invalid momentum: {value!r} (must satisfy 0 <= momentum < 1)")
    return value


def _check_num_grads(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid num_grads: {value!r} (must be a positive integer)")
    return value


def _check_damp(value: float) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid damp: {value!r} (must be a finite number > 0)")
    return value


def _check_density(value: float) -> float:
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(f"Invalid density: {value!r} (must be a number with 0 < density <= 1)")
    return value


def _check_shard(value: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid shard: {value!r} (must be true or false)")
    return value


def setting(default: Any, check: Callable[[Any], Any], allowed: str, meaning: str, window: str = PER_GROUP) -> Any:
    return field(default=default, metadata={"setting": Setting(check, allowed, meaning, window)})


@dataclass(frozen=True)
class MFACConfig:
    """MFAC's settings, checked and in canonical form (grad_dtype by name)."""

    lr: float = setting(1e-4, _check_lr, "≥ 0", "step size; the step scales roughly with lr · num_grads / ‖g‖, so a "
                        "larger window wants a smaller lr")
    num_grads: int = setting(1024, _check_num_grads, "integer ≥ 1", "m, the number of past gradients in the window",
                             FIXED)
    damp: float = setting(1e-6, _check_damp, "> 0", "λ, the dampening of the Fisher matrix F = λI + (1/m) Σ gᵢgᵢᵀ",
                          SHARED)
    momentum: float = setting(0.0, _check_momentum, "[0, 1)", "exponential average of the preconditioned directions")
    weight_decay: float = setting(0.0, _check_weight_decay, "≥ 0", "L2 added to the gradient before it enters the "
                                  "window")
    grad_dtype: str = setting("float32", resolve_grad_dtype, ", ".join(GRAD_DTYPES), "storage type of the window "
                              "(bfloat16 halves it)", FIXED)
    shard: bool = setting(False, _check_shard, "true, false", "split the window across the processes of a "
                          "torchrun/accelerate job", SHARED)
    density: float = setting(1.0, _check_density, "(0, 1]", "below 1: keep only this fraction of each gradient's "
                             "entries (top-k with error feedback)", FIXED)

    def __post_init__(self) -> None:
        for name, declared in settings().items():
            object.__setattr__(self, name, declared.check(getattr(self, name)))

    def as_dict(self) -> dict[str, Any]:
        """The settings by name (as they are: a tensor lr stays the same tensor)."""
        return {name: getattr(self, name) for name in settings()}


@cache  # the declaration is fixed: read once (the window asks for its keys at every step)
def settings() -> MappingProxyType:
    """Every setting's declaration, by name, in the config's order (read-only: one mapping serves every caller)."""
    return MappingProxyType({f.name: f.metadata["setting"] for f in fields(MFACConfig)})


def defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(MFACConfig)}


@cache
def window_keys(*kinds: str) -> tuple[str, ...]:
    """The settings the window makes something of: shared and fixed ones (or only those of `kinds`)."""
    kinds = kinds or (SHARED, FIXED)
    return tuple(name for name, declared in settings().items() if declared.window in kinds)


def keyword_signature(function: Callable, leading: int) -> inspect.Signature:
    """`function`'s signature with its `**settings` spelled out as keyword-only parameters with their defaults (the
    first `leading` parameters kept): what help() and editors show of the optimizer's constructor."""
    kept = list(inspect.signature(function).parameters.values())[:leading]
    spelled = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(MFACConfig)]
    return inspect.Signature(kept + spelled)


def check_group(group: dict) -> None:
    """In place: a param group's settings checked and in canonical form."""
    for name, declared in settings().items():
        group[name] = declared.check(group[name])


def check_window_settings(groups: list[dict]) -> None:
    """All param groups share one window, so its settings must agree: the first group that differs names the key.
    Checked when a group is added and at every step, since a group's dict may be edited at any time."""
    first = groups[0]
    for index, group in enumerate(groups[1:], start=1):
        for key in window_keys():
            if group[key] != first[key]:
                raise ValueError(f"Invalid {key} in param group {index}: {group[key]!r} (all groups share one window, "
                                 f"so it must equal param group 0's {first[key]!r})")


def unknown_settings(given: Any, owner: str) -> None:
    """A TypeError naming the keys that are no setting, and the settings."""
    unknown = sorted(set(given) - set(settings()))
    if unknown:
        raise TypeError(f"{owner}: unknown setting(s) {', '.join(unknown)} (allowed: {', '.join(settings())})")

