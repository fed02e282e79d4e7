"""run_glue.py's JSON configs: a file of arguments that later flags override. Without transformers, so that the
scripts that only read configs and pass them on (sweep) start at once."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from mfac_optim.hf.optim_args import parse_optim_args
from . import UsageError


def expand_json_config(argv: list[str]) -> list[str]:
    """`run_glue.py config.json --seed 5` -> the config's entries as flags, then the flags that override them. An
    `--optim_args` on the command line overrides the keys it names, and the config's other keys stay."""
    if not argv or not argv[0].endswith(".json"):
        return argv
    config, later = read_json_object(argv[0], "config file", "arguments"), list(argv[1:])
    position = last_flag_value(later, "--optim_args")
    if "optim_args" in config and position is not None:
        later[position] = merged_optim_args(config.pop("optim_args"), later[position])
    return config_flags(config) + later


def last_flag_value(argv: list[str], flag: str) -> Optional[int]:
    """The index of the value of the last `flag VALUE` in argv (`flag=VALUE` is split into two first), or None."""
    for index in range(len(argv) - 1, -1, -1):
        if argv[index].startswith(f"{flag}="):
            argv[index:index + 1] = [flag, argv[index][len(flag) + 1:]]
            return index + 1
        if argv[index] == flag and index + 1 < len(argv):
            return index + 1
    return None


def merged_optim_args(config_value: dict[str, Any] | str, given: str) -> str:
    """The config's optim_args with the command line's keys put over them, written in the command line's form
    (a JSON object, or HF's key=value pairs)."""
    base = config_value if isinstance(config_value, dict) else parse_optim_args(config_value)
    merged = {**base, **parse_optim_args(given)}
    if given.lstrip().startswith("{"):
        return json.dumps(merged)
    return ",".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in merged.items())


def read_json_object(path: str | Path, kind: str, contents: str) -> dict[str, Any]:
    """A JSON file that holds one object; a UsageError naming the file for anything else."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{kind} not found: {path}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: must hold a JSON object of {contents}")
    return value


def config_flags(config: dict[str, Any]) -> list[str]:
    """A JSON config's entries as command-line flags."""
    flags = []
    for key, value in config.items():
        if isinstance(value, dict):  # --optim_args '{"num_grads": 512}'
            values = [json.dumps(value)]
        elif isinstance(value, list):  # --report_to none tensorboard
            values = [str(item) for item in value]
        else:
            values = [str(value)]
        flags += [f"--{key}", *values]
    return flags
