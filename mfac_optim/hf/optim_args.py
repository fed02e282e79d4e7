"""The text of `--optim_args` and the error a bad one raises, apart from arguments.py: the tools that only read a
run's JSON config and pass it on (sweep) need them too, and start without transformers' import."""
from __future__ import annotations

import json
from typing import Any


class MFACArgumentError(ValueError):
    """A mistake in `--optim`/`--optim_args`: scripts report it as one line, without a traceback."""


def parse_optim_args(text: str) -> dict[str, Any]:
    """A JSON object, or HF's `key=value,key=value` with numbers and true/false read as such."""
    if text.lstrip().startswith(("{", "[")):
        try:
            given = json.loads(text)
        except json.JSONDecodeError as error:
            raise MFACArgumentError(f"--optim_args: not valid JSON ({error.msg} at char {error.pos}): {text}") from None
        if not isinstance(given, dict):
            raise MFACArgumentError(f"--optim_args: must be a JSON object like '{{\"num_grads\": 1024}}' or "
                                    f"key=value pairs like num_grads=1024, got {text}")
        return given
    given = {}
    for pair in text.split(","):
        key, separator, value = (part.strip() for part in pair.partition("="))
        if not separator or not key:
            raise MFACArgumentError(f"--optim_args: {pair.strip()!r} is not key=value (expected e.g. "
                                    f"num_grads=1024,damp=1e-6, or a JSON object)")
        given[key] = typed_value(value)
    return given


def typed_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
