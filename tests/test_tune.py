"""scripts/tune.py and its parts: search space files, the carved validation split, a small study end to end (a
budget of full-run equivalents, resume, no dev set or evaluation seed during search, a config that sweep.py runs),
two workers sharing a study, successive halving over epochs and the report."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from mfac_glue import json_config

ROOT = Path(__file__).resolve().parent.parent
from mfac_glue.experiments import search_space, sweep, tune, tune_report, tune_trial  # noqa: E402
from mfac_glue.experiments.study_folder import StudyFolder  # noqa: E402
import postgres_server  # noqa: E402
from hub_cache import sst2_splits  # noqa: E402


# --- search space files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "search").glob("*.json")), ids=lambda path: path.stem)
def test_shipped_search_spaces_load(path):
    space = search_space.load_search_space(path)
    assert space.name == path.stem
    lr = space.sampled.get("lr", space.sampled.get("learning_rate"))[1]
    if space.grid:  # a small grid: at least 3 points, so that its best can lie inside
        assert len(lr.choices) >= 3 and all(a < b for a, b in zip(lr.choices, lr.choices[1:]))
        return
    assert lr.log and lr.low <= 1e-5 and lr.high >= 3e-3  # the study's range at least
    if space.optim == "MFAC":  # the window is fixed per memory class; lr and damp are searched
        assert set(space.sampled) == {"lr", "damp"} and space.sampled["damp"][1].log
        assert space.fixed["grad_dtype"] == ("optim_args", "bfloat16")
        assert (space.fixed["num_grads"][1], space.fixed.get("density", (None, 1.0))[1]) in ((512, 1.0), (1024, 0.01))
    else:  # warmup, weight decay and clipping are the protocol's, the same for every optimizer
        assert set(space.sampled) == {"learning_rate"}


BAD_SPACES = [
    ({"optim": "MFAC", "optim_args": {"lr": {"low": 1e-4, "high": 1e-2}}, "seed": 3},
     "unknown key(s) seed (allowed: optim, flags, optim_args, description, sampler)"),
    ({"optim": "MFAC", "optim_args": {"lr": {"low": 1e-4, "high": 1e-2}}, "sampler": "random"},
     "sampler: 'random' (allowed: tpe, grid)"),
    ({"optim": "MFAC", "optim_args": {"lr": {"low": 1e-4, "high": 1e-2}, "damp": {"choices": [1e-4]}},
      "sampler": "grid"}, "sampler \"grid\" needs choice lists, not ranges (lr)"),
    ({"optim": "sgd-ish", "flags": {"learning_rate": {"low": 1e-4, "high": 1e-2}}},
     "optim: 'sgd-ish' is not an optimizer"),
    ({"optim": "adamw_torch", "flags": {"lerning_rate": {"low": 1e-4, "high": 1e-2}}},
     "flags.lerning_rate: unknown run_glue.py flag"),
    ({"optim": "adamw_torch", "flags": {"train_file": "x.tsv", "learning_rate": {"low": 1e-4, "high": 1e-2}}},
     "flags.train_file: unknown run_glue.py flag (set by tune.py itself)"),
    ({"optim": "MFAC", "optim_args": {"num_grad": {"choices": [64, 128]}}}, "optim_args.num_grad: unknown MFAC key"),
    ({"optim": "adamw_torch", "optim_args": {"lr": {"low": 1e-4, "high": 1e-2}}},
     "optim_args: only for \"optim\": \"MFAC\""),
    ({"optim": "MFAC", "optim_args": {"lr": {"low": 1e-2, "high": 1e-4, "log": True}}},
     "optim_args.lr: needs numbers low < high (got low 0.01, high 0.0001)"),
    ({"optim": "MFAC", "optim_args": {"damp": {"low": 0, "high": 1e-2, "log": True}}},
     "optim_args.damp: a log range needs low > 0 (got 0)"),
    ({"optim": "MFAC", "optim_args": {"lr": {"low": 1e-4, "hi": 1e-2}}}, "optim_args.lr: a range has low and high"),
    ({"optim": "MFAC", "optim_args": {"num_grads": {"choices": []}}},
     "optim_args.num_grads: choices: must be a non-empty list"),
    ({"optim": "MFAC", "optim_args": {"num_grads": 64}}, "nothing to search"),
]


@pytest.mark.parametrize("spec, message", BAD_SPACES, ids=[message[:30] for _, message in BAD_SPACES])
def test_bad_search_space_is_one_error_line_and_exit_2(tmp_path, spec, message, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exit_info:
        tune.main([str(ROOT / "configs" / "bert-mini_sst2_adam.json"), "--space", str(space),
                   "--study_dir", str(tmp_path / "study")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(space) in err
    assert not (tmp_path / "study").exists()  # refused before anything was made


def test_space_sections_and_integer_ranges(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"optim": "MFAC", "flags": {"warmup_steps": {"low": 0.0, "high": 0.2}},
                                "optim_args": {"num_grads": {"low": 8, "high": 64, "log": True}, "damp": 1e-6}}))
    space = search_space.load_search_space(path)
    assert isinstance(space.sampled["num_grads"][1], optuna.distributions.IntDistribution)
    assert isinstance(space.sampled["warmup_steps"][1], optuna.distributions.FloatDistribution)
    assert space.arrange({"num_grads": 16, "warmup_steps": 0.1}) == {
        "flags": {"warmup_steps": 0.1}, "optim_args": {"damp": 1e-6, "num_grads": 16}}


def test_flags_round_trip_through_config_flags():
    flags = ["--do_train", "--seed", "5", "--optim_args", '{"lr": 0.001}', "--report_to", "none", "wandb",
             "--pad_to_max_length", "false", "--learning_rate", "1e-4", "--train_file", "a.tsv"]
    config = tune.flags_config(flags)
    assert config == {"do_train": True, "seed": 5, "optim_args": {"lr": 0.001}, "report_to": ["none", "wandb"],
                      "pad_to_max_length": False, "learning_rate": 1e-4, "train_file": "a.tsv"}
    assert tune.flags_config(json_config.config_flags(config)) == config


# --- the carved validation split ---------------------------------------------------------------------------------
def test_validation_split_is_stratified_seeded_and_disjoint(tmp_path):
    train = tmp_path / "train.tsv"
    # 300 positive, 100 negative sentences, each unique.
    train.write_text("sentence\tlabel\n" + "".join(f"sentence number {i}\t{int(i % 4 != 0)}\n" for i in range(400)))
    config = {"task_name": "sst2", "train_file": str(train)}
    folders = {name: StudyFolder(tmp_path / name) for name in "abc"}
    record = tune.carve_validation(config, 40, seed=3, study=folders["a"])
    digest = hashlib.sha256(train.read_bytes()).hexdigest()[:16]
    assert record == {"source": f"train.tsv@sha256:{digest}", "train": 360, "validation": 40, "stratified": True,
                      "seed": 3}
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()]
            for name, path in (("train", folders["a"].train_part), ("validation", folders["a"].validation_split))}
    assert sum(row["label"] for row in rows["validation"]) == 30  # 3 : 1, as in the file
    sentences = [{row["sentence"] for row in rows[name]} for name in ("train", "validation")]
    assert not sentences[0] & sentences[1] and len(sentences[0] | sentences[1]) == 400
    numbers = [int(row["sentence"].split()[-1]) for row in rows["train"]]
    assert numbers == sorted(numbers)  # file order kept: max_train_samples takes the file's first examples
    tune.carve_validation(config, 40, seed=3, study=folders["b"])
    assert folders["a"].validation_split.read_text() == folders["b"].validation_split.read_text()
    tune.carve_validation(config, 0.1, seed=4, study=folders["c"])
    assert folders["a"].validation_split.read_text() != folders["c"].validation_split.read_text()


# --- a small study end to end ------------------------------------------------------------------------------------
SMALL_SPACES = {
    "adamw": {"optim": "adamw_torch", "flags": {"learning_rate": {"low": 1e-4, "high": 1e-1, "log": True}}},
    "mfac": {"optim": "MFAC", "optim_args": {"lr": {"low": 1e-4, "high": 1e-1, "log": True},
                                             "damp": {"low": 1e-6, "high": 1e-2, "log": True},
                                             "num_grads": {"choices": [2, 4]}}},
}


@pytest.fixture
def small_study(tmp_path, tiny_bert, glue_dir):
    """A run_glue config on a tiny BERT, two small search spaces, and a dev file that no run could parse: a trial
    that read it would fail."""
    dev = tmp_path / "dev.tsv"
    dev.write_text("not\ta\tGLUE\tfile\n")
    config = tmp_path / "tiny_sst2.json"
    config.write_text(json.dumps({
        "model_name_or_path": str(tiny_bert), "task_name": "sst2", "max_train_samples": 64, "max_seq_length": 32,
        "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32, "num_train_epochs": 2, "seed": 1234,
        "report_to": "none", "disable_tqdm": True, "optim": "adamw_torch"}))
    spaces = {}
    for name, spec in SMALL_SPACES.items():
        spaces[name] = tmp_path / f"{name}.json"
        spaces[name].write_text(json.dumps(spec))
    return SimpleNamespace(config=config, spaces=spaces, dev=dev, study_dir=tmp_path / "study", tmp=tmp_path,
                           extra=["--", "--train_file", str(glue_dir / "SST-2" / "train.tsv"),
                                  "--validation_file", str(dev)])


def run_search(study, space: str, budget: float) -> None:
    assert tune.main([str(study.config), "--space", str(study.spaces[space]), "--study_dir", str(study.study_dir),
                      "--budget", str(budget), "--validation_size", "48", *study.extra]) == 0


def load(study, space: str) -> optuna.Study:
    return optuna.load_study(study_name=space, storage=f"sqlite:///{study.study_dir / 'study.db'}")


def finished(study: optuna.Study) -> list:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def spent(study: optuna.Study) -> float:
    return sum(tune_report.trial_cost(trial) for trial in finished(study))


@pytest.mark.slow
def test_small_study_spends_its_budget_resumes_never_reads_dev_and_writes_a_config_sweep_runs(
        small_study, glue_dir, capsys, monkeypatch):
    run_search(small_study, "adamw", budget=1.5)
    adamw = load(small_study, "adamw")
    # The study, resumed with another setting, is refused before any trial.
    with pytest.raises(SystemExit) as exit_info:
        tune.main([str(small_study.config), "--space", str(small_study.spaces["adamw"]), "--study_dir",
                   str(small_study.study_dir), "--budget", "1.5", "--validation_size", "48", "--metric", "loss",
                   *small_study.extra])
    assert exit_info.value.code == 2 and "study 'adamw' was made with another metric" in capsys.readouterr().err
    assert len(load(small_study, "adamw").trials) == len(adamw.trials)
    # Full runs cost 1 and trials pruned after epoch 1 of 2 cost 1/2; the search stops once 1.5 are spent.
    costs = [tune_report.trial_cost(trial) for trial in finished(adamw)]
    assert set(costs) <= {0.5, 1.0} and costs[0] == 1.0 and 1.5 <= sum(costs) < 1.5 + costs[-1]
    # Each trial records the cores its run kept busy (its children's CPU time over its wall time).
    assert all(0 < trial.user_attrs["cores_used"] <= os.cpu_count() + 0.5 for trial in finished(adamw))
    done_before = {trial.number: trial.datetime_complete for trial in finished(adamw)}
    for trial in finished(adamw):  # every trial ran at the selection seed, never an evaluation seed
        info = json.loads((small_study.study_dir / "trials" / "adamw" / str(trial.number) / "run_info.json")
                          .read_text())
        assert info["seed"] == tune.DEFAULT_TRIAL_SEED

    # A worker that died during a trial (killed, its machine lost) leaves it running, with a heartbeat that stops.
    dead = adamw.ask()
    search_space.load_search_space(small_study.spaces["adamw"]).suggest(dead)
    lost_params = dict(dead.params)
    adamw._storage.record_heartbeat(dead._trial_id)
    monkeypatch.setattr(tune, "GRACE_SECONDS", 1)
    time.sleep(2)
    run_search(small_study, "adamw", budget=2.5)
    adamw = load(small_study, "adamw")
    assert adamw.trials[dead.number].state == TrialState.FAIL
    retry = next(trial for trial in adamw.trials
                 if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial) == dead.number)
    assert retry.params == lost_params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert {number: trial.datetime_complete for number, trial in enumerate(adamw.trials)
            if number in done_before} == done_before  # finished trials are never repeated
    assert 2.5 <= spent(adamw) < 3.5

    # A search resumed in a new run draws new parameters: a seeded sampler started again would repeat trial 0's.
    run_search(small_study, "adamw", budget=3.5)
    *earlier, resumed = finished(load(small_study, "adamw"))
    assert all(resumed.params != trial.params for trial in earlier)

    run_search(small_study, "mfac", budget=3.5)
    mfac_trials = finished(load(small_study, "mfac"))
    assert spent(load(small_study, "mfac")) >= 3.5 and {trial.params["num_grads"] for trial in mfac_trials} <= {2, 4}

    # Every trial trained on the carved part and was scored on the 48 carved examples, never on the dev file.
    for trial_dir in (small_study.study_dir / "trials").glob("*/*"):
        results = trial_dir / "all_results.json"
        if results.is_file():
            assert json.loads(results.read_text())["eval_samples"] == 48
            assert json.loads(results.read_text())["train_samples"] == 64
    split = json.loads((small_study.study_dir / "data" / "split.json").read_text())
    assert split["validation"] == 48 and split["stratified"]

    # The best config: the best trial's values, the carved training part, the dev file, and no seed (the seed runs
    # give theirs); sweep.py runs it as it is.
    best_config = small_study.study_dir / "sst2_mfac_tuned.json"
    config = json.loads(best_config.read_text())
    best = load(small_study, "mfac").best_trial
    assert config["optim"] == "MFAC" and config["optim_args"] == best.params and "seed" not in config
    assert config["validation_file"] == str(small_study.dev)
    assert config["train_file"] == str(small_study.study_dir / "data" / "train.jsonl")
    shutil.copy(glue_dir / "SST-2" / "dev.tsv", small_study.dev)  # the seed runs read the dev set
    assert sweep.main([str(best_config), "--seeds", "7", "--output_root", str(small_study.tmp / "runs"),
                       "--", "--max_eval_samples", "40"]) == 0
    run = small_study.tmp / "runs" / "sst2_mfac_tuned" / "seed7"
    info = json.loads((run / "run_info.json").read_text())
    assert info["optimizer"]["optim_args"]["lr"] == pytest.approx(best.params["lr"]) and info["seed"] == 7
    assert json.loads((run / "all_results.json").read_text())["eval_samples"] == 40

    capsys.readouterr()
    assert tune.main(["--report", str(small_study.study_dir)]) == 0
    report = capsys.readouterr().out
    assert "equal budgets: 3.5 full-run equivalents each" in report
    assert (f"trials train on 64 of the {split['train']} examples of the training part and are scored on a "
            "validation split of 48") in report
    assert "adamw trials, in the order they finished:" in report
    best_adamw = load(small_study, "adamw").best_trial
    adamw_row = next(line for line in report.splitlines() if line.startswith("adamw "))
    assert f"{best_adamw.value:.4f}" in adamw_row and f"{spent(load(small_study, 'adamw')):.2f}" in adamw_row
    assert f"adamw: best learning_rate {best_adamw.params['learning_rate']:.3g}: " in report
    assert (small_study.study_dir / "tuning.png").read_bytes()[:4] == b"\x89PNG"

    # The paths scripts/fair_study.sh asks for are the files the search wrote.
    for name, expected in (("tuned_config", best_config), ("split_record", small_study.study_dir / "data" / "split.json"),
                           ("plot", small_study.study_dir / "tuning.png")):
        arguments = [str(small_study.study_dir), name] + (["sst2", "mfac"] if name == "tuned_config" else [])
        printed = subprocess.run([sys.executable, "-m", "mfac_glue.experiments.study_folder", *arguments],
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert Path(printed) == expected and expected.is_file()


@pytest.mark.slow
def test_a_grid_runs_each_point_once_and_stops_when_covered(small_study, capsys):
    space = small_study.tmp / "grid.json"
    space.write_text(json.dumps({"optim": "adamw_torch", "sampler": "grid",
                                 "flags": {"learning_rate": {"choices": [1e-3, 1e-2, 1e-1]}}}))
    arguments = [str(small_study.config), "--space", str(space), "--study_dir", str(small_study.study_dir),
                 "--budget", "10", "--min_epochs", "2", "--validation_size", "48", *small_study.extra]
    assert tune.main(arguments) == 0
    assert tune.main(arguments) == 0  # resumed: nothing left to run
    trials = load(small_study, "grid").trials
    assert sorted(trial.params["learning_rate"] for trial in trials) == [1e-3, 1e-2, 1e-1]
    assert all(trial.state == TrialState.COMPLETE for trial in trials)  # min_epochs = the epochs: no pruning
    capsys.readouterr()
    assert tune.main(["--report", str(small_study.study_dir)]) == 0
    best = max(trials, key=lambda trial: trial.value).params["learning_rate"]
    edge = "AT THE EDGE of the range" if best in (1e-3, 1e-1) else "inside the range"
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("grid: best learning_rate"))
    assert line.startswith(f"grid: best learning_rate {best:.3g}: ") and edge in line


@pytest.fixture(scope="module")
def postgresql():
    """A PostgreSQL server of the system's binaries, with a password-protected role (tests/postgres_server.py)."""
    if postgres_server.server_binaries() is None:
        pytest.skip("no PostgreSQL server binaries (Debian: apt install postgresql)")
    with postgres_server.postgresql_server() as server:
        yield server


