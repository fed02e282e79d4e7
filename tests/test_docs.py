"""The README's `--optim_args` table is the parser's: every MFACArguments field, with its default, and no other key."""
import re
from dataclasses import MISSING, fields
from pathlib import Path

from mfac_optim.hf_arguments import MFACArguments

README = Path(__file__).resolve().parents[1] / "README.md"
# lr and weight_decay default to the Trainer's flags, as MFACArguments.parse fills them in.
FROM_FLAGS = {"lr": "`--learning_rate`", "weight_decay": "`--weight_decay`"}


def optim_args_table() -> dict[str, str]:
    """key -> default cell, from the table under the README's marker comment."""
    text = README.read_text()
    rows = text[text.index("<!-- optim_args table"):].split("\n\n")[0].splitlines()
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows if row.startswith("| `")]
    return {re.fullmatch(r"`(\w+)`", key).group(1): default for key, default, *_ in cells}


def test_optim_args_table_lists_every_key_with_its_default():
    table = optim_args_table()
    parsed = {f.name: f.default for f in fields(MFACArguments) if f.name != "given"}
    assert set(table) == set(parsed)
    for key, default in parsed.items():
        assert default is not MISSING
        assert table[key] == FROM_FLAGS.get(key, str(default)), key
