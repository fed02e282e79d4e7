"""scripts/ and configs/: the reproduction command, the seed sweep, the comparison table and plot, and the
benchmark's one-run comparison."""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

import run_glue
from mfac_glue import records as glue_records
from mfac_optim import MFAC

ROOT = Path(__file__).resolve().parent.parent
from mfac_glue.experiments import compare, controls, paired, sweep  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))  # the benchmark is a script of its own
import bench_mfac  # noqa: E402

REPRODUCE = ROOT / "scripts" / "reproduce_sst2_bert_mini.sh"
PUBLISHED = [
    "--seed", "1234", "--model_name_or_path", "prajjwal1/bert-mini", "--task_name", "sst2", "--do_train", "--do_eval",
    "--max_seq_length", "128", "--per_device_train_batch_size", "32", "--learning_rate", "1e-4",
    "--num_train_epochs", "3", "--output_dir", "out_dir/", "--optim", "MFAC",
    "--optim_args", '{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}',
]


@pytest.fixture
def python_on_path(tmp_path):
    """A PATH whose `python` records run_glue.py's arguments instead of training, and is the real one otherwise."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    log = tmp_path / "run_glue_args.json"
    stub = stub_dir / "python"
    stub.write_text(f"""#!/bin/sh
if [ "$1" = run_glue.py ]; then
  exec {sys.executable} -c 'import json, sys; json.dump(sys.argv[1:], open("{log}", "w"))' "$@"
