"""The GLUE application of `mfac_optim`: what `run_glue.py` adds to HF's GLUE script, kept out of the script so that
the script reads as HF's with a few marked blocks, and the experiments (`mfac_glue.experiments`: tune, sweep,
compare, controls), which share the same checks. It imports the optimizer library, never the reverse, and never
imports the script:

- arguments: the script's two argument dataclasses and the parser main() and the experiments share;
- json_config: a JSON file of arguments that later flags override;
- command_line: every check that can fail before a model loads (one error line);
- data: GLUE's .tsv files as distributed, and local files checked for the task's columns;
- model_types: configs without "model_type" (prajjwal1/bert-mini) read as transformers 4 read them;
- metrics: GLUE's metrics computed locally (scikit-learn, scipy) under HF's keys;
- records: the run's run_info.json;
- adapters: LoRA adapters through PEFT (`--lora_r`), and what trains in full beside them.

They import transformers and datasets, which `mfac_optim` itself never imports; this module, json_config and records
do not, so that the tools that only read configs or run folders (sweep, compare, controls) start without them.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn


class UsageError(ValueError):
    """A mistake in the command line or its files: reported as one line, without a traceback."""


def exit_with_usage_error(message: str) -> NoReturn:
    """Reports a usage error as argparse does (one line naming the program) and exits with status 2."""
    if message.endswith("expected one argument"):
        # argparse takes a value such as -1e-4 (scientific notation) for a flag of its own.
        message += " (a value that starts with '-' is given after '=', as in --learning_rate=-1e-4)"
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {message}\n")
    sys.exit(2)
