"""The README's tables are what they claim to be: the `--optim_args` table is the settings' declaration (every
MFACConfig field, with its default, allowed values and meaning, and no other key), and each answered task's results
are what compare.py prints from the kept records with the commands in docs/results.md."""
import re
from pathlib import Path

from mfac_optim.config import defaults, settings

README = Path(__file__).resolve().parents[1] / "README.md"
# lr and weight_decay default to the Trainer's flags, as MFACArguments.parse fills them in.
FROM_FLAGS = {"lr": "`--learning_rate`", "weight_decay": "`--weight_decay`"}


def optim_args_table() -> dict[str, list[str]]:
    """key -> [default, allowed, meaning] cells, from the table under the README's marker comment."""
    text = README.read_text()
    rows = text[text.index("<!-- optim_args table"):].split("\n\n")[0].splitlines()
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows if row.startswith("| `")]
    return {re.fullmatch(r"`(\w+)`", key).group(1): rest for key, *rest in cells}


def test_optim_args_table_is_the_settings_declaration():
    table = optim_args_table()
    assert list(table) == list(settings())
    for key, declared in settings().items():
        default = FROM_FLAGS.get(key, str(defaults()[key]))
        assert table[key] == [default, declared.allowed, declared.meaning], key


RESULTS = README.parent / "docs" / "results.md"
STUDY = README.parent / "docs" / "results" / "full_budget"
SEEDS_PER_GROUP, GROUPS = 5, 4  # the study's design: tuned AdamW, tuned dense and compressed M-FAC, the cards' M-FAC


def answered_tasks() -> list[str]:
    """The study's tasks whose seed runs are all kept: their tables must be in the docs."""
    answered = []
    for seeds in sorted(STUDY.glob("*/seeds")):
        groups = [group for group in seeds.iterdir() if group.is_dir()]
        if len(groups) == GROUPS and all(len(list(group.glob("seed*"))) == SEEDS_PER_GROUP for group in groups):
            answered.append(seeds.parent.name)
    return answered


def compare_output(task: str, *flags: str, capsys) -> list[str]:
    """The table rows compare.py prints over the task's kept records, with the options docs/results.md gives."""
    from mfac_glue.experiments import compare

    folder = STUDY / task
    compare.main([*map(str, sorted(folder.glob("seeds/*/seed*"))), "--markdown", "--max_load", "2.5",
                  "--controls", str(folder / "controls.json"), "--reference", str(folder / f"seeds/{task}_adamw_tuned"),
                  *flags])
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def test_the_study_has_answered_a_task():
    assert "stsb" in answered_tasks()


def test_readme_and_results_tables_are_what_compare_prints_from_the_kept_records(capsys):
    readme, results = README.read_text().splitlines(), [cells(row) for row in RESULTS.read_text().splitlines()]
    for task in answered_tasks():
        summary = compare_output(task, "--summary", capsys=capsys)
        start = readme.index(summary[0])  # the header: a table of the README holds the summary, row for row
        assert readme[start:start + len(summary)] == summary, task
        # The full table, every cell but the bootstrap interval (2,000 resamples: minutes, left to the command).
        full = [cells(row) for row in compare_output(task, "--bootstrap", "0", capsys=capsys)]
        column = next(index for index, cell in enumerate(full[0]) if cell.startswith("bootstrap 95% CI"))
        for row in full[2:]:
            matches = [kept for kept in results if len(kept) == len(row) and kept[:column] == row[:column]
                       and kept[column + 1:] == row[column + 1:]]
            assert len(matches) == 1, (task, row)
