"""A tuning search space: which run_glue.py flags and M-FAC `--optim_args` keys scripts/tune.py samples, over which
ranges, and which it fixes. Read from an editable JSON file (configs/search/*.json):

    {"optim": "MFAC",
     "optim_args": {"lr": {"low": 1e-5, "high": 1e-1, "log": true},     # log-uniform float
                    "num_grads": {"choices": [64, 128, 256, 512]},      # one of these
                    "grad_dtype": "bfloat16"},                          # fixed
     "flags": {"warmup_ratio": {"low": 0.0, "high": 0.2}}}              # uniform float

A range whose bounds are both integers samples integers; "step" sets a grid. `"sampler": "grid"` runs every
combination of the choice lists once (each sampled entry must then be a choice list), instead of TPE. Each trial's `--optim_args` is the
whole "optim_args" object, sampled: nothing of a base config's `--optim_args` leaks in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Union

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from ..arguments import DataTrainingArguments, ModelArguments

from .. import UsageError
from ..json_config import read_json_object
from mfac_optim.hf.arguments import HF_OPTIMIZERS, MFAC_NAME, MFACArguments, MFACTrainingArguments

SECTIONS = ("optim", "flags", "optim_args", "description", "sampler")
SAMPLERS = ("tpe", "grid")
RANGE_KEYS = {"low", "high", "log", "step"}
# Flags that tune.py itself sets for every trial: a search space cannot move them.
CONTROLLED_FLAGS = {"optim", "optim_args", "train_file", "validation_file", "output_dir", "seed", "do_train",
                    "do_eval", "do_predict", "test_file"}

Fixed = Union[str, int, float, bool]
# A value this close to a log range's bound, in decades (a tenth of the width on a linear range), lies at its edge;
# the search widens a log range by WIDEN_DECADES past an edge that its best trial reaches.
EDGE_DECADES = 0.1
EDGE_SHARE = 0.1
WIDEN_DECADES = 1


def run_glue_flags() -> set[str]:
    return {f.name for dataclass_type in (ModelArguments, DataTrainingArguments, MFACTrainingArguments)
            for f in fields(dataclass_type) if f.init}


def mfac_keys() -> list[str]:
    return [f.name for f in fields(MFACArguments) if f.name != "given"]


@dataclass(frozen=True)
class SearchSpace:
    name: str  # the file's stem: the study's name in the storage
    optim: str
    sampled: dict[str, tuple[str, BaseDistribution]]  # parameter -> (section, distribution)
    fixed: dict[str, tuple[str, Fixed]]  # parameter -> (section, value)
    grid: bool = False  # every combination of the choice lists once, instead of TPE

    def with_ranges(self, ranges: dict[str, list[float]]) -> "SearchSpace":
        """This space with some log ranges replaced ([low, high] by name): the ranges a search widened."""
        sampled = dict(self.sampled)
        for name, (low, high) in ranges.items():
            section, distribution = sampled[name]
            sampled[name] = (section, FloatDistribution(low, high, log=True))
        return replace(self, sampled=sampled)

    def grid_points(self) -> dict[str, list[Any]]:
        """Each sampled parameter's choices (a grid space's)."""
        return {name: list(distribution.choices) for name, (_, distribution) in self.sampled.items()}

    def suggest(self, trial: optuna.Trial) -> dict[str, dict[str, Any]]:
        """This trial's values as {"flags": {...}, "optim_args": {...}}, fixed ones included."""
        return self.arrange({name: suggest_value(trial, name, distribution)
                             for name, (_, distribution) in self.sampled.items()})

    def arrange(self, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Sampled parameters (a trial's `params`) and the fixed ones, as {"flags": {...}, "optim_args": {...}}."""
        values: dict[str, dict[str, Any]] = {"flags": {}, "optim_args": {}}
        for name, (section, value) in self.fixed.items():
            values[section][name] = value
        for name, (section, _) in self.sampled.items():
            values[section][name] = params[name]
        return values


def edges_reached(value: Any, distribution: BaseDistribution) -> tuple[bool, bool]:
    """Whether a value lies at the low and at the high edge of a range: within EDGE_DECADES of a bound of a log
    range, EDGE_SHARE of the width of a linear one, or the smallest or largest of a choice list."""
    if isinstance(distribution, CategoricalDistribution):
        choices = sorted(distribution.choices)
        return value == choices[0], value == choices[-1]
    low, high = distribution.low, distribution.high
    if distribution.log:
        return math.log10(value / low) < EDGE_DECADES, math.log10(high / value) < EDGE_DECADES
    return (value - low) < EDGE_SHARE * (high - low), (high - value) < EDGE_SHARE * (high - low)


def at_the_edge(value: Any, distribution: BaseDistribution) -> bool:
    return any(edges_reached(value, distribution))


def widened_range(value: float, distribution: BaseDistribution) -> Optional[list[float]]:
    """A float log range widened by WIDEN_DECADES past each edge `value` reaches; None when it reaches none, or
    the range is not a float log range (a linear range or a choice list says nothing of what lies beyond it, and
    may end where the parameter does: momentum below 1, warmup at 0)."""
    if not (isinstance(distribution, FloatDistribution) and distribution.log):
        return None
    low_edge, high_edge = edges_reached(value, distribution)
    if not (low_edge or high_edge):
        return None
    return [distribution.low / 10 ** WIDEN_DECADES if low_edge else distribution.low,
            distribution.high * 10 ** WIDEN_DECADES if high_edge else distribution.high]


def suggest_value(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log,
                                 step=distribution.step)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log, step=distribution.step)


def load_search_space(path: Path) -> SearchSpace:
    """The search space in `path`; a UsageError naming the file and key for anything it cannot use."""
    return search_space_from(read_json_object(path, "search space file", ", ".join(SECTIONS)), path.stem, path)


def search_space_from(spec: dict[str, Any], name: str, path: Union[Path, str]) -> SearchSpace:
    """A search space from its JSON object (a file's, or the copy a study keeps); errors name `path`."""
    unknown = sorted(set(spec) - set(SECTIONS))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(SECTIONS)})")
    optim = spec.get("optim")
    allowed_optims = ["MFAC", *HF_OPTIMIZERS]
    if not isinstance(optim, str) or (optim.lower() != MFAC_NAME and optim not in HF_OPTIMIZERS):
        raise UsageError(f"{path}: optim: {optim!r} is not an optimizer (allowed: {', '.join(allowed_optims)})")
    is_mfac = optim.lower() == MFAC_NAME
    if "optim_args" in spec and not is_mfac:
        raise UsageError(f"{path}: optim_args: only for \"optim\": \"MFAC\" (HF's optimizers take their settings as "
                         "flags: put them under \"flags\")")
    sections = {"flags": sorted(run_glue_flags() - CONTROLLED_FLAGS), "optim_args": mfac_keys()}
    sampled, fixed = {}, {}
    for section, allowed in sections.items():
        entries = spec.get(section, {})
        if not isinstance(entries, dict):
            raise UsageError(f"{path}: {section}: must be a JSON object of name -> range, choices or value")
        for key, entry in entries.items():
            where = f"{path}: {section}.{key}"
            if key not in allowed:
                hint = " (set by tune.py itself)" if key in CONTROLLED_FLAGS else ""
                raise UsageError(f"{where}: unknown {'run_glue.py flag' if section == 'flags' else 'MFAC key'}{hint} "
                                 f"(allowed: {', '.join(allowed) if section == 'optim_args' else 'run_glue.py flags'})")
            if key in sampled or key in fixed:
                raise UsageError(f"{where}: {key} appears in both flags and optim_args")
            if isinstance(entry, dict):
                sampled[key] = (section, distribution_of(entry, where))
            elif isinstance(entry, (str, int, float, bool)):
                fixed[key] = (section, entry)
            else:
                raise UsageError(f"{where}: {entry!r} is neither a range, a choice list nor a value")
    if not sampled:
        raise UsageError(f"{path}: nothing to search: give at least one range or choice list")
    sampler = spec.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise UsageError(f"{path}: sampler: {sampler!r} (allowed: {', '.join(SAMPLERS)})")
    ranges = sorted(name for name, (_, distribution) in sampled.items()
                    if not isinstance(distribution, CategoricalDistribution))
    if sampler == "grid" and ranges:
        raise UsageError(f"{path}: sampler \"grid\" needs choice lists, not ranges ({', '.join(ranges)})")
    return SearchSpace(name, "MFAC" if is_mfac else optim, sampled, fixed, grid=sampler == "grid")