fi
exec {sys.executable} "$@"
""")
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{stub_dir}{os.pathsep}{os.environ['PATH']}"}, log


def reproduce(env, *args):
    return subprocess.run(["bash", str(REPRODUCE), *args], env=env, capture_output=True, text=True, timeout=300)


def test_reproduction_command_is_the_published_one(python_on_path, tiny_bert, glue_dir):
    env, log = python_on_path
    train, dev = glue_dir / "SST-2" / "train.tsv", glue_dir / "SST-2" / "dev.tsv"
    result = reproduce({**env, "MODEL": str(tiny_bert), "TRAIN_FILE": str(train), "VALIDATION_FILE": str(dev)})
    assert result.returncode == 0, result.stderr
    args = json.loads(log.read_text())
    expected = [str(tiny_bert) if a == "prajjwal1/bert-mini" else a for a in PUBLISHED]
    assert args == ["run_glue.py", *expected, "--train_file", str(train), "--validation_file", str(dev)]


def test_reproduction_fails_clearly_without_hub_or_files(python_on_path, tmp_path):
    env, log = python_on_path
    result = reproduce({**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")})
    assert result.returncode == 2 and not log.exists() and result.stderr.count("\n") == 1
    assert (f"model 'prajjwal1/bert-mini' is not in the cache ({tmp_path / 'empty-cache'}) and HF_HUB_OFFLINE=1"
            in result.stderr)
    assert "set MODEL=/path/to/model" in result.stderr
    result = reproduce({**env, "MODEL": "/nonexistent/model"})
    assert result.returncode == 2 and "MODEL folder not found: /nonexistent/model" in result.stderr
    result = reproduce({**env, "TRAIN_FILE": "/nonexistent/train.tsv"})
    assert result.returncode == 2 and "set both TRAIN_FILE and VALIDATION_FILE" in result.stderr


def test_reproduction_optim_args_override_only_the_keys_they_name(python_on_path, tiny_bert, glue_dir):
    env, log = python_on_path
    env = {**env, "MODEL": str(tiny_bert), "TRAIN_FILE": str(glue_dir / "SST-2" / "train.tsv"),
           "VALIDATION_FILE": str(glue_dir / "SST-2" / "dev.tsv")}
    result = reproduce(env, "--optim_args", '{"grad_dtype": "bfloat16", "num_grads": 512}', "--max_steps", "4")
    assert result.returncode == 0, result.stderr
    args = json.loads(log.read_text())
    assert json.loads(args[args.index("--optim_args") + 1]) == {"lr": 1e-4, "num_grads": 512, "damp": 1e-6,
                                                                "grad_dtype": "bfloat16"}
    assert args.count("--optim_args") == 1 and args[-2:] == ["--max_steps", "4"]
    log.unlink()
    result = reproduce(env, "--optim_args=[1]")
    assert result.returncode == 2 and not log.exists() and "--optim_args: not a JSON object" in result.stderr


def test_reproduction_runs_the_published_command_from_the_hub_cache(python_on_path, hub_cache):
    env, log = python_on_path
    result = reproduce({**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hub_cache)})
    assert result.returncode == 0, result.stderr
    assert "running from the Hugging Face cache, without the Hub" in result.stderr
    assert json.loads(log.read_text()) == ["run_glue.py", *PUBLISHED]
    # Without HF_HUB_OFFLINE: a Hub that cannot be reached (as here) is no reason to refuse what the cache holds.
    online = {key: value for key, value in env.items() if not key.endswith("_OFFLINE")}
    log.unlink()
    result = reproduce({**online, "HF_HOME": str(hub_cache)})
    assert result.returncode == 0, result.stderr
    assert json.loads(log.read_text()) == ["run_glue.py", *PUBLISHED]


@pytest.mark.slow
def test_reproduction_overrides_run_for_real(tmp_path, tiny_bert, glue_dir):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MODEL": str(tiny_bert), "SEED": "7", "OUTPUT_DIR": str(tmp_path / "run"),
           "TRAIN_FILE": str(glue_dir / "SST-2" / "train.tsv"), "VALIDATION_FILE": str(glue_dir / "SST-2" / "dev.tsv")}
    result = reproduce(env, "--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "16",
                       "--optim_args", '{"num_grads": 8}', "--report_to", "none", "--save_strategy", "no")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["seed"] == 7 and info["model"] == glue_records.model_source_record(str(tiny_bert))
    assert info["optimizer"] == {"optim": "MFAC", "optim_args": {"lr": 1e-4, "weight_decay": 0.0, "num_grads": 8,
                                                                 "damp": 1e-6}}
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 2


# --- configs -----------------------------------------------------------------------------------------------------
CONFIGS = sorted((ROOT / "configs").glob("*.json"))


def test_configs_cover_the_published_grid():
    names = {path.stem for path in CONFIGS}
    assert names == {f"{model}_{task}_{opt}" for model in ("bert-tiny", "bert-mini")
                     for task in ("sst2", "mrpc", "stsb", "qnli", "qqp", "mnli") for opt in ("mfac", "adam")}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_parses_to_the_published_settings(path, hub_cache):
    argv = [str(path), "--cache_dir", str(hub_cache / "hub")]
    model_args, data_args, training_args, _ = run_glue.parse_arguments(argv)
    task = data_args.task_name
    assert model_args.model_name_or_path == f"prajjwal1/{path.stem.split('_')[0]}"
    assert (training_args.learning_rate, training_args.per_device_train_batch_size, data_args.max_seq_length) == (1e-4, 32, 128)
    assert training_args.num_train_epochs == (3 if task == "sst2" else 5)
    if path.stem.endswith("_mfac"):
        assert training_args.optim == "mfac"
        assert json.loads(training_args.optim_args) == {
            "lr": 1e-4, "weight_decay": 0.0, "num_grads": 512 if task in ("mrpc", "stsb") else 1024, "damp": 1e-6}
    else:
        assert training_args.optim == "adamw_torch"


def test_config_field_overridden_from_the_command_line(hub_cache):
    path = ROOT / "configs" / "bert-mini_sst2_mfac.json"
    _, _, training_args, _ = run_glue.parse_arguments([str(path), "--num_train_epochs", "1", "--optim_args",
                                                              '{"num_grads": 64}', "--cache_dir", str(hub_cache / "hub")])
    assert training_args.num_train_epochs == 1 and json.loads(training_args.optim_args)["num_grads"] == 64


# --- sweep -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_runs_each_seed_once_and_resumes(tmp_path, tiny_bert, glue_dir, capsys):
    config = tmp_path / "tiny_sst2_mfac.json"
    config.write_text(json.dumps({
        "model_name_or_path": str(tiny_bert), "task_name": "sst2", "do_train": True, "do_eval": True,
        "train_file": str(glue_dir / "SST-2" / "train.tsv"), "validation_file": str(glue_dir / "SST-2" / "dev.tsv"),
        "max_train_samples": 32, "max_eval_samples": 16, "max_seq_length": 32, "max_steps": 2,
        "per_device_train_batch_size": 16, "report_to": "none", "save_strategy": "steps", "save_steps": 1,
        "disable_tqdm": True,
        "optim": "MFAC", "optim_args": {"num_grads": 4}}))
    argv = [str(config), "--seeds", "1", "2", "--output_root", str(tmp_path / "runs"), "--", "--learning_rate", "1e-3"]
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    assert "[1/2] tiny_sst2_mfac seed 1: done in" in first and "[2/2] tiny_sst2_mfac seed 2: done in" in first
    runs = [tmp_path / "runs" / "tiny_sst2_mfac" / f"seed{seed}" for seed in (1, 2)]
    infos = [json.loads((run / "run_info.json").read_text()) for run in runs]
    assert [info["seed"] for info in infos] == [1, 2]
    assert infos[0]["optimizer"]["optim_args"]["lr"] == 1e-3  # the argument after -- overrides the config
    assert infos[0]["train_examples"] == 32
    # The code that ran: this checkout's commit, or the installed package's version.
    assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?|mfac-optim \S+", infos[0]["code"]), infos[0]["code"]
    # Saved at every step to resume from, and removed once the run finished.
    assert "checkpoint-2" in (runs[0] / "sweep.log").read_text()
    assert not [path for run in runs for path in run.glob("checkpoint-*")]

    finished = (runs[0] / "all_results.json").stat().st_mtime_ns
    (runs[1] / "all_results.json").unlink()  # seed 2 interrupted before it finished
    assert sweep.main(argv) == 0
    second = capsys.readouterr().out
    assert "[1/2] tiny_sst2_mfac seed 1: finished already, skipped (eval_accuracy" in second
    assert "[2/2] tiny_sst2_mfac seed 2: done in" in second
    assert (runs[0] / "all_results.json").stat().st_mtime_ns == finished

    # Records kept apart: every finished run's, without weights; a checkout holding only them resumes the sweep.
    kept = tmp_path / "evidence"
    assert sweep.main([*argv[:6], "--keep_records", str(kept), *argv[6:]]) == 0
    for seed in (1, 2):
        names = sorted(path.name for path in (kept / "tiny_sst2_mfac" / f"seed{seed}").iterdir())
        assert names == ["all_results.json", "eval_predictions_sst2.tsv", "run_info.json", "trainer_state.json"]
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    assert sweep.main([*argv[:6], "--keep_records", str(kept), *argv[6:]]) == 0
    assert capsys.readouterr().out.count("finished already, skipped (eval_accuracy") == 2
    assert not (tmp_path / "runs").exists()


# --- compare -----------------------------------------------------------------------------------------------------
def make_run(folder: Path, seed: int, accuracy: float, optimizer: dict, losses=(0.7, 0.5)) -> Path:
    folder.mkdir(parents=True)
    info = {"task_name": "sst2", "model": "models/minilm@sha256:53aa51172d142c89", "seed": seed, "max_train_samples": 4000,
            "max_seq_length": 64, "optimizer": optimizer}
    (folder / "run_info.json").write_text(json.dumps(info))
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": accuracy, "eval_loss": 0.4,
                                                         "eval_runtime": 3.0, "train_loss": 0.5}))
    history = [{"loss": loss, "step": 10 * (i + 1)} for i, loss in enumerate(losses)]
    history.append({"eval_accuracy": accuracy, "step": 20})
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return folder


MFAC_RECORD = {"optim": "MFAC", "optim_args": {"lr": 1e-4, "weight_decay": 0.0, "num_grads": 64, "damp": 1e-6}}
ADAM_RECORD = {"optim": "adamw_torch", "optim_args": None, "learning_rate": 1e-4, "weight_decay": 0.0,
               "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


@pytest.fixture
def hand_made_runs(tmp_path):
    # Folder names deliberately say nothing true: grouping must come from what each run recorded.
    runs = [make_run(tmp_path / "a", 1, 0.80, MFAC_RECORD, (0.7, 0.5)),
            make_run(tmp_path / "b", 2, 0.82, MFAC_RECORD, (0.6, 0.4)),
            make_run(tmp_path / "c", 3, 0.87, MFAC_RECORD, (0.8, 0.3)),
            make_run(tmp_path / "mfac-seed1", 1, 0.85, ADAM_RECORD),
            make_run(tmp_path / "mfac-seed2", 2, 0.86, ADAM_RECORD),
            make_run(tmp_path / "d", 1, 0.50, {**MFAC_RECORD, "optim_args": {**MFAC_RECORD["optim_args"], "num_grads": 8}})]
    return runs


def test_compare_groups_by_recorded_settings_with_sample_std(hand_made_runs, capsys):
    assert compare.main([str(path) for path in hand_made_runs] + ["--markdown"]) == 0
    out = capsys.readouterr().out
    # Labels name only what differs: the optimizer, and num_grads among the M-FAC groups.
    # MFAC m=64: mean 0.83, sample std √((0.03² + 0.01² + 0.04²)/2) = √0.0013 = 0.036056; best 0.87 at seed 3.
    assert "| accuracy | MFAC num_grads=64 | 83.00 ± 3.61 | 3 | 87.00 (3) |" in out
    # Adam: mean 0.855, std √(2·0.005²) = 0.0070711.
    assert "| accuracy | adamw_torch | 85.50 ± 0.71 | 2 | 86.00 (2) |" in out
    assert "| accuracy | MFAC num_grads=8 | 50.00 | 1 | 50.00 (1) |" in out
    assert ("**sst2** (all runs: models/minilm@53aa5117, max_train_samples=4000, max_seq_length=64, lr=0.0001, "
            "weight_decay=0; MFAC: damp=1e-06; adamw_torch: adam_beta1=0.9 adam_beta2=0.999 adam_epsilon=1e-08; "
            "reference: MFAC num_grads=64)") in out
    assert ("| accuracy | MFAC num_grads=64 | 83.00 ± 3.61 | 3 | 87.00 (3) | reference |  |  |  |  |  |  |  | - | - | - | - | "
            "- | - |") in out
    assert "| accuracy | MFAC num_grads=8 | 50.00 | 1 | 50.00 (1) | n/a (needs 2+ runs in each group) |" in out


def test_runs_of_one_setting_made_by_other_code_form_one_group(hand_made_runs):
    for run, code in zip(hand_made_runs[:3], ("a" * 40, "b" * 40 + "+changes", "mfac-optim 0.2.0")):
        info = json.loads((run / "run_info.json").read_text())
        (run / "run_info.json").write_text(json.dumps({**info, "code": code}))
    grouped = compare.group_runs([compare.load_run(path) for path in hand_made_runs])
    assert [len(runs) for runs in grouped["sst2"].groups.values()] == [3, 2, 1]


def test_compare_adds_the_seeds_table_to_a_model_card(hand_made_runs, capsys):
    best = hand_made_runs[2]
    (best / "README.md").write_text("---\nlibrary_name: transformers\n---\n# best\n\n## Optimizer: M-FAC\n")
    argv = [str(path) for path in hand_made_runs] + ["--model_card", str(best)]
    for _ in range(2):  # a second call replaces the section instead of adding another
        assert compare.main(argv) == 0
    card = (best / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n---\n# best\n\n## Optimizer: M-FAC\n")
    assert card.count("## Results over seeds") == 1
    assert "| accuracy | MFAC num_grads=64 | 83.00 ± 3.61 | 3 | 87.00 (3) |" in card
    assert "| accuracy | adamw_torch | 85.50 ± 0.71 | 2 | 86.00 (2) |" in card
    with pytest.raises(SystemExit):
        compare.main([str(hand_made_runs[0]), "--model_card", str(hand_made_runs[1])])
    assert "no model card (README.md) in it; run_glue.py writes one" in capsys.readouterr().err


def write_group(folder: Path, accuracies: list[float], optimizer: dict) -> list[Path]:
    return [make_run(folder / f"seed{seed}", seed, accuracy, optimizer) for seed, accuracy in enumerate(accuracies)]


def t4_two_sided(t: float) -> float:
    """P(|T| > |t|) for Student's t with 4 degrees of freedom, in closed form: 1 − (3x/2)(1 − x²/3), x = |t|/√(4+t²)."""
    x = abs(t) / (4 + t * t) ** 0.5
    return 1 - 1.5 * x * (1 - x * x / 3)