@pytest.mark.slow
def test_workers_on_a_postgresql_server_finish_one_study_retry_a_killed_workers_trial_and_never_write_the_password(
        small_study, postgresql):
    """Three workers given the storage through MFAC_TUNE_STORAGE: the first is killed (with its trial's process)
    during its first trial; the two started after the grace period fail that trial through its stopped heartbeat,
    run it again with the same parameters, and finish the study together without repeating a trial. The role's
    password is nowhere in the study folder (records, logs, configs, model cards, plots) nor in what they print."""
    grace = 4
    command = [sys.executable, str(ROOT / "scripts" / "tune.py"), str(small_study.config), "--space",
               str(small_study.spaces["adamw"]), "--study_dir", str(small_study.study_dir), "--budget", "2",
               "--validation_size", "48", "--grace_period", str(grace), *small_study.extra]
    environment = {**os.environ, "MFAC_TUNE_STORAGE": postgresql.url}
    killed = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    first_log = small_study.study_dir / "trials" / "adamw" / "0" / "trial.log"
    try:
        deadline = time.monotonic() + 120
        while not (first_log.is_file() and first_log.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(killed.pid, signal.SIGKILL)  # the worker and its trial's run: a lost machine
        killed_output = killed.communicate(timeout=60)[0]
    finally:
        killed.kill()
    time.sleep(grace + 1)
    workers = [subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    try:
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="adamw", storage=postgresql.url)
    lost = study.trials[0]
    assert lost.state == TrialState.FAIL and [trial.state for trial in study.trials].count(TrialState.FAIL) == 1
    retry = next(trial for trial in study.trials
                 if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial) == 0)
    assert retry.params == lost.params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    trials = finished(study)
    assert len(study.trials) == len(trials) + 1  # nothing else failed, nothing left running
    assert len({json.dumps(trial.params) for trial in trials}) == len(trials)  # no trial ran twice
    assert 2 <= spent(study) < 2 + 2  # each worker starts a trial only while budget is left
    spans = [(trial.datetime_start, trial.datetime_complete) for trial in trials]
    assert any(a_start < b_end and b_start < a_end  # the two workers ran trials at the same time
               for index, (a_start, a_end) in enumerate(spans) for b_start, b_end in spans[index + 1:])
    printed = killed_output + "".join(outputs)
    assert "study in postgresql+psycopg://tuner:***@127.0.0.1" in printed
    password = postgres_server.PASSWORD.encode()
    written = [path for path in small_study.study_dir.rglob("*") if path.is_file() and password in path.read_bytes()]
    assert written == [] and postgres_server.PASSWORD not in printed