def distribution_of(entry: dict, where: str) -> BaseDistribution:
    """{"choices": [...]} or {"low", "high"[, "log"][, "step"]} as an Optuna distribution."""
    if "choices" in entry:
        choices = entry["choices"]
        if set(entry) != {"choices"}:
            raise UsageError(f"{where}: \"choices\" stands alone (got {', '.join(sorted(entry))})")
        if not isinstance(choices, list) or not choices or \
                not all(isinstance(choice, (str, int, float, bool)) for choice in choices):
            raise UsageError(f"{where}: choices: must be a non-empty list of values (got {choices!r})")
        return CategoricalDistribution(choices)
    unknown = sorted(set(entry) - RANGE_KEYS)
    if unknown or not {"low", "high"} <= set(entry):
        raise UsageError(f"{where}: a range has low and high, and optionally log and step (got "
                         f"{', '.join(sorted(entry)) or 'nothing'})")
    low, high, log, step = entry["low"], entry["high"], entry.get("log", False), entry.get("step")
    if not all(is_number(bound) for bound in (low, high)) or not low < high:
        raise UsageError(f"{where}: needs numbers low < high (got low {low!r}, high {high!r})")
    if not isinstance(log, bool):
        raise UsageError(f"{where}: log: must be true or false (got {log!r})")
    if log and low <= 0:
        raise UsageError(f"{where}: a log range needs low > 0 (got {low!r})")
    if step is not None and (not is_number(step) or step <= 0 or log):
        raise UsageError(f"{where}: step: must be a number > 0, and not with log (got {step!r})")
    if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)):
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