def test_welch_mann_whitney_and_tost_by_hand():
    # a = 1, 2, 3 and b = 4, 5, 6: difference −3, each variance 1, standard error √(1/3 + 1/3) = 0.8164966, and
    # Welch's degrees of freedom (2/3)² / ((1/3)²/2 + (1/3)²/2) = 4. t(0.975, 4) = 2.7764451 (t table).
    difference = compare.compare_groups([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], margin=1.0)
    half_width = 2.7764451 * 0.8164966
    assert (difference.delta, difference.low, difference.high) == pytest.approx((-3, -3 - half_width, -3 + half_width))
    assert difference.p_welch == pytest.approx(t4_two_sided(-3 / 0.8164966), rel=1e-6)
    # Mann–Whitney, exact: U = 0, the most extreme of C(6, 3) = 20 equally likely splits, on either side: p = 2/20.
    assert difference.p_mann_whitney == pytest.approx(0.1)
    # TOST within ±1: the larger one-sided p, H0 Δ ≤ −1 at t = (−3 + 1)/0.8164966 = −2.4494897: P(T > t).
    assert difference.p_tost == pytest.approx(1 - t4_two_sided(2.4494897) / 2, rel=1e-6)
    assert compare.verdict(difference) == "inconclusive"  # Mann–Whitney cannot reach 0.05 with three runs a side
    # Two close groups: Δ = 0, the same standard error; within ±3 both one-sided tests sit at t = ±3.6742346.
    close = compare.compare_groups([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], margin=3.0)
    assert close.p_tost == pytest.approx(t4_two_sided(3 / 0.8164966) / 2, rel=1e-6)
    assert compare.verdict(close) == "equivalent within ±300"
    assert compare.compare_groups([1.0], [2.0, 3.0], margin=1.0) is None
    constant = compare.compare_groups([2.0, 2.0], [1.0, 1.0], margin=0.5)
    assert (constant.low, constant.high, constant.p_welch, constant.p_tost) == (1.0, 1.0, 0.0, 1.0)


