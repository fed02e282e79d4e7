"""The study folder, the one place that names its files: tune.py writes them, the trial runner, the report and
scripts/fair_study.sh read them.

    STUDY_DIR/study.db                        the SQLite storage of every search in the folder (one per space)
    STUDY_DIR/data/split.json                 how the validation split was carved (written last: the split is whole)
    STUDY_DIR/data/{train,validation}.jsonl   the training part and the validation split
    STUDY_DIR/data/dev.jsonl                  GLUE's dev set from the Hub, for the seed runs (not for the trials)
    STUDY_DIR/trials/<space>/<number>/        each trial's run folder and trial.log
    STUDY_DIR/<task>_<space>_tuned.json       the selected setting of each space
    STUDY_DIR/tuning.png                      the report's plot

Shell scripts ask for a path with `python -m mfac_glue.experiments.study_folder STUDY_DIR NAME [TASK SPACE]`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


# The environment variable that holds the storage URL: tune.py's default for --storage, and how a trial's process
# gets it (a command line is visible to every user of the machine).
STORAGE_VARIABLE = "MFAC_TUNE_STORAGE"


def storage_for_display(url: str) -> str:
    """The storage URL as it may be printed or recorded: its password masked."""
    import sqlalchemy

    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class StudyFolder:
    root: Path

    @property
    def storage(self) -> Path:
        return self.root / "study.db"

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.storage.resolve()}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def split_record(self) -> Path:
        return self.data / "split.json"

    @property
    def train_part(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def validation_split(self) -> Path:
        return self.data / "validation.jsonl"

    @property
    def dev_set(self) -> Path:
        return self.data / "dev.jsonl"

    @property
    def split_files(self) -> tuple[Path, Path, Path]:
        """What a whole split is: its record and its two files."""
        return self.split_record, self.train_part, self.validation_split

    @property
    def plot(self) -> Path:
        return self.root / "tuning.png"

    def trial(self, space: str, name: str) -> Path:
        """A trial's run folder (`name`: its number, or "check" for the arguments' check)."""
        return self.root / "trials" / space / name

    @staticmethod
    def trial_log(run_folder: Path) -> Path:
        return run_folder / "trial.log"

    def tuned_config(self, task: Optional[str], space: str) -> Path:
        return self.root / f"{tuned_name(task, space)}.json"


def tuned_name(task: Optional[str], space: str) -> str:
    """The selected setting's name: its file's stem, and the run name of its seed runs."""
    return f"{task or 'custom'}_{space}_tuned"


# The paths a shell script may ask for by name (tuned_config also takes TASK and SPACE).
NAMED_PATHS = ("storage", "storage_url", "split_record", "train_part", "plot")


def main(argv: Optional[list[str]] = None) -> int:
    """Prints one path of a study folder: NAME is one of NAMED_PATHS, or tuned_config with TASK and SPACE."""
    argv = sys.argv[1:] if argv is None else argv
    names = [*NAMED_PATHS, "tuned_config"]
    if len(argv) < 2 or argv[1] not in names or (argv[1] == "tuned_config") != (len(argv) == 4) or \
            argv[1] != "tuned_config" and len(argv) != 2:
        print(f"usage: study_folder STUDY_DIR NAME [TASK SPACE]: NAME one of {', '.join(names)} "
              "(TASK and SPACE with tuned_config only)", file=sys.stderr)
        return 2
    folder = StudyFolder(Path(argv[0]))
    print(folder.tuned_config(*argv[2:]) if argv[1] == "tuned_config" else getattr(folder, argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