@pytest.mark.slow
def test_search_stopped_by_sigterm_resumes_with_the_interrupted_trial(small_study):
    command = [sys.executable, str(ROOT / "scripts" / "tune.py"), str(small_study.config), "--space",
               str(small_study.spaces["adamw"]), "--study_dir", str(small_study.study_dir), "--budget", "1",
               "--validation_size", "48", *small_study.extra]
    search = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trial_log = small_study.study_dir / "trials" / "adamw" / "0" / "trial.log"
    try:
        deadline = time.monotonic() + 120
        while not (trial_log.is_file() and trial_log.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        search.send_signal(signal.SIGTERM)  # what a machine that shuts down sends first
        _, err = search.communicate(timeout=60)
    finally:
        search.kill()  # a search that ignored the signal must not outlive the test
    assert search.returncode == 130 and "interrupted; the same command resumes the search" in err
    stopped = load(small_study, "adamw").trials
    assert [trial.state for trial in stopped] == [TrialState.FAIL] and stopped[0].user_attrs["interrupted"]

    run_search(small_study, "adamw", budget=1)
    trials = load(small_study, "adamw").trials
    assert len(trials) == 2 and trials[1].state == TrialState.COMPLETE
    assert trials[1].params == stopped[0].params and trials[1].user_attrs["retry_of"] == 0


def test_an_evaluation_seed_as_selection_seed_is_refused(small_study, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main([str(small_study.config), "--space", str(small_study.spaces["adamw"]), "--study_dir",
                   str(small_study.study_dir), "--trial_seed", "1236", *small_study.extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trial_seed: 1236 is one of the evaluation seeds (1234-1238)" in err
    assert not small_study.study_dir.exists()


@pytest.mark.slow
def test_glue_from_the_hub_cache_is_carved_and_its_dev_split_written_only_for_the_seed_runs(tmp_path, hub_cache,
                                                                                          glue_dir):
    config = tmp_path / "hub_sst2.json"
    config.write_text(json.dumps({
        "model_name_or_path": "prajjwal1/bert-tiny", "task_name": "sst2", "max_train_samples": 32, "max_steps": 4,
        "max_seq_length": 32, "per_device_train_batch_size": 8, "report_to": "none", "disable_tqdm": True}))
    space = tmp_path / "adamw.json"
    space.write_text(json.dumps(SMALL_SPACES["adamw"]))
    study_dir = tmp_path / "study"
    env = {**os.environ, "HF_HOME": str(hub_cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune.py"), str(config), "--space", str(space),
                             "--study_dir", str(study_dir), "--budget", "1", "--validation_size", "40"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    hub_rows = {split: len(columns["label"]) for split, columns in sst2_splits(glue_dir).items()}
    split = json.loads((study_dir / "data" / "split.json").read_text())
    assert (split["source"], split["train"], split["validation"]) == (
        "nyu-mll/glue sst2 train", hub_rows["train"] - 40, 40)
    assert json.loads((study_dir / "trials" / "adamw" / "0" / "all_results.json").read_text())["eval_samples"] == 40
    tuned = json.loads((study_dir / "sst2_adamw_tuned.json").read_text())
    assert tuned["validation_file"] == str(study_dir / "data" / "dev.jsonl")
    assert len((study_dir / "data" / "dev.jsonl").read_text().splitlines()) == hub_rows["validation"]


def test_a_bad_run_glue_flag_is_one_error_line_before_any_trial(small_study, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main([str(small_study.config), "--space", str(small_study.spaces["mfac"]), "--study_dir",
                   str(small_study.study_dir), "--validation_size", "48", *small_study.extra, "--max_seq_lenght", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max_seq_lenght" in err
    assert not (small_study.study_dir / "trials").exists()


def test_a_metric_the_task_does_not_have_is_one_error_line_before_any_trial(small_study, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main([str(small_study.config), "--space", str(small_study.spaces["adamw"]), "--study_dir",
                   str(small_study.study_dir), "--budget", "1", "--validation_size", "48", "--metric", "f1",
                   *small_study.extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metric f1: not among this run's eval metrics (accuracy)" in err
    assert not small_study.study_dir.exists()


def test_a_budget_summed_short_by_rounding_starts_no_further_trial():
    third = 1 / 3  # a trial pruned after epoch 1 of 3
    costs = [1.0, third, third, third, third, third, 1.0, 1.0, 1.0, third]  # 6 in exact arithmetic
    spent = 0.0
    for cost in costs:
        spent += cost
    assert spent < 6.0  # the float sum falls short
    assert not tune.budget_left(spent, 6.0)
    assert tune.budget_left(spent - third, 6.0) and tune.budget_left(0.0, 0.5)


# --- pruning -----------------------------------------------------------------------------------------------------
def test_successive_halving_prunes_after_the_first_epoch_and_records_the_share_trained():
    setting = {"min_epochs": 1, "reduction_factor": 3}
    study = optuna.create_study(direction="maximize", pruner=tune_report.successive_halving(setting))
    for good in (0.8, 0.9):
        trial = study.ask()
        tune_trial.ReportToTrial(trial, "accuracy").on_evaluate(
            None, SimpleNamespace(epoch=1.0, global_step=4, max_steps=12), None, metrics={"eval_accuracy": good})
        study.tell(trial, good)
    # Of three trials at epoch 1, only the best (the top third) goes on: 0.5 stops after 4 of its 12 steps.
    weak = study.ask()
    with pytest.raises(optuna.TrialPruned, match=r"pruned after epoch 1 \(step 4 of 12\)"):
        tune_trial.ReportToTrial(weak, "accuracy").on_evaluate(
            None, SimpleNamespace(epoch=1.0, global_step=4, max_steps=12), None, metrics={"eval_accuracy": 0.5})
    assert weak.storage.get_trial(weak._trial_id).user_attrs[tune_report.TRAINED_FRACTION] == pytest.approx(1 / 3)
    study.tell(weak, state=TrialState.PRUNED)
    # The best at epoch 1 goes on; epoch 2 is no rung (the next is 1 × 3); the evaluation after the last step is
    # the trial's value, never a report.
    strong = study.ask()
    callback = tune_trial.ReportToTrial(strong, "accuracy")
    for epoch, step, value in ((1.0, 4, 0.95), (2.0, 8, 0.1), (3.0, 12, 0.1)):
        callback.on_evaluate(None, SimpleNamespace(epoch=epoch, global_step=step, max_steps=12), None,
                             metrics={"eval_accuracy": value})
    assert strong.storage.get_trial(strong._trial_id).intermediate_values == {1: 0.95, 2: 0.1}


def test_score_of_an_undefined_correlation_is_zero_and_a_missing_metric_is_named():
    assert tune_trial.score({"eval_pearson": float("nan")}, "pearson") == 0.0
    assert tune_trial.score({"eval_accuracy": 0.75}, "accuracy") == 0.75
    with pytest.raises(tune_trial.MetricError, match=r"--metric f1: not among this run's eval metrics \(accuracy\)"):
        tune_trial.score({"eval_accuracy": 0.75, "eval_loss": 0.5}, "f1")


def test_importance_plot_puts_learning_rate_and_lr_on_one_row():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots()
    summaries = [SimpleNamespace(name="adamw", importances={"learning_rate": 1.0}),
                 SimpleNamespace(name="mfac", importances={"lr": 0.6, "damp": 0.4})]
    tune_report.plot_importance(axis, summaries, {"adamw": "C0", "mfac": "C1"}, "stsb")
    assert [label.get_text() for label in axis.get_yticklabels()] == ["damp", "lr"]
    plt.close(figure)


def test_report_says_when_the_best_lr_is_a_tie_instead_of_asking_to_widen_the_range():
    spec = {"optim": "adamw_torch", "flags": {"learning_rate": {"low": 1e-5, "high": 1e-2, "log": True}}}
    space = search_space.search_space_from(spec, "adamw", "test")
    distribution = space.sampled["learning_rate"][1]
    study = optuna.create_study(direction="maximize")
    for lr, value in ((9e-3, 0.498), (9.5e-3, 0.498), (1e-4, 0.482)):  # two trials tie at a constant answer
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": lr},
                                                  distributions={"learning_rate": distribution}, value=value))

    def line(trials):
        summary = tune_report.StudySummary("adamw", 6.0, "accuracy", True, None, "rte", space, trials, 0, 0.0, {})
        return summary.edge_lines()[0]

    # 9e-3 lies log10(1e-2 / 9e-3) = 0.046 decades below the top: the edge. Tied with trial 1, it asks for no
    # wider range.
    assert line(study.trials) == ("adamw: best learning_rate 0.009: 1 finished trials below, 1 above (finished "
                                  "trials on both sides); at the edge of the range, TIED at the best score with "
                                  "trial 1: the scores do not single out a value")
    # Alone at the best score, the same pick at the edge asks for it.
    assert line(study.trials[::2]).endswith("(NOT bracketed by finished trials); AT THE EDGE of the range: widen it")


def test_the_edge_is_a_tenth_of_a_decade_of_a_log_range_and_a_tenth_of_a_linear_one():
    log = FloatDistribution(1e-8, 1e-1, log=True)
    # log10(1.2e-8 / 1e-8) = 0.079 < 0.1; log10(1.35e-6 / 1e-6) = 0.130; log10(1e-1 / 8e-2) = 0.097.
    assert search_space.edges_reached(1.2e-8, log) == (True, False)
    assert search_space.edges_reached(1.35e-6, FloatDistribution(1e-6, 1e-1, log=True)) == (False, False)
    assert search_space.edges_reached(8e-2, log) == (False, True)
    linear = FloatDistribution(0.0, 0.2)
    assert search_space.edges_reached(0.019, linear) == (True, False)  # within 0.02 of 0
    assert search_space.edges_reached(0.021, linear) == (False, False)
    assert search_space.widened_range(1.2e-8, log) == pytest.approx([1e-9, 1e-1])
    assert search_space.widened_range(8e-2, log) == pytest.approx([1e-8, 1.0])
    assert search_space.widened_range(1e-5, log) is None
    assert search_space.widened_range(0.019, linear) is None  # a linear range may end where its parameter does


def test_a_best_trial_at_a_range_edge_widens_it_and_the_rest_of_the_budget_samples_there():
    spec = {"optim": "MFAC", "optim_args": {"lr": {"low": 1e-5, "high": 1e-2, "log": True},
                                            "damp": {"low": 1e-8, "high": 1e-1, "log": True}}}
    space = search_space.search_space_from(spec, "mfac", "test")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))

    def objective(trial):  # the best damp lies far below the range: each widening finds better scores lower down
        values = tune.widen_at_the_edges(study, space).suggest(trial)["optim_args"]
        return -abs(math.log10(values["damp"]) + 12) - abs(math.log10(values["lr"]) + 3.5)

    # Four trials fixed by hand before the rule may act; the best (damp 1.1e-8) lies at damp's low edge.
    for lr, damp in ((3e-4, 1e-3), (1e-4, 1.1e-8), (3e-3, 1e-5), (1e-3, 1e-2)):
        study.enqueue_trial({"lr": lr, "damp": damp})
    study.optimize(objective, n_trials=4)
    assert study.user_attrs.get(tune_report.WIDENED) is None
    wider = tune.widen_at_the_edges(study, space)
    assert study.user_attrs[tune_report.WIDENED] == {"damp": pytest.approx([1e-9, 1e-1])}
    assert wider.sampled["damp"][1].low == pytest.approx(1e-9) and wider.sampled["lr"][1].low == 1e-5
    study.optimize(objective, n_trials=40)
    # The rest of the budget went below the file's floor, and the range kept growing while its edge was best.
    assert min(trial.params["damp"] for trial in study.trials[4:]) < 1e-8
    assert study.user_attrs[tune_report.WIDENED]["damp"][0] <= 1e-10
    assert study.best_trial.params["damp"] < 1e-8
    # The report reads the widened ranges back and says so.
    summary = tune_report.StudySummary("mfac", 6.0, "accuracy", True, None, "sst2",
                                       space.with_ranges(study.user_attrs[tune_report.WIDENED]),
                                       study.trials, 0, 0.0, {}, study.user_attrs[tune_report.WIDENED])
    assert "(the search widened the range to [" in next(line for line in summary.edge_lines() if "best damp" in line)


def test_a_tied_best_score_widens_nothing():
    spec = {"optim": "adamw_torch", "flags": {"learning_rate": {"low": 1e-5, "high": 1e-2, "log": True}}}
    space = search_space.search_space_from(spec, "adamw", "test")
    distribution = space.sampled["learning_rate"][1]
    study = optuna.create_study(direction="maximize")
    for lr, value in ((9.5e-3, 0.498), (9e-3, 0.498), (1e-4, 0.48), (1e-3, 0.47)):
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": lr},
                                                  distributions={"learning_rate": distribution}, value=value))
    assert tune.widen_at_the_edges(study, space).sampled["learning_rate"][1] == distribution
    assert tune_report.WIDENED not in study.user_attrs