def test_paired_t_wilcoxon_and_tost_by_hand():
    # Per-seed differences 0.01, 0.02, 0.01, 0.02, −0.01 (as floats they differ in their last bits): mean 0.01,
    # deviations 0, 0.01, 0, 0.01, −0.02, so sd = √(0.0006/4) = 0.0122474 and the standard error 0.0122474/√5 =
    # 0.0054772; t = 1.8257419 on 4 degrees of freedom.
    a, b = [0.80, 0.82, 0.81, 0.83, 0.79], [0.79, 0.80, 0.80, 0.81, 0.80]
    difference = paired.paired_difference(a, b, margin=0.02)
    error = 0.0054772256
    assert difference.pairs == 5 and difference.sd == pytest.approx(0.0122474487)
    assert (difference.delta, difference.low, difference.high) == pytest.approx(
        (0.01, 0.01 - 2.7764451 * error, 0.01 + 2.7764451 * error))
    assert difference.p_t == pytest.approx(t4_two_sided(1.8257419), rel=1e-6)
    # Wilcoxon: |d| ranks with ties 2, 4.5, 2, 4.5, 2 (0.01 thrice on ranks 1-3, 0.02 twice on 4-5); W+ = 13 of
    # 15, 5.5 from the centre 7.5. Of the 32 sign patterns, W+ ≥ 13 leaves out at most one 2 (4 patterns), and
    # W+ ≤ 2 mirrors it: p = 8/32.
    assert difference.p_wilcoxon == pytest.approx(0.25)
    # Five positive differences: the most extreme of 32 patterns on either side, p = 2/32, the smallest 5 seeds give.
    assert paired.wilcoxon_signed_rank([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(0.0625)
    # TOST within ±0.02: the larger one-sided p is H0 Δ ≥ 0.02 at t = (0.01 − 0.02)/0.0054772 = −1.8257419.
    assert difference.p_tost == pytest.approx(t4_two_sided(1.8257419) / 2, rel=1e-6)
    assert compare.verdict(difference) == "inconclusive"
    assert paired.paired_difference([1.0], [2.0], margin=1.0) is None


def test_power_and_seeds_needed_match_the_published_tables():
    # Cohen (1988) and G*Power: a two-sided t test at α 0.05 and 80% power needs 34 pairs for dz = 0.5 (power then
    # 0.8077), 15 for dz = 0.8, 10 for dz = 1; two independent groups need 64 each for d = 0.5 and 26 for d = 0.8.
    assert [paired.seeds_needed(effect, 1.0) for effect in (0.5, 0.8, 1.0)] == [34, 15, 10]
    assert paired.t_test_power(34, 0.5, 1.0) == pytest.approx(0.8077, abs=5e-4)
    assert [paired.seeds_needed(effect, 1.0, paired=False) for effect in (0.5, 0.8)] == [64, 26]
    # Only the ratio of the effect to σ matters: 0.5 points against σ 1 point is dz = 0.5.
    assert paired.seeds_needed(0.005, 0.01) == 34
    # No true difference: the test rejects at its level; a huge one at few seeds: surely.
    assert paired.t_test_power(5, 0.0, 1.0) == pytest.approx(0.05, abs=1e-6)
    assert paired.t_test_power(3, 10.0, 0.1) == pytest.approx(1.0)


def test_obrien_fleming_levels_spend_alpha_as_lan_demets_say():
    # First look at half the seeds: the spending function 2 − 2Φ(1.959964/√0.5) = 2 − 2Φ(2.7718076).
    first, last = paired.sequential_levels([5, 10])
    assert first == pytest.approx(2 * scipy_stats.norm.sf(1.959964 / 0.5 ** 0.5), rel=1e-5)
    assert first == pytest.approx(0.0055746, rel=1e-4)
    # The whole design rejects 5% of the time under H0: simulated with the looks' statistics on one seed path.
    rng = np.random.default_rng(0)
    half = rng.standard_normal((400_000, 2))
    z1, z2 = half[:, 0], (half[:, 0] + half[:, 1]) / 2 ** 0.5
    bounds = [scipy_stats.norm.isf(level / 2) for level in (first, last)]
    rejected = (np.abs(z1) >= bounds[0]) | (np.abs(z2) >= bounds[1])
    assert rejected.mean() == pytest.approx(0.05, abs=0.0012)
    assert last < 0.05 and last == pytest.approx(0.04778, abs=2e-4)


def test_sequential_rule_separates_stops_for_equivalence_or_asks_for_more_seeds():
    rule = paired.SequentialRule((5, 10))
    first, last = rule.levels()

    def at(pairs: int, p_t: float, p_tost: float) -> str:
        return rule.verdict(paired.PairedDifference(0.0, 0.0, 0.0, p_t, 1.0, p_tost, 0.005, pairs, 0.01))

    assert at(5, first / 2, 1.0) == f"separates (look 1, p ≤ {first:.3g})"
    assert at(5, 0.01, 1.0) == "5 more seeds in both groups (look 1)"  # 0.01 is not enough at the first look
    assert at(5, 0.9, first / 2) == f"equivalent within ±0.5 (look 1, p ≤ {first:.3g})"
    assert at(10, 0.04, 1.0) == f"separates (look 2, p ≤ {last:.3g})"
    assert at(10, 0.2, 0.2) == f"inconclusive (last look, p > {last:.3g})"
    assert at(7, 0.0, 1.0).startswith("between looks (7 pairs")


def test_compare_pairs_groups_that_share_seeds(tmp_path, capsys):
    # Seeds move both groups alike: apart, the 1-point gain drowns in the seeds' spread; paired, it is plain.
    adam_scores = [0.80, 0.84, 0.78, 0.82, 0.86]
    gains = [0.010, 0.012, 0.009, 0.011, 0.010]
    adam = write_group(tmp_path / "adam", adam_scores, ADAM_RECORD)
    mfac = write_group(tmp_path / "mfac", [a + g for a, g in zip(adam_scores, gains)], MFAC_RECORD)
    runs = [str(path) for path in adam + mfac] + ["--reference", str(tmp_path / "adam"), "--markdown"]
    rows = {}
    for flags in ([], ["--unpaired"], ["--sequential", "5", "10", "--margin", "0.5"]):
        assert compare.main(runs + flags) == 0
        out = capsys.readouterr().out
        rows[" ".join(flags)] = next(cells for line in out.splitlines() if line.startswith("|")
                                     and (cells := [cell.strip() for cell in line.split("|")])[2] == "MFAC")
    paired_row, unpaired_row, sequential_row = rows.values()
    assert "[paired t 95% CI]" in out and "p Wilcoxon (Holm)" in out
    # Paired: the differences' mean 1.04 points, sd 0.114: t = 20.4 on 4 degrees of freedom.
    assert paired_row[6].startswith("+1.04 [") and paired_row[11] == "separates"
    assert float(paired_row[8]) == pytest.approx(t4_two_sided(0.0104 / (0.0011401754 / 5 ** 0.5)), rel=0.02)  # 2 digits
    assert unpaired_row[11] == "inconclusive"
    first_level = paired.sequential_levels([5, 10])[0]
    assert sequential_row[11] == f"separates (look 1, p ≤ {first_level:.3g})"
    # Power at the differences' σ: 0.5 and 1 point against σ 0.114 points, at α 0.05 (one comparison).
    sd = 0.0011401754
    assert paired_row[12] == " / ".join(f"{paired.t_test_power(5, effect, sd):.2f}" for effect in (0.005, 0.01))
    assert paired_row[13] == f"{paired.seeds_needed(0.005, sd)} / {paired.seeds_needed(0.01, sd)}"
    with pytest.raises(SystemExit) as exit_info:
        compare.main(runs + ["--sequential", "10", "5"])
    assert exit_info.value.code == 2 and "--sequential: growing numbers of seeds" in capsys.readouterr().err


def test_equal_wall_clock_reads_each_group_at_the_others_training_seconds(tmp_path):
    # Each run: evaluations at (training seconds, accuracy), then the end of training at the last seconds given.
    curves = {"adam": [((10.0, 0.70), (20.0, 0.80)), ((12.0, 0.72), (24.0, 0.82))],
              "mfac": [((25.0, 0.60), (50.0, 0.75), (75.0, 0.90)), ((27.0, 0.62), (54.0, 0.77), (81.0, 0.92))]}
    groups = {}
    for label, runs in curves.items():
        groups[label] = []
        for seed, curve in enumerate(runs):
            run = make_run(tmp_path / label / f"seed{seed}", seed, curve[-1][1], MFAC_RECORD)
            history = [{"eval_accuracy": score, "step": 50 * (index + 1), "train_seconds": seconds}
                       for index, (seconds, score) in enumerate(curve)]
            history.append({"train_runtime": curve[-1][0] + 5.0, "train_seconds": curve[-1][0], "step": 500})
            (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
            groups[label].append(compare.load_run(run))
    rows = {row.label: row for row in compare.table_rows(groups, "adam", 0.01, 0)}
    # Adam trains 22 s on average: by then M-FAC has evaluated once in neither run (25 s, 27 s).
    assert rows["mfac"].at_reference_seconds is None
    # M-FAC trains 78 s: each Adam run has long finished, at its final score (0.80, 0.82).
    assert rows["mfac"].reference_at_own_seconds == pytest.approx(0.81)
    # On the mean clock M-FAC evaluates at 26, 52 and 78 s: at 52 s its mean is the second evaluation's.
    assert compare.score_at_seconds(groups["mfac"], "eval_accuracy", 52.0) == pytest.approx((0.75 + 0.77) / 2)
    assert compare.score_at_seconds(groups["mfac"], "eval_accuracy", 51.0) == pytest.approx((0.60 + 0.62) / 2)
    assert (rows["adam"].at_reference_seconds, rows["adam"].reference_at_own_seconds) == (None, None)


def test_holm_adjustment_by_hand():
    # Sorted 0.01, 0.03, 0.04 are multiplied by 3, 2, 1: 0.03, 0.06, 0.04, then kept monotone: 0.03, 0.06, 0.06.
    assert compare.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert compare.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_compare_says_which_groups_separate_after_holm(tmp_path, capsys):
    adam = write_group(tmp_path / "adam", [0.80, 0.81, 0.82, 0.81, 0.80], ADAM_RECORD)
    clearly_better = write_group(tmp_path / "better", [0.90, 0.91, 0.89, 0.90, 0.92], MFAC_RECORD)
    same = write_group(tmp_path / "same", [0.79, 0.83, 0.81, 0.80, 0.82], {
        **MFAC_RECORD, "optim_args": {**MFAC_RECORD["optim_args"], "num_grads": 8}})
    runs = [str(path) for path in clearly_better + same + adam]
    assert compare.main(runs + ["--reference", str(tmp_path / "adam"), "--markdown", "--unpaired"]) == 0
    rows = {cells[2]: cells[6:12] for line in capsys.readouterr().out.splitlines()
            if (cells := [cell.strip() for cell in line.split("|")])[1:2] == ["accuracy"]}
    assert rows["adamw_torch"] == ["reference", "", "", "", "", ""]
    # 90.40 − 80.80. The groups do not overlap: exact Mann–Whitney p = 2/252, × 2 comparisons after Holm.
    better = rows["MFAC num_grads=64"]
    assert better[0].startswith("+9.60 [") and better[5] == "separates" and better[1] == "-"  # no predictions kept
    assert float(better[3]) == pytest.approx(2 * 2 / 252, rel=0.01) and float(better[2]) < 1e-3
    assert rows["MFAC num_grads=8"][0].startswith("+0.20 [-") and rows["MFAC num_grads=8"][5] == "inconclusive"
    with pytest.raises(SystemExit) as exit_info:
        compare.main(runs + ["--reference", str(tmp_path / "elsewhere")])
    assert exit_info.value.code == 2
    assert "--reference" in capsys.readouterr().err


def test_summary_is_one_line_per_group_with_the_full_tables_numbers(tmp_path, capsys):
    adam = write_group(tmp_path / "adam", [0.80, 0.81, 0.82, 0.81, 0.80], ADAM_RECORD)
    better = write_group(tmp_path / "better", [0.90, 0.91, 0.89, 0.90, 0.92], MFAC_RECORD)
    runs = [str(path) for path in adam + better] + ["--reference", str(tmp_path / "adam"), "--markdown"]
    assert compare.main(runs) == 0
    full = {cells[2]: cells for line in capsys.readouterr().out.splitlines()
            if (cells := [cell.strip() for cell in line.split("|")])[1:2] == ["accuracy"]}
    assert compare.main(runs + ["--summary"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| group | n | accuracy ×100 | Δ accuracy [95% CI] | train s | optimizer GiB |"
    summary = {cells[1]: cells[2:-1] for line in lines[4:] if (cells := [cell.strip() for cell in line.split("|")])}
    # In points: Adam's mean 80.8, sample std √((0.64 + 0.04 + 1.44 + 0.04 + 0.64)/4) = 0.84;
    # M-FAC's mean 90.4, std √(5.2/4) = 1.14.
    assert summary["adamw_torch"] == ["5", "80.80 ± 0.84", "reference", "-", "-"]
    assert summary["MFAC"] == ["5", "90.40 ± 1.14", f"{full['MFAC'][6]}, separates", "-", "-"]
    assert full["MFAC"][6].startswith("+9.60 [")

def test_bootstrap_over_seeds_and_examples_matches_the_binomial_spread(tmp_path):
    # 400 dev examples. Every seed of group A answers all of them right; every seed of group B is wrong on the
    # same 200. Resampling seeds changes nothing; resampling examples makes A − B the share of resampled examples
    # among B's wrong ones: binomial, 0.5 ± 1.96 · √(0.25 / 400) = 0.5 ± 0.049.
    labels = np.array([index % 2 for index in range(400)])
    wrong = np.where(np.arange(400) < 200, 1 - labels, labels)
    groups = {}
    for name, predictions, optimizer in (("a", labels, MFAC_RECORD), ("b", wrong, ADAM_RECORD)):
        groups[name] = []
        for seed in range(3):
            run = make_run(tmp_path / name / f"seed{seed}", seed, float((predictions == labels).mean()), optimizer)
            rows = "".join(f"{index}\t{prediction}\t{label}\n"
                           for index, (prediction, label) in enumerate(zip(predictions, labels)))
            (run / "eval_predictions_sst2.tsv").write_text("index\tprediction\tlabel\n" + rows)
            groups[name].append(compare.load_run(run))
    low, high = compare.bootstrap_intervals(groups["a"], groups["b"], ["accuracy"], resamples=2000)["accuracy"]
    assert low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006) and high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_runs_record_a_model_folder_by_name_and_weights_hash_never_its_path(tmp_path, capsys):
    model = tmp_path / "models" / "minilm"
    model.mkdir(parents=True)
    weights = b"not really weights"
    (model / "model.safetensors").write_bytes(weights)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(model, tmp_path / "link-to-minilm")
    digest = hashlib.sha256(weights).hexdigest()[:16]
    for spelling in (str(tmp_path / "elsewhere" / ".." / "models" / "minilm"), str(tmp_path / "link-to-minilm"),
                     os.path.relpath(model)):
        assert glue_records.model_source_record(spelling) == f"models/minilm@sha256:{digest}"
    assert glue_records.model_source_record("prajjwal1/bert-mini") == "prajjwal1/bert-mini"
    (tmp_path / "bare").mkdir()
    assert glue_records.model_source_record(str(tmp_path / "bare")) == f"{tmp_path.name}/bare"
    # compare.py groups by the record and names the model with its hash shortened.
    for seed, model_record in enumerate([f"models/minilm@sha256:{digest}", "models/minilm@sha256:0123456789abcdef"]):
        run = make_run(tmp_path / "runs" / f"seed{seed}", seed, 0.8, MFAC_RECORD)
        info = json.loads((run / "run_info.json").read_text())
        (run / "run_info.json").write_text(json.dumps({**info, "model": model_record}))
    assert compare.main([str(path) for path in sorted((tmp_path / "runs").iterdir())]) == 0
    out = capsys.readouterr().out
    assert f"models/minilm@{digest[:8]} " in out and "models/minilm@01234567 " in out and "sha256" not in out


def test_time_to_result_series_and_plot(tmp_path):
    runs = []
    for seed, (clock, score) in enumerate((((10.0, 20.0), (0.6, 0.8)), ((12.0, 24.0), (0.7, 0.9)))):
        run = make_run(tmp_path / f"seed{seed}", seed, score[-1], MFAC_RECORD)
        history = [{"eval_accuracy": value, "step": 50 * (index + 1), "train_seconds": seconds}
                   for index, (seconds, value) in enumerate(zip(clock, score))]
        history.append({"train_runtime": clock[-1] + 9.0, "train_seconds": clock[-1] + 1.0, "step": 100})
        (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        runs.append(compare.load_run(run))
        # The table's training time is the clock's last reading, the evaluations' time left out.
        assert runs[-1].train_seconds == clock[-1] + 1.0
    seconds, means, stds = compare.time_series(runs, "eval_accuracy")
    assert seconds == pytest.approx([11.0, 22.0]) and means == pytest.approx([0.65, 0.85])
    assert stds == pytest.approx([0.1 / 2 ** 0.5] * 2)
    plot = tmp_path / "time.png"
    assert compare.main([str(run.path) for run in runs] + ["--time_plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_that_shared_the_cpu_are_left_out_of_the_times_not_the_scores(tmp_path, capsys):
    # Three seeds: the second shared the cores (load 3.4 at its second evaluation); the third recorded no load.
    # Each scores 0.1 below its final score at its first evaluation.
    runs = []
    for seed, (clock, loads, score) in enumerate((((10.0, 20.0), (1.9, 2.1), 0.8), ((30.0, 60.0), (2.0, 3.4), 0.95),
                                                  ((14.0, 28.0), None, 0.7))):
        run = make_run(tmp_path / f"seed{seed}", seed, score, MFAC_RECORD)
        history = [{"eval_accuracy": score - 0.1 * (index == 0), "step": 50 * (index + 1), "train_seconds": seconds,
                    **({"load_average": loads[index]} if loads else {})} for index, seconds in enumerate(clock)]
        history.append({"train_runtime": clock[-1] + 5.0, "train_seconds": clock[-1], "step": 100})
        (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        runs.append(compare.load_run(run))
    assert [run.had_the_cpu(2.5) for run in runs] == [True, False, False]
    assert all(run.had_the_cpu(None) for run in runs)
    # The curve's scores are every seed's, its seconds the one run's that had the cores.
    seconds, means, _ = compare.time_series(runs, "eval_accuracy", 2.5)
    assert seconds == pytest.approx([10.0, 20.0]) and means == pytest.approx([2.15 / 3, 2.45 / 3])
    rows = compare.table_rows({"all": runs}, "all", 0.01, 0, max_load=2.5)
    assert rows[0].summary.mean == pytest.approx(2.45 / 3) and rows[0].train_seconds == pytest.approx(20.0)
    # So the reference reaches its own final mean (0.817, above the timed run's 0.8) at its end.
    assert rows[0].seconds_to_reference == pytest.approx(20.0)
    assert compare.score_at_seconds(runs, "eval_accuracy", 15.0, 2.5) == pytest.approx(2.15 / 3)
    assert compare.score_at_seconds(runs, "eval_accuracy", 9.0, 2.5) is None
    assert compare.train_seconds_cell(rows[0]) == "20 (1 of 3 runs)"
    everyone = compare.table_rows({"all": runs}, "all", 0.01, 0)[0]
    assert everyone.train_seconds == pytest.approx((20.0 + 60.0 + 28.0) / 3)
    assert compare.train_seconds_cell(everyone) == "36"
    plot = tmp_path / "time.png"
    assert compare.main([str(run.path) for run in runs] + ["--max_load", "2.5", "--time_plot", str(plot)]) == 0
    assert "20 (1 of 3 runs)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(runs[0].path), "--max_load", "0"])
    assert exit_info.value.code == 2 and "--max_load must be > 0 (got 0)" in capsys.readouterr().err


def test_time_to_the_references_score_is_the_first_evaluation_where_a_groups_mean_reaches_it(tmp_path):
    # Each run: (training seconds, accuracy) at steps 50 and 100. The reference ends at a mean of 0.8, which its
    # own mean curve (0.65, 0.8 at 11 s, 22 s) reaches at its end; "fast" has a mean of 0.8 already at its first
    # evaluation (32 s); "slow" never gets there; a group without training clocks has no time.
    curves = {"reference": [((10.0, 0.6), (20.0, 0.8)), ((12.0, 0.7), (24.0, 0.8))],
              "fast": [((30.0, 0.85), (60.0, 0.9)), ((34.0, 0.75), (68.0, 0.9))],
              "slow": [((5.0, 0.5), (10.0, 0.7)), ((7.0, 0.5), (14.0, 0.7))],
              "unclocked": [((None, 0.9), (None, 0.9)), ((None, 0.9), (None, 0.9))]}
    groups = {}
    for label, runs in curves.items():
        groups[label] = []
        for seed, curve in enumerate(runs):
            run = make_run(tmp_path / label / f"seed{seed}", seed, curve[-1][1], MFAC_RECORD)
            history = [{"eval_accuracy": score, "step": 50 * (index + 1),
                        **({"train_seconds": seconds} if seconds is not None else {})}
                       for index, (seconds, score) in enumerate(curve)]
            (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
            groups[label].append(compare.load_run(run))
    rows = {row.label: row for row in compare.table_rows(groups, "reference", 0.01, 0)}
    assert rows["reference"].seconds_to_reference == pytest.approx(22.0)
    assert rows["fast"].seconds_to_reference == pytest.approx(32.0)
    assert rows["slow"].seconds_to_reference == math.inf
    assert rows["unclocked"].seconds_to_reference is None
    assert [compare.seconds_to_reference_cell(rows[label]) for label in curves] == ["22", "32", "not reached", "-"]


def test_compare_plot_and_loss_series(hand_made_runs, tmp_path):
    runs = [compare.load_run(path) for path in hand_made_runs[:3]]
    steps, means, stds = compare.series(runs, "loss")
    assert steps == [10, 20]
    assert means == pytest.approx([0.7, 0.4]) and stds == pytest.approx([0.1, 0.1])
    plot = tmp_path / "plot.png"
    assert compare.main([str(path) for path in hand_made_runs] + ["--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_compare_refuses_one_seed_of_one_setting_twice(hand_made_runs, tmp_path, capsys):
    copy = tmp_path / "kept" / "a"
    shutil.copytree(hand_made_runs[0], copy)
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(path) for path in hand_made_runs] + [str(copy)])
    assert exit_info.value.code == 2
    assert f"{hand_made_runs[0]} and {copy} are runs of the same setting at seed 1; give one of them" in \
        capsys.readouterr().err


def test_compare_rejects_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run_info.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(tmp_path / "half")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'half'} is not a finished run_glue.py run (no all_results.json)" in capsys.readouterr().err


def test_bench_compare_all_times_every_optimizer_and_counts_the_window(tiny_bert, glue_dir, capsys):
    bench_mfac.main(["--model_config", str(tiny_bert), "--train_file", str(glue_dir / "SST-2" / "train.tsv"),
                     "--num_grads", "4", "--steps", "2", "--batch_size", "8", "--compare_all", "--device", "cpu"])
    table = capsys.readouterr().out
    names = ["AdamW", "MFAC dense bf16, m=4", "MFAC dense fp32, m=4", "MFAC compressed 0.01 bf16, m=4"]
    assert all(any(line.startswith(name) for line in table.splitlines()) for name in names), table
    assert "device-to-device copy" in table
    phases = table[table.index("where an M-FAC step goes"):].splitlines()
    assert all(any(line.startswith(name) for line in phases) for name in names[1:]), table

    params = [torch.zeros(30, 20, requires_grad=True), torch.zeros(7, requires_grad=True)]
    optimizer = MFAC(params, num_grads=4, grad_dtype="bfloat16")
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert optimizer.window_bytes() == 4 * 607 * 2  # m × d bf16 values: what each pass reads, as the bench counts


def test_bench_reads_each_steps_phases_from_the_profiler():
    """Every phase the optimizer marks is found once per step for a window with a dense and a row-sparse part, and
    none runs inside another: a nested phase would count twice, and the rest of the step ("other") would come out
    negative."""
    torch.manual_seed(0)
    embedding, linear = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)
    optimizer = MFAC([*embedding.parameters(), *linear.parameters()], num_grads=4)
    with bench_mfac.ProfiledPhases(torch.device("cpu")) as profiled:
        for step in range(5):
            optimizer.zero_grad()
            linear(embedding(torch.tensor([step, step + 7]))).square().sum().backward()
            optimizer.step()
    steps = profiled.steps()
    assert len(steps) == 5 and "row_indices" in optimizer.state[embedding.weight]
    for step in steps:
        assert all(step[phase] > 0 for phase in bench_mfac.PHASES), step
        assert step["other"] >= 0, step
    assert profiled.medians(skip=0)["step"] == sorted(step["step"] for step in steps)[2]


def test_bench_takes_the_authors_code_with_a_model_only_in_the_comparison_of_all(tiny_bert, glue_dir, tmp_path,
                                                                                  capsys):
    (tmp_path / "optim.py").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench_mfac.parse_args(["--model_config", str(tiny_bert), "--train_file", str(glue_dir / "SST-2" / "train.tsv"),
                               "--authors_optim", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2 and "only with --compare_all" in capsys.readouterr().err


def test_the_authors_lu_on_the_cpu_is_the_lu_without_pivoting(monkeypatch):
    """Their code asks torch.lu for the LU of a symmetric positive definite matrix, without pivoting (CUDA only);
    the stand-in's packed factors multiply back to the matrix, L with a unit diagonal and U upper triangular."""
    monkeypatch.setattr(torch, "lu", None, raising=False)
    monkeypatch.setattr(torch.nn.parallel, "parallel_apply", None)
    bench_mfac.on_the_cpu()
    rows = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    matrix = rows @ rows.T + 6 * torch.eye(6, dtype=torch.float64)
    packed, pivots = torch.lu(matrix, pivot=False)
    lower, upper = packed.tril(-1) + torch.eye(6, dtype=torch.float64), packed.triu()
    assert pivots is None
    torch.testing.assert_close(lower @ upper, matrix, rtol=1e-13, atol=1e-13)
    # U's first row is the matrix's (no pivoting: Gaussian elimination leaves it as it is).
    torch.testing.assert_close(upper[0], matrix[0], rtol=1e-14, atol=0)
    assert torch.nn.parallel.parallel_apply([lambda x: x + 1], [2]) == [3]


def test_controls_majority_class_and_zero_shot_cosine_by_hand(tmp_path, tiny_bert, capsys):
    from transformers import AutoModel, AutoTokenizer

    rte = tmp_path / "RTE"
    rte.mkdir()
    (rte / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{i}\ta\tb\t{'entailment' if i < 2 else 'not_entailment'}\n" for i in range(5)))
    # Dev: 1 entailment (label 0), 3 not_entailment (label 1); the training majority is not_entailment: 3/4.
    (rte / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{i}\ta\tb\t{label}\n" for i, label in enumerate(["entailment"] + ["not_entailment"] * 3)))
    assert controls.main(["--task_name", "rte", "--train_file", str(rte / "train.tsv"), "--validation_file",
                          str(rte / "dev.tsv"), "--output", str(tmp_path / "rte.json")]) == 0
    assert json.loads((tmp_path / "rte.json").read_text())["controls"] == {"majority class": {"accuracy": 0.75}}

    # STS-B: cosine of mean-pooled states, batched with padding, against each sentence encoded alone.
    pairs = [("a good film", "a fine movie indeed"), ("the cat sat", "dogs bark loudly at night"),
             ("rain", "rain again today"), ("a long and winding road home", "short")]
    stsb = tmp_path / "dev.tsv"
    stsb.write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n" + "".join(
        f"{i}\tg\tf\ty\t{i}\ts\ts\t{first}\t{second}\t{score}\n"
        for i, ((first, second), score) in enumerate(zip(pairs, (4.0, 0.5, 3.0, 1.0)))))
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()

    def alone(sentence: str) -> torch.Tensor:
        with torch.no_grad():
            return model(**tokenizer(sentence, return_tensors="pt")).last_hidden_state[0].mean(0)

    cosines = [float(torch.nn.functional.cosine_similarity(alone(a), alone(b), dim=0)) for a, b in pairs]
    assert controls.zero_shot_similarity(str(tiny_bert), {"sentence1": [a for a, _ in pairs],
                                                          "sentence2": [b for _, b in pairs]}, 128) == \
        pytest.approx(cosines, abs=1e-5)
    capsys.readouterr()
    assert controls.main(["--task_name", "stsb", "--validation_file", str(stsb), "--model_name_or_path",
                          str(tiny_bert)]) == 0
    pearson = np.corrcoef(cosines, [4.0, 0.5, 3.0, 1.0])[0, 1]
    assert f"stsb zero-shot cosine: pearson {100 * pearson:.2f}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        controls.main(["--task_name", "stsb", "--validation_file", str(stsb)])
    assert exit_info.value.code == 2 and "--model_name_or_path: needed for stsb's control" in capsys.readouterr().err


def test_linear_probe_reads_frozen_encodings_and_learns_what_they_hold(tmp_path, tiny_bert, capsys):
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoTokenizer

    # Reviews whose words say their label: a probe on any encoding that tells the words apart gets dev right,
    # where the majority class gets half.
    rng = np.random.default_rng(0)
    words = {1: ["good", "great", "fine", "nice", "best"], 0: ["bad", "awful", "poor", "dull", "worst"]}

    def reviews(count: int) -> list[tuple[str, int]]:
        return [(" ".join(rng.choice(words[label], 3)), label) for label in rng.permutation([0, 1] * (count // 2))]

    sst2 = tmp_path / "SST-2"
    sst2.mkdir()
    for name, rows in (("train", reviews(80)), ("dev", reviews(20))):
        (sst2 / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    assert controls.main(["--task_name", "sst2", "--train_file", str(sst2 / "train.tsv"), "--validation_file",
                          str(sst2 / "dev.tsv"), "--model_name_or_path", str(tiny_bert)]) == 0
    out = capsys.readouterr().out
    assert "sst2 majority class: accuracy 50.00" in out and "sst2 linear probe on frozen encodings: accuracy 100.00" in out

    # A pair task: the probe's features are u, v, |u − v|, u·v of each sentence encoded alone, and its answers are
    # sklearn's on them.
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()

    def alone(sentence: str) -> np.ndarray:
        with torch.no_grad():
            return model(**tokenizer(sentence, return_tensors="pt")).last_hidden_state[0].mean(0).numpy()

    def pairs(count: int) -> dict[str, list]:
        first = [" ".join(rng.choice(words[1] + words[0], 2)) for _ in range(count)]
        second = [" ".join(rng.choice(words[1] + words[0], 4)) for _ in range(count)]
        return {"sentence1": first, "sentence2": second, "label": [int(len(a) > 8) for a in first]}

    train, dev = pairs(40), pairs(12)

    def features(examples: dict[str, list]) -> np.ndarray:
        rows = []
        for a, b in zip(examples["sentence1"], examples["sentence2"]):
            u, v = alone(a), alone(b)
            rows.append(np.concatenate([u, v, np.abs(u - v), u * v]))
        return np.array(rows)

    reference = features(train)
    mean, scale = reference.mean(0), reference.std(0)
    scale[scale == 0] = 1
    fitted = LogisticRegression(C=controls.PROBE_C, max_iter=controls.PROBE_ITERATIONS).fit(
        (reference - mean) / scale, train["label"])
    expected = fitted.predict((features(dev) - mean) / scale)
    assert list(controls.probe_answers(str(tiny_bert), train, dev, "rte", 128)) == list(expected)


def test_controls_are_rows_of_their_tasks_table_and_lines_of_its_time_plot(tmp_path, capsys):
    adam = write_group(tmp_path / "adam", [0.80, 0.81, 0.82, 0.81, 0.80], ADAM_RECORD)
    sst2 = tmp_path / "sst2.json"
    controls.write_controls(sst2, "sst2", {"majority class": {"accuracy": 0.5092}})
    rte = tmp_path / "rte.json"  # a task without runs here: nothing of it is shown
    controls.write_controls(rte, "rte", {"majority class": {"accuracy": 0.5271}})
    assert controls.read_controls(sst2) == ("sst2", {"majority class": {"accuracy": 0.5092}})
    runs = [str(path) for path in adam] + ["--markdown", "--controls", str(sst2), str(rte)]
    assert compare.main(runs + ["--bootstrap", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == ("| accuracy | control: majority class | 50.92 | - | - | no training |  |  |  |  |  |  |  | "
                         "- | - | - | - | - | - |")
    assert "52.71" not in "\n".join(lines)
    assert compare.main(runs + ["--summary", "--time_plot", str(tmp_path / "time.png")]) == 0
    out = capsys.readouterr().out
    assert "| control: majority class | - | 50.92 | no training | - | - |" in out
    assert (tmp_path / "time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text('{"task_name": "sst2"}')
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(adam[0]), "--controls", str(tmp_path / "bad.json")])
    assert exit_info.value.code == 2
    assert f"--controls {tmp_path / 'bad.json'} is not a file written by controls.py --output (KeyError" in \
        capsys.readouterr().err


def test_labels_read_a_warmup_ratio_as_a_share_of_the_steps():
    assert compare.describe("warmup_steps", 0.142486) == "warmup=14%"
    assert compare.describe("warmup_steps", 100) == "warmup_steps=100"


def test_upstream_diff_names_the_tag_commit_and_shows_the_fork_as_a_diff(tmp_path):
    """A stand-in clone of transformers whose tag holds run_glue.py with one line of HF's own: the script resolves
    the tag in run_glue.py's header to its commit and prints exactly that line's change."""
    ours = (ROOT / "run_glue.py").read_text()
    tag = re.search(r"^# Forks transformers (v[\d.]+):", ours, re.MULTILINE).group(1)
    upstream_file = tmp_path / "transformers" / "examples/pytorch/text-classification/run_glue.py"
    upstream_file.parent.mkdir(parents=True)
    upstream_file.write_text(ours.replace('check_min_version("5.0.0")', 'check_min_version("5.0.0.dev0")'))
    git = ["git", "-C", str(tmp_path / "transformers"), "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "release"], ["tag", tag]):
        subprocess.run(git + command, check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    result = subprocess.run(["bash", str(ROOT / "scripts/upstream_diff.sh"), str(tmp_path / "transformers")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    changed = [line for line in result.stdout.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert result.stdout.splitlines()[0] == f"transformers {tag} is commit {commit}"
    assert changed == ['-check_min_version("5.0.0.dev0")', '+check_min_version("5.0.0")']
