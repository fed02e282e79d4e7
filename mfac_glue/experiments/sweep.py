"""Runs run_glue.py configs over several seeds, one output folder per run, skipping runs already finished.

    python scripts/sweep.py configs/bert-mini_sst2_mfac.json configs/bert-mini_sst2_adam.json
    python scripts/sweep.py configs/*_sst2_*.json --seeds 1 2 --output_root runs/ -- --max_train_samples 2000

Each run goes to OUTPUT_ROOT/<config name>/seed<S>. A run counts as finished when run_glue.py has written its
all_results.json; an interrupted run is started again and run_glue.py resumes it from its last checkpoint.
With --keep_records DIR each finished run's records (no weights: what compare.py reads) are copied to
DIR/<config name>/seed<S> as soon as it ends, and a run whose records are kept there counts as finished: a fresh
checkout that holds the records resumes the sweep. A finished run's checkpoints are removed (they are there to
resume it). Arguments after `--` go to every run, last, so they override the config.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .. import UsageError
from ..json_config import expand_json_config
from ..records import ALL_RESULTS, copy_records, remove_checkpoints
from .compare import eval_metrics

DEFAULT_SEEDS = [1234, 1235, 1236, 1237, 1238]


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """The script's own arguments, and those after `--` (for every run_glue.py run)."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1:]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = split_at_double_dash(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="run_glue.py JSON config files")
    parser.add_argument("--seeds", nargs="+", type=int, default=DEFAULT_SEEDS, help="seeds (default: 1234 to 1238)")
    parser.add_argument("--output_root", type=Path, default=Path("runs"), help="parent of the run folders")
    parser.add_argument("--keep_records", type=Path, metavar="DIR",
                        help="copy each finished run's records, without weights, under DIR (and skip runs kept there)")
    args = parser.parse_args(argv)
    for config in args.configs:
        if config.suffix != ".json":
            parser.error(f"{config}: run_glue.py reads its configs from .json files")
        try:  # run_glue.py's own reader: a broken config fails here, before any run starts
            expand_json_config([str(config)])
        except UsageError as error:
            parser.error(str(error))
    return args, extra


def is_finished(run_dir: Path) -> bool:
    return (run_dir / ALL_RESULTS).is_file()


def run_command(config: Path, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "run_glue", str(config), "--seed", str(seed), "--output_dir", str(run_dir),
            *extra]


def headline(run_dir: Path) -> str:
    """The run's eval metrics, for the progress line."""
    metrics = eval_metrics(json.loads((run_dir / ALL_RESULTS).read_text()))
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    runs = [(config, seed) for config in args.configs for seed in args.seeds]
    failures = 0
    for number, (config, seed) in enumerate(runs, start=1):
        run_dir = args.output_root / config.stem / f"seed{seed}"
        kept = args.keep_records / config.stem / f"seed{seed}" if args.keep_records else None
        prefix = f"[{number}/{len(runs)}] {config.stem} seed {seed}:"
        done = next((folder for folder in (kept, run_dir) if folder is not None and is_finished(folder)), None)
        if done is not None:
            if kept is not None and done == run_dir:
                copy_records(run_dir, kept)
            print(f"{prefix} finished already, skipped ({headline(done)})", flush=True)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(run_dir / "sweep.log", "a") as log:
            code = subprocess.call(run_command(config, seed, run_dir, extra), stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if code == 0 and is_finished(run_dir):
            remove_checkpoints(run_dir)
            if kept is not None:
                copy_records(run_dir, kept)
            print(f"{prefix} done in {seconds:.0f} s ({headline(run_dir)})", flush=True)
        else:
            failures += 1
            print(f"{prefix} FAILED (exit {code}) after {seconds:.0f} s; see {run_dir / 'sweep.log'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
