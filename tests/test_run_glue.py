"""run_glue.py: argument handling, local GLUE data, local metrics, end-to-end offline runs with a tiny BERT, resume
after a kill during a checkpoint write, and where the script keeps HF's behaviour (a pretrained head's own label
order, the model card or the push to the Hub at the end, with M-FAC's settings on the card)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import run_glue
from mfac_glue import arguments as glue_arguments
from mfac_glue import model_types as glue_model_types
from mfac_glue import data as glue_data
from mfac_glue.records import model_source_record
from mfac_glue.metrics import GlueMetric
from mfac_optim.hf.arguments import MFACArguments
from conftest import SHARED_GLUE
from hub_cache import sst2_splits

SEED_COMMAND = (
    "--seed 1234 --model_name_or_path prajjwal1/bert-mini --task_name sst2 --do_train --do_eval "
    "--max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 1e-4 --num_train_epochs 3 "
    "--output_dir out_dir/ --optim MFAC"
).split() + ["--optim_args", '{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}']

ROOT = Path(__file__).resolve().parents[1]


def published_command(num_grads: int) -> list[str]:
    """The seed command word for word, with a window of `num_grads` instead of 1024."""
    return SEED_COMMAND[:-1] + [SEED_COMMAND[-1].replace('"num_grads": 1024', f'"num_grads": {num_grads}')]


def offline(hf_home: Path) -> dict[str, str]:
    """The environment of a compute node that runs from the cache a login node filled."""
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


QUICK = ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--max_seq_length", "32",
         "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]


def run(tmp_path, model, glue_dir, task, folder, *extra, train_samples=64, eval_samples=48):
    output = tmp_path / f"out-{task}"
    run_glue.main([
        "--model_name_or_path", str(model), "--task_name", task,
        "--train_file", str(glue_dir / folder / "train.tsv"), "--validation_file", str(glue_dir / folder / "dev.tsv"),
        "--do_train", "--do_eval", "--max_train_samples", str(train_samples), "--max_eval_samples", str(eval_samples),
        "--output_dir", str(output), *QUICK, *extra,
    ])
    return output, json.loads((output / "all_results.json").read_text())


# --- arguments ---------------------------------------------------------------------------------------------------
def test_seed_command_parses_to_the_published_mfac_settings(hub_cache):
    argv = SEED_COMMAND + ["--cache_dir", str(hub_cache / "hub")]
    model_args, data_args, training_args, local = run_glue.parse_arguments(argv)
    assert training_args.optim == "mfac"
    assert json.loads(training_args.optim_args) == {"lr": 1e-4, "weight_decay": 0.0, "num_grads": 1024, "damp": 1e-6}
    assert (training_args.seed, training_args.learning_rate, training_args.num_train_epochs) == (1234, 1e-4, 3)
    assert training_args.per_device_train_batch_size == 32 and training_args.max_grad_norm == 1.0
    assert (model_args.model_name_or_path, data_args.task_name, data_args.max_seq_length) == ("prajjwal1/bert-mini", "sst2", 128)
    assert data_args.pad_to_max_length and local is None
    assert training_args.mfac == MFACArguments(lr=1e-4, num_grads=1024, damp=1e-6)


def test_mfac_is_case_insensitive_and_json_lr_wins_over_learning_rate(caplog, hub_cache):
    argv = [a if a != "MFAC" else "mfac" for a in SEED_COMMAND] + ["--cache_dir", str(hub_cache / "hub")]
    argv[argv.index("--learning_rate") + 1] = "5e-5"
    argv += ["--weight_decay", "0.01"]
    _, _, training_args, _ = run_glue.parse_arguments(argv)
    assert training_args.learning_rate == 1e-4 and training_args.weight_decay == 0.01
    assert json.loads(training_args.optim_args)["lr"] == 1e-4
    assert "--optim_args lr=0.0001 overrides --learning_rate 5e-05" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's logging interval")
def test_a_cpu_run_logs_the_loss_every_50_steps_unless_told_otherwise(tiny_bert):
    base = ["--model_name_or_path", str(tiny_bert), "--task_name", "rte", "--output_dir", "o"]
    assert run_glue.parse_arguments(base)[2].logging_steps == 50
    assert run_glue.parse_arguments(base + ["--logging_steps", "500"])[2].logging_steps == 500
    assert run_glue.parse_arguments(base + ["--logging_steps=7"])[2].logging_steps == 7


def test_other_optimizers_are_hf_unchanged(tiny_bert):
    _, _, training_args, _ = run_glue.parse_arguments(
        ["--model_name_or_path", str(tiny_bert), "--task_name", "rte", "--output_dir", "o", "--optim", "sgd",
         "--optim_args", "momentum=0.9"])
    assert training_args.optim == "sgd" and training_args.optim_args == "momentum=0.9"
    assert training_args.mfac is None


def test_hf_key_value_optim_args_parse_like_the_json_form(tiny_bert):
    common = ["--model_name_or_path", str(tiny_bert), "--task_name", "sst2", "--output_dir", "o", "--optim", "MFAC"]
    _, _, from_pairs, _ = run_glue.parse_arguments(
        common + ["--optim_args", "lr=2e-4, num_grads=64,grad_dtype=bfloat16,shard=false,momentum=0.5"])
    _, _, from_json, _ = run_glue.parse_arguments(
        common + ["--optim_args", '{"lr": 2e-4, "num_grads": 64, "grad_dtype": "bfloat16", "shard": false, '
                                  '"momentum": 0.5}'])
    assert from_pairs.mfac == from_json.mfac == MFACArguments(lr=2e-4, num_grads=64, momentum=0.5,
                                                              grad_dtype="bfloat16")
    assert json.loads(from_pairs.optim_args) == {"lr": 2e-4, "weight_decay": 0.0, "num_grads": 64,
                                                 "grad_dtype": "bfloat16", "shard": False, "momentum": 0.5}


def test_json_config_file_with_command_line_override(tmp_path, tiny_bert):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_name_or_path": str(tiny_bert), "task_name": "mrpc", "output_dir": "o", "seed": 1,
                                  "do_train": True, "optim": "MFAC", "optim_args": {"num_grads": 512},
                                  "label_names": ["labels", "other"]}))
    _, data_args, training_args, _ = run_glue.parse_arguments([str(config), "--seed", "7"])
    assert training_args.seed == 7 and training_args.do_train and data_args.task_name == "mrpc"
    assert training_args.label_names == ["labels", "other"]
    assert json.loads(training_args.optim_args)["num_grads"] == 512


@pytest.mark.parametrize("given", ['{"num_grads": 16, "momentum": 0.5}', "num_grads=16,momentum=0.5",
                                   '--optim_args={"num_grads": 16, "momentum": 0.5}'])
def test_command_line_optim_args_override_only_the_keys_they_name(tmp_path, tiny_bert, given):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_name_or_path": str(tiny_bert), "task_name": "mrpc", "output_dir": "o",
                                  "optim": "MFAC", "optim_args": {"num_grads": 512, "damp": 1e-4, "grad_dtype": "bfloat16"}}))
    flags = [given] if given.startswith("--") else ["--optim_args", given]
    _, _, training_args, _ = run_glue.parse_arguments([str(config), "--seed", "7", *flags])
    assert training_args.mfac == MFACArguments(lr=training_args.learning_rate, num_grads=16, damp=1e-4,
                                               momentum=0.5, grad_dtype="bfloat16")


BAD_INPUTS = [
    (["--optim", "MFAC", "--optim_args", '{"lr": 1e-4,'], "--optim_args: not valid JSON"),
    (["--optim", "MFAC", "--optim_args", "[1, 2]"], "--optim_args: must be a JSON object"),
    (["--optim", "MFAC", "--optim_args", '{"num_grad": 8}'],
     "--optim_args: unknown key(s) num_grad for MFAC (allowed: lr, num_grads, damp, momentum, weight_decay, grad_dtype"),
    (["--optim", "MFAC", "--optim_args", '{"damp": -1}'], "--optim_args: Invalid damp: -1"),
    (["--optim", "MFAC", "--optim_args", '{"grad_dtype": "int4"}'], "--optim_args: Invalid grad_dtype: 'int4'"),
    (["--optim", "MFAC", "--optim_args", "num_grads"], "--optim_args: 'num_grads' is not key=value"),
    (["--optim", "MFAC", "--optim_args", '{"density": 0}'], "--optim_args: Invalid density: 0 (must be a number with 0 <"),
    (["--optim", "MFAC", "--optim_args", "density=1.5"], "--optim_args: Invalid density: 1.5"),
    (["--optim", "MFAC", "--optim_args", '{"density": "1%"}'], "--optim_args: Invalid density: '1%'"),
    (["--optim", "MFAC", "--optim_args", "num_grads=many"], "--optim_args: Invalid num_grads: 'many'"),
    (["--optim", "MFAC", "--optim_args", "damp=1e-6,nesterov=true"], "--optim_args: unknown key(s) nesterov for MFAC"),
    (["--optim", "adamw_torch", "--optim_args", '{"lr": 1}'], "--optim_args: adamw_torch takes no optimizer arguments"),
    (["--optim", "shampoo"], "--optim: unknown optimizer 'shampoo' (allowed: MFAC, adamw_torch"),
    (["--task_name", "squad"], "--task_name: unknown task 'squad' (allowed: cola, mnli"),
    (["--train_file", "/nonexistent/train.tsv"], "--train_file: file not found: /nonexistent/train.tsv"),
    (["--train_file", "train.parquet"], "--train_file: 'train.parquet' must end with one of .tsv, .csv, .json, .jsonl"),
    (["--fsdp", "full_shard", "--use_cpu"], "--fsdp: the Trainer's FSDP (accelerate) runs on GPUs only; on the CPU it "
                                            "would train as DDP without a word"),
    (["--optim", "MFAC", "--fsdp", "full_shard"], "--fsdp: "),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2_before_any_loading(extra, message, capsys):
    argv = ["--model_name_or_path", "/nonexistent/model", "--task_name", "sst2", "--output_dir", "o", *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_data_file_without_the_task_columns_is_rejected(tmp_path, glue_dir, capsys):
    argv = ["--model_name_or_path", "/nonexistent/model", "--task_name", "rte", "--output_dir", "o", "--do_train",
            "--train_file", str(glue_dir / "SST-2" / "train.tsv")]
    with pytest.raises(SystemExit):
        run_glue.main(argv)
    err = capsys.readouterr().err
    assert "no rte columns (sentence1, sentence2, label) in its header" in err and err.count("\n") == 1


def test_stage_without_its_local_file_is_rejected(glue_dir, capsys):
    argv = ["--model_name_or_path", "/nonexistent/model", "--task_name", "sst2", "--output_dir", "o", "--do_eval",
            "--train_file", str(glue_dir / "SST-2" / "train.tsv")]
    with pytest.raises(SystemExit):
        run_glue.main(argv)
    assert "--validation_file: required for --do_eval when data comes from local files" in capsys.readouterr().err


def test_samples_cut_before_tokenizing_are_the_rows_and_features_hf_keeps(tiny_bert, glue_dir):
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    columns = glue_data.read_glue_tsv(str(glue_dir / "SST-2" / "dev.tsv"), "sst2")
    split = Dataset.from_dict({name: values[:300] for name, values in columns.items()})
    raw = DatasetDict({"train": split, "validation_matched": split, "validation_mismatched": split,
                       "test_matched": split})
    limits = glue_arguments.DataTrainingArguments(task_name="mnli", max_train_samples=40, max_eval_samples=1000,
                                            max_predict_samples=7)

    def tokenize(examples):
        return tokenizer(examples["sentence"], max_length=32, truncation=True)

    cut = glue_data.first_rows_of_each_split(raw, limits).map(tokenize, batched=True)
    hfs = raw.map(tokenize, batched=True)  # HF's order: every row tokenized, the first ones kept afterwards
    for name, rows in (("train", 40), ("validation_matched", 300), ("validation_mismatched", 300),
                       ("test_matched", 7)):
        assert cut[name].to_dict() == hfs[name].select(range(rows)).to_dict(), name
    assert len(glue_data.first_rows_of_each_split(raw, glue_arguments.DataTrainingArguments(
        task_name="mnli"))["train"]) == 300  # no limit: every row


def test_tokenizer_folder_without_vocabulary_is_refused(tmp_path):
    # transformers 5 builds a tokenizer of the 5 special tokens from such a folder and maps every word to [UNK].
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": true, "tokenizer_class": "BertTokenizer"}')
    model_args = glue_arguments.ModelArguments(config_name=str(tmp_path), tokenizer_name=str(tmp_path))
    with pytest.raises(RuntimeError, match="has only its 5 special tokens; the folder needs its vocab.txt"):
        glue_model_types.load_tokenizer(model_args)


# --- the published command from a Hub-shaped cache ---------------------------------------------------------------
@pytest.mark.slow
def test_published_command_runs_offline_from_the_hub_cache(tmp_path, hub_cache, glue_dir):
    command = [sys.executable, str(ROOT / "run_glue.py"), *published_command(num_grads=8), "--max_steps", "3"]
    result = subprocess.run(command, cwd=tmp_path, env=offline(hub_cache), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "prajjwal1/bert-mini: config.json has no \"model_type\"; inferred 'bert' from the name" in output
    results = json.loads((tmp_path / "out_dir" / "all_results.json").read_text())
    cached = {split: len(columns["label"]) for split, columns in sst2_splits(glue_dir).items()}
    assert results["train_samples"] == cached["train"] and results["eval_samples"] == cached["validation"]
    assert json.loads((tmp_path / "out_dir" / "trainer_state.json").read_text())["global_step"] == 3
    record = json.loads((tmp_path / "out_dir" / "run_info.json").read_text())
    assert record["model"] == "prajjwal1/bert-mini" and record["optimizer"]["optim_args"]["num_grads"] == 8
    initial = torch.load(next(hub_cache.glob("hub/models--prajjwal1--bert-mini/snapshots/*/pytorch_model.bin")),
                         weights_only=True)
    trained = load_file(tmp_path / "out_dir" / "model.safetensors")
    key = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(trained[key], initial[key])


# --- configs without model_type ---------------------------------------------------------------------------------
def bert_folder_without_model_type(parent: Path, name: str, vocab_from: Path) -> Path:
    """A tiny BERT folder whose config.json has no model_type, as Google's converted checkpoints ship it."""
    folder = parent / name
    folder.mkdir()
    config = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "max_position_embeddings": 128, "vocab_size": 30522, "hidden_act": "gelu", "type_vocab_size": 2}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text((vocab_from / "vocab.txt").read_text())
    return folder


@pytest.mark.parametrize("source,expected", [
    ("prajjwal1/bert-mini", "bert"), ("prajjwal1/bert-tiny", "bert"), ("someone/DistilBERT-base", "distilbert"),
    ("someone/xlm-roberta-large", "xlm-roberta"), ("someone/my-classifier", None),
])
def test_model_type_from_a_hub_id_is_the_longest_known_type_in_it(source, expected):
    assert glue_model_types.model_type_from_name(source) == expected


def test_model_type_from_a_folder_or_a_hub_cache_snapshot(tmp_path):
    snapshot = tmp_path / "hub" / "models--prajjwal1--bert-mini" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "roberta-experiments" / "bert-small").mkdir(parents=True)
    assert glue_model_types.model_type_from_name(str(snapshot)) == "bert"
    assert glue_model_types.model_type_from_name(str(tmp_path / "roberta-experiments" / "bert-small")) == "bert"


def test_config_and_tokenizer_folders_without_model_type_load(tmp_path, tiny_bert, glue_dir, caplog):
    from transformers import AutoModelForSequenceClassification

    folder = bert_folder_without_model_type(tmp_path, "bert-local", tiny_bert)
    argv = ["--config_name", str(folder), "--tokenizer_name", str(folder), "--task_name", "sst2",
            "--train_file", str(glue_dir / "SST-2" / "train.tsv"), "--do_train", "--output_dir", str(tmp_path / "o")]
    model_args, *_ = run_glue.parse_arguments(argv)
    config = glue_model_types.load_config(model_args, num_labels=2, finetuning_task="sst2")
    tokenizer = glue_model_types.load_tokenizer(model_args)
    model = AutoModelForSequenceClassification.from_config(config)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.hidden_size == 16
    assert len(tokenizer) == len((tiny_bert / "vocab.txt").read_text().splitlines())
    assert tokenizer("good film")["input_ids"][1] == tokenizer.convert_tokens_to_ids("good")
    assert caplog.text.count(f"{folder}: config.json has no \"model_type\"; inferred 'bert' from the name") == 1


@pytest.mark.parametrize("flag", ["--model_name_or_path", "--config_name", "--tokenizer_name"])
def test_config_whose_type_cannot_be_inferred_is_one_line_before_weights_load(tmp_path, tiny_bert, flag, capsys):
    unnamed = bert_folder_without_model_type(tmp_path, "my-classifier", tiny_bert)
    (unnamed / "pytorch_model.bin").write_bytes(b"not a checkpoint: loading it would fail otherwise")
    misleading = bert_folder_without_model_type(tmp_path, "bert-from-gpt2", tiny_bert)
    (misleading / "config.json").write_text(json.dumps({"n_embd": 16, "n_layer": 1, "n_head": 2, "vocab_size": 50}))
    for folder, message in ((unnamed, "names no known model type: add \"model_type\" (e.g. \"bert\") to config.json, "
                                      "or pass --config_name"),
                            (misleading, "its name suggests 'bert', but its keys do not fit that type (unknown to it: "
                                         "n_embd, n_layer, n_head)")):
        sources = {"--model_name_or_path": str(tiny_bert), flag: str(folder)}
        argv = ["--task_name", "sst2", "--output_dir", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as exit_info:
            run_glue.main(argv + [item for pair in sources.items() for item in pair])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
        assert f"error: {flag}: the config.json of '{folder}' has no \"model_type\"" in err and message in err


def test_window_that_cannot_fit_is_refused_before_weights_load(tmp_path, tiny_bert, glue_dir, capsys):
    folder = bert_folder_without_model_type(tmp_path, "bert-huge-window", tiny_bert)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint: loading it would fail otherwise")
    argv = ["--model_name_or_path", str(folder), "--task_name", "sst2", "--do_train", "--output_dir", str(tmp_path / "o"),
            "--train_file", str(glue_dir / "SST-2" / "train.tsv"), "--optim", "MFAC",
            "--optim_args", '{"num_grads": 10000000}']
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "--optim_args: M-FAC with num_grads=10000000 needs up to" in err
    assert "GiB per process for this model, but this machine's RAM has" in err
    assert 'available: use a smaller num_grads or "grad_dtype": "bfloat16"' in err
    # As a user runs it: the refusal ends stderr, before the arguments and the config are logged.
    result = subprocess.run([sys.executable, str(Path(run_glue.__file__)), *argv], capture_output=True, text=True,
                            timeout=300)
    lines = result.stderr.splitlines()  # this folder's config also gets its one warning: no "model_type"
    assert result.returncode == 2 and "needs up to" in lines[-1] and len(lines) <= 2, result.stderr
    assert "Training/evaluation parameters" not in result.stdout
    assert "Model config" not in result.stdout + result.stderr


# --- local data --------------------------------------------------------------------------------------------------
def test_glue_tsv_layouts(tmp_path):
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more books I ask to whom.\n")
    assert glue_data.read_glue_tsv(str(cola), "cola") == {
        "sentence": ["The sailors rode the breeze.", "The more books I ask to whom."], "label": [1, 0]}
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \" no .\tHe did .\n".encode())
    assert glue_data.read_glue_tsv(str(mrpc), "mrpc") == {
        "sentence1": ['He said " no .'], "sentence2": ["He did ."], "label": [1]}
    mnli = tmp_path / "mnli.tsv"
    mnli.write_text("index\tsentence1\tsentence2\tgold_label\n0\tA\tB\tcontradiction\n1\tC\tD\tneutral\n")
    assert glue_data.read_glue_tsv(str(mnli), "mnli")["label"] == [2, 1]
    test = tmp_path / "test.tsv"
    test.write_text("index\tsentence\n0\tunlabelled .\n")
    assert glue_data.read_glue_tsv(str(test), "sst2") == {"sentence": ["unlabelled ."], "label": [-1]}
    stsb = tmp_path / "stsb.tsv"
    stsb.write_text("index\tsentence1\tsentence2\tscore\n0\ta\tb\t3.800\n")
    assert glue_data.read_glue_tsv(str(stsb), "stsb")["label"] == [3.8]


@pytest.mark.skipif(not SHARED_GLUE.exists(), reason="needs ../shared/data/glue")
@pytest.mark.parametrize("task,folder,rows,label_counts", [
    ("sst2", "SST-2", 872, [428, 444]), ("cola", "CoLA", 1043, [322, 721]), ("mrpc", "MRPC", 408, [129, 279]),
    ("rte", "RTE", 277, [146, 131]), ("qnli", "QNLI", 5463, [2702, 2761]),
])
def test_real_glue_dev_files_match_hf_glue(task, folder, rows, label_counts):
    columns = glue_data.read_glue_tsv(str(SHARED_GLUE / folder / "dev.tsv"), task)
    assert len(columns["label"]) == rows
    assert np.bincount(columns["label"]).tolist() == label_counts
    assert all(isinstance(text, str) and text for key in glue_data.TASK_TO_KEYS[task] if key for text in columns[key])


# --- metrics -----------------------------------------------------------------------------------------------------
def test_metrics_against_hand_computation():
    predictions, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    # TP=2, FP=1, FN=1, TN=1: MCC = (2·1 − 1·1)/√(3·3·2·2) = 1/6; F1 = 2·2/(2·2+1+1) = 2/3; accuracy 3/5.
    def metric(task, is_regression=False):
        return GlueMetric(task, is_regression).compute

    assert metric("cola")(predictions, labels) == pytest.approx({"matthews_correlation": 1 / 6})
    assert metric("mrpc")(predictions, labels) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert metric("rte")(predictions, labels) == {"accuracy": 0.6}
    scores, gold = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    # Pearson: deviations (−1.5,−.5,.5,1.5)·(−1.75,.25,−.75,2.25) = 5.5; √5 · √8.75 → r = 5.5/√43.75.
    # Spearman: ranks (1,2,3,4) vs (1,3,2,4): 1 − 6·2/(4·15) = 0.8.
    pearson = 5.5 / math.sqrt(43.75)
    assert metric("stsb", True)(scores, gold) == pytest.approx({"pearson": pearson, "spearmanr": 0.8})
    assert metric(None, True)(scores, gold) == pytest.approx({"mse": 0.75})


# --- end to end --------------------------------------------------------------------------------------------------
def accuracy_by_hand(model_dir: Path, glue_dir: Path, count: int) -> float:
    predictions, labels = predictions_by_hand(model_dir, glue_dir, count)
    return float((predictions == labels).mean())


def predictions_by_hand(model_dir: Path, glue_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The saved model's classes for SST-2's first `count` dev sentences, and their labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    columns = glue_data.read_glue_tsv(str(glue_dir / "SST-2" / "dev.tsv"), "sst2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tokenizer(columns["sentence"][:count], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).numpy()
    return predictions, np.array(columns["label"][:count])


def kept_predictions(output: Path, task: str) -> np.ndarray:
    """eval_predictions_<task>.tsv as rows of (index, prediction, label)."""
    return np.loadtxt(output / f"eval_predictions_{task}.tsv", delimiter="\t", skiprows=1, ndmin=2)


@pytest.mark.parametrize("optimizer", [["--optim", "adamw_torch"], ["--optim", "MFAC", "--optim_args",
                                                                     '{"num_grads": 8, "damp": 1e-4}']])
def test_sst2_end_to_end(tmp_path, tiny_bert, glue_dir, optimizer):
    output, results = run(tmp_path, tiny_bert, glue_dir, "sst2", "SST-2", "--learning_rate", "1e-3", *optimizer)
    assert results["train_samples"] == 64 and results["eval_samples"] == 48
    assert math.isfinite(results["train_loss"]) and 0 <= results["eval_accuracy"] <= 1
    assert results["eval_accuracy"] == pytest.approx(accuracy_by_hand(output, glue_dir, 48))
    # The per-example predictions kept beside the metrics are the saved model's, row for row.
    kept = kept_predictions(output, "sst2")
    predictions, labels = predictions_by_hand(output, glue_dir, 48)
    assert kept[:, 0].tolist() == list(range(48))
    assert kept[:, 1].tolist() == predictions.tolist() and kept[:, 2].tolist() == labels.tolist()
    for name in ("train_results.json", "eval_results.json", "trainer_state.json", "model.safetensors", "run_info.json"):
        assert (output / name).exists(), name
    record = json.loads((output / "run_info.json").read_text())
    assert record["optimizer"]["optim"] == optimizer[1] and (record["task_name"], record["seed"]) == ("sst2", 42)
    trained, initial = load_file(output / "model.safetensors"), load_file(tiny_bert / "model.safetensors")
    assert not torch.equal(trained["bert.encoder.layer.0.output.dense.weight"],
                           initial["bert.encoder.layer.0.output.dense.weight"])


@pytest.mark.parametrize("optimizer,learns", [
    (["--optim", "adamw_torch", "--learning_rate", "1e-2"], True),
    (["--optim", "MFAC", "--optim_args", '{"lr": 1e-2, "num_grads": 16}'], True),
    (["--optim", "MFAC", "--optim_args", '{"lr": 0, "num_grads": 16}'], False),  # a broken optimizer: no steps
])
def test_training_learns_a_task_that_a_broken_optimizer_does_not(tmp_path, learnable_task, optimizer, learns):
    model, glue = learnable_task
    output, results = run(tmp_path, model, glue, "sst2", "SST-2", *optimizer, "--num_train_epochs", "5",
                          "--logging_steps", "5", train_samples=400, eval_samples=120)
    labels = glue_data.read_glue_tsv(str(glue / "SST-2" / "dev.tsv"), "sst2")["label"]
    majority = max(np.bincount(labels)) / len(labels)
    losses = [entry["loss"] for entry in json.loads((output / "trainer_state.json").read_text())["log_history"]
              if "loss" in entry]
    assert len(losses) == 25  # 400 examples / batch 16 × 5 epochs, logged every 5 steps
    learned = results["eval_accuracy"] >= majority + 0.25 and losses[-1] <= 0.6 * losses[0]
    assert learned == learns, (results["eval_accuracy"], majority, losses[0], losses[-1])


def test_pair_task_with_mfac(tmp_path, tiny_bert, glue_dir, caplog):
    caplog.set_level("INFO", logger="run_glue")
    output, results = run(tmp_path, tiny_bert, glue_dir, "rte", "RTE", "--optim", "MFAC", "--optim_args",
                          '{"num_grads": 4, "momentum": 0.5}', "--learning_rate", "1e-3")
    assert 0 <= results["eval_accuracy"] <= 1 and math.isfinite(results["eval_loss"])
    args = torch.load(output / "training_args.bin", weights_only=False)
    assert args.optim == "mfac" and json.loads(args.optim_args)["momentum"] == 0.5
    logged = re.search(r"Optimizer state: ([\d.]+) GiB \(MFAC\); estimated before loading: at most ([\d.]+) GiB",
                       caplog.text)
    assert logged and 0 < float(logged.group(1)) <= float(logged.group(2))


def test_stsb_regression_keeps_its_predictions_and_clocks_its_evaluations(tmp_path, tiny_bert, glue_dir):
    # The tiny model was saved with a 2-label head; regression needs 1, as with any classifier checkpoint.
    output, results = run(tmp_path, tiny_bert, glue_dir, "stsb", "STS-B", "--optim", "adamw_torch", "--learning_rate",
                          "1e-3", "--ignore_mismatched_sizes", "true", "--eval_strategy", "steps", "--eval_steps", "2")
    for key in ("eval_pearson", "eval_spearmanr", "eval_combined_score"):
        assert -1 <= results[key] <= 1
    assert results["eval_combined_score"] == pytest.approx((results["eval_pearson"] + results["eval_spearmanr"]) / 2)
    kept = kept_predictions(output, "stsb")
    assert len(kept) == results["eval_samples"]
    assert results["eval_pearson"] == pytest.approx(scipy.stats.pearsonr(kept[:, 1], kept[:, 2])[0], abs=1e-5)
    assert results["eval_spearmanr"] == pytest.approx(scipy.stats.spearmanr(kept[:, 1], kept[:, 2])[0], abs=1e-5)
    # Each evaluation during training records the training seconds up to it, its own time left out: the clock
    # grows, and at the end it is the training time less every evaluation's.
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_pearson" in entry]
    clock = [entry["train_seconds"] for entry in evaluations]
    assert len(clock) >= 2 and all(0 < a < b for a, b in zip(clock, clock[1:]))
    end = next(entry for entry in history if "train_runtime" in entry)
    evaluating = sum(entry["eval_runtime"] for entry in evaluations)
    assert clock[-1] <= end["train_seconds"] <= end["train_runtime"] - evaluating + 0.5
    assert all(entry["load_average"] >= 0 for entry in evaluations)


def test_training_clock_leaves_out_evaluations_and_checkpoint_saves(monkeypatch):
    from types import SimpleNamespace

    from mfac_optim.hf import trainer as hf_trainer

    now = [100.0]
    monkeypatch.setattr(hf_trainer.time, "perf_counter", lambda: now[0])
    clock, state = hf_trainer.TrainingClock(), SimpleNamespace(log_history=[{"train_seconds": 40.0, "step": 5}])
    clock.on_train_begin(None, state, None)  # resumed: the history's last reading goes on
    now[0] += 7.0  # training
    with clock.paused():  # a checkpoint save
        now[0] += 30.0
    now[0] += 2.0  # training
    state.log_history.append({"eval_accuracy": 0.5, "eval_runtime": 4.0, "step": 10})  # evaluated for 4 s
    now[0] += 4.0
    clock.on_log(None, state, None, logs=state.log_history[-1])
    assert state.log_history[-1]["train_seconds"] == 40.0 + 7.0 + 2.0


def test_trainer_builds_mfac_with_decay_groups_and_resumes_bit_identically(tmp_path, tiny_bert, glue_dir,
                                                                          monkeypatch):
    counted = []  # the training rows the memory preflight tokenized: the 64 kept, not the file's 67,349

    def most_ids_in_a_batch(dataset, *args):
        counted.append(len(dataset))
        return glue_data.most_ids_in_a_batch(dataset, *args)

    monkeypatch.setattr(run_glue, "most_ids_in_a_batch", most_ids_in_a_batch)
    common = ["--optim", "MFAC", "--optim_args", '{"num_grads": 4, "damp": 1e-4, "momentum": 0.9}',
              "--weight_decay", "0.01", "--max_steps", "6", "--learning_rate", "1e-3"]
    straight, _ = run(tmp_path / "a", tiny_bert, glue_dir, "sst2", "SST-2", *common,
                      "--save_strategy", "steps", "--save_steps", "3")
    assert counted == [64]
    saved = torch.load(straight / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert [group["weight_decay"] for group in saved["param_groups"]] == [0.01, 0.0]
    assert {group["num_grads"] for group in saved["param_groups"]} == {4}
    window_state = next(iter(saved["state"].values()))
    assert window_state["gram"].dtype == torch.float64 and int(window_state["step"]) == 3

    resumed, _ = run(tmp_path / "b", tiny_bert, glue_dir, "sst2", "SST-2", *common,
                     "--resume_from_checkpoint", str(straight / "checkpoint-3"))
    final_straight, final_resumed = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    assert all(torch.equal(final_straight[key], final_resumed[key]) for key in final_straight)


KILL_STAGES = ["model", "optimizer_cut", "optimizer", "rng", "state_cut", "state"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, tiny_bert, glue_dir):
    """An M-FAC run of 8 steps saving every 3, and the command that made it."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    command = ["--model_name_or_path", str(tiny_bert), "--task_name", "sst2",
               "--train_file", str(glue_dir / "SST-2" / "train.tsv"), "--validation_file", str(glue_dir / "SST-2" / "dev.tsv"),
               "--do_train", "--max_train_samples", "64", *QUICK, "--optim", "MFAC",
               "--optim_args", '{"num_grads": 4, "damp": 1e-4, "momentum": 0.9}', "--learning_rate", "1e-3",
               "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "2"]
    run_glue.main([*command, "--output_dir", str(folder)])
    return folder, command


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, uninterrupted_run):
    """The same command killed while writing checkpoint-6, once per stage of the write (tests/killed_save.py: one
    process that imports run_glue once and forks a run per stage), each in the folder named by its stage."""
    _, command = uninterrupted_run
    root = tmp_path_factory.mktemp("killed")
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "killed_save.py"), "6", str(root),
                           ",".join(KILL_STAGES), *command],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, json.loads((root / "exits.json").read_text())


class StartingStep(TrainerCallback):
    """The global step training starts from: a resumed run's checkpoint step."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


@pytest.mark.slow
def test_a_run_killed_while_saving_a_checkpoint_resumes_to_the_same_model(uninterrupted_run, killed_runs, caplog):
    # One test over the stages: the runs they resume come from one build of the killed runs (a parametrized test
    # would build them again on each test worker that draws a stage).
    straight, command = uninterrupted_run
    root, exits = killed_runs
    expected = load_file(straight / "model.safetensors")
    for stage in KILL_STAGES:
        output = root / stage
        assert exits[stage] == -9, stage
        assert (output / "checkpoint-3").is_dir() and (output / "checkpoint-6").is_dir(), stage
        # The same command again (in this process: the kill needed one of its own, the resume does not) resumes
        # from the newest complete checkpoint and ends where the uninterrupted run did.
        caplog.clear()
        caplog.set_level("WARNING", logger="mfac_optim")
        start = StartingStep()
        run_glue.main([*command, "--output_dir", str(output)], callbacks=[start])
        skipped = re.findall(r"Skipping (\S+), which is incomplete \(([^)]*)\)", caplog.text)
        if stage == "state":
            assert skipped == [] and start.step == 6, stage
        else:
            assert [Path(folder).name for folder, _ in skipped] == ["checkpoint-6"], (stage, caplog.text[-2000:])
            assert start.step == 3, stage
        final = load_file(output / "model.safetensors")
        assert final.keys() == expected.keys() and all(torch.equal(final[key], expected[key]) for key in final), stage


# --- where run_glue.py keeps HF's behaviour: a pretrained head's label order, the model card, the push, resume -
CARD_FLAGS = ["--per_device_eval_batch_size", "64", "--max_seq_length", "32", "--report_to", "none",
         "--disable_tqdm", "true", "--save_strategy", "no"]
LABELLED_EVAL_SAMPLES = 64


def model_with_labels(tmp_path: Path, tiny_bert: Path, label2id: dict[str, int]) -> Path:
    """The tiny BERT with a classification head trained, as far as its config says, on labels `label2id`."""
    from transformers import BertForSequenceClassification

    folder = tmp_path / "labelled"
    model = BertForSequenceClassification.from_pretrained(tiny_bert)
    model.config.label2id = label2id
    model.config.id2label = {index: label for label, index in label2id.items()}
    with torch.no_grad():  # a head that does not predict one class everywhere: the label order then shows
        model.classifier.weight.normal_(0, 5, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer_config.json"):
        (folder / name).write_text((tiny_bert / name).read_text())
    return folder


def evaluate_only(tmp_path: Path, model: Path, glue_dir: Path) -> dict:
    output = tmp_path / "eval"
    run_glue.main(["--model_name_or_path", str(model), "--task_name", "sst2", "--do_eval",
                   "--validation_file", str(glue_dir / "SST-2" / "dev.tsv"), "--max_eval_samples", str(LABELLED_EVAL_SAMPLES),
                   "--output_dir", str(output), *CARD_FLAGS])
    return json.loads((output / "all_results.json").read_text())


def predicted_label_names(model_dir: Path, sentences: list[str]) -> list[str]:
    """Each sentence's predicted label, named by the model's own id2label (the reference, computed by hand)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).tolist()
    return [model.config.id2label[index] for index in predictions]


def test_pretrained_head_is_scored_with_its_own_label_order(tmp_path, tiny_bert, glue_dir):
    model = model_with_labels(tmp_path, tiny_bert, {"positive": 0, "negative": 1})  # SST-2's order reversed
    dev = glue_data.read_glue_tsv(str(glue_dir / "SST-2" / "dev.tsv"), "sst2")
    gold = [glue_data.TASK_LABELS["sst2"][label] for label in dev["label"][:LABELLED_EVAL_SAMPLES]]
    names = predicted_label_names(model, dev["sentence"][:LABELLED_EVAL_SAMPLES])
    by_name = float(np.mean([predicted == expected for predicted, expected in zip(names, gold)]))
    assert by_name not in (0.5,) and 0 < by_name < 1  # the two orders give different accuracies
    results = evaluate_only(tmp_path, model, glue_dir)
    assert results["eval_accuracy"] == pytest.approx(by_name)  # the dataset order would give 1 − by_name


def test_head_with_other_labels_warns_and_uses_the_task_order(tmp_path, tiny_bert, glue_dir, caplog):
    caplog.set_level("WARNING", logger="run_glue")
    model = model_with_labels(tmp_path, tiny_bert, {"bad": 0, "good": 1})
    dev = glue_data.read_glue_tsv(str(glue_dir / "SST-2" / "dev.tsv"), "sst2")
    logits_order = predicted_label_names(model, dev["sentence"][:LABELLED_EVAL_SAMPLES])
    by_index = float(np.mean([(name == "good") == bool(label)
                              for name, label in zip(logits_order, dev["label"][:LABELLED_EVAL_SAMPLES])]))
    results = evaluate_only(tmp_path, model, glue_dir)
    assert "Your model seems to have been trained with labels, but they don't match the dataset" in caplog.text
    assert "model labels: ['bad', 'good'], dataset labels: ['negative', 'positive']" in caplog.text
    assert results["eval_accuracy"] == pytest.approx(by_index)  # index i scored as the task's label i


def train_sst2(tmp_path: Path, tiny_bert: Path, glue_dir: Path, *extra: str) -> Path:
    output = tmp_path / "trained"
    run_glue.main(["--model_name_or_path", str(tiny_bert), "--task_name", "sst2", "--do_train", "--do_eval",
                   "--train_file", str(glue_dir / "SST-2" / "train.tsv"), "--validation_file",
                   str(glue_dir / "SST-2" / "dev.tsv"), "--max_train_samples", "32", "--max_eval_samples", "32",
                   "--per_device_train_batch_size", "16", "--seed", "7", "--output_dir", str(output), *CARD_FLAGS, *extra])
    return output


def test_model_card_names_mfac_settings_task_seed_and_dev_metrics(tmp_path, tiny_bert, glue_dir):
    output = train_sst2(tmp_path, tiny_bert, glue_dir, "--optim", "MFAC", "--optim_args",
                        '{"lr": 1e-3, "num_grads": 8, "damp": 1e-4, "grad_dtype": "bfloat16"}')
    card = (output / "README.md").read_text()
    accuracy = json.loads((output / "eval_results.json").read_text())["eval_accuracy"]
    assert "GLUE SST2" in card and "- seed: 7" in card
    assert f"- Accuracy: {accuracy:.4f}" in card
    # A local model folder is named by its record, never linked to the Hub by its path.
    assert "huggingface.co" not in card and str(tiny_bert) not in card and "base_model" not in card
    assert f"fine-tuned version of the local model `{model_source_record(str(tiny_bert))}` on" in card
    section = card[card.index("## Optimizer: M-FAC"):]
    for row in ("| lr | 0.001 |", "| num_grads | 8 |", "| damp | 0.0001 |", "| momentum | 0.0 |",
                "| weight_decay | 0.0 |", "| grad_dtype | bfloat16 |", "| shard | False |", "| density | 1.0 |"):
        assert row in section, row


def test_adamw_card_is_hfs_own(tmp_path, tiny_bert, glue_dir):
    card = (train_sst2(tmp_path, tiny_bert, glue_dir, "--optim", "adamw_torch") / "README.md").read_text()
    assert "- optimizer: Use OptimizerNames.ADAMW_TORCH with betas=(0.9,0.999)" in card and "M-FAC" not in card


def test_push_to_hub_reaches_the_push_call(tmp_path, tiny_bert, glue_dir, monkeypatch):
    from transformers import Trainer

    pushes = []
    monkeypatch.setattr(Trainer, "init_hf_repo", lambda self, token=None: None)  # no Hub here: nothing to create
    monkeypatch.setattr(Trainer, "push_to_hub", lambda self, **kwargs: pushes.append(kwargs))
    output = train_sst2(tmp_path, tiny_bert, glue_dir, "--optim", "MFAC", "--optim_args", '{"num_grads": 4}',
                        "--push_to_hub", "true", "--hub_model_id", "someone/bert-sst2-mfac")
    final = pushes[-1]
    assert final["dataset"] == "GLUE SST2" and final["dataset_args"] == "sst2"
    assert final["finetuned_from"] is None and final["local_base"] == model_source_record(str(tiny_bert))
    assert final["tasks"] == "text-classification"
    assert not (output / "README.md").exists()  # the push writes the card; here the push was patched out


def test_a_checkpoint_is_complete_only_with_its_trainer_state_and_every_processs_whole_optimizer_file(tmp_path, caplog):
    from mfac_optim.hf.checkpoints import incomplete_checkpoint_reason, last_complete_checkpoint

    def checkpoint(step: int, files: dict) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name, content in files.items():
            if content is None:
                torch.save({"state": {}}, folder / name)
            else:
                (folder / name).write_bytes(content)
        return folder

    whole = checkpoint(10, {"rank0-of-2-optimizer.pt": None, "rank1-of-2-optimizer.pt": None,
                            "trainer_state.json": b"{}"})
    assert incomplete_checkpoint_reason(whole) is None
    one_rank = checkpoint(20, {"rank0-of-2-optimizer.pt": None, "trainer_state.json": b"{}"})
    assert incomplete_checkpoint_reason(one_rank) == "no rank1-of-2-optimizer.pt"
    cut = checkpoint(30, {"optimizer.pt": None, "trainer_state.json": b"{}"})
    (cut / "optimizer.pt").write_bytes((cut / "optimizer.pt").read_bytes()[:100])
    assert incomplete_checkpoint_reason(cut) == "optimizer.pt cut short"
    assert incomplete_checkpoint_reason(checkpoint(40, {"trainer_state.json": b'{"log_hist'})) == \
        "trainer_state.json was cut short"
    assert incomplete_checkpoint_reason(checkpoint(50, {"model.safetensors": b"weights"})) == \
        "no trainer_state.json, the file the Trainer writes last"
    with caplog.at_level("WARNING", logger="mfac_optim.hf.checkpoints"):
        assert last_complete_checkpoint(str(tmp_path)) == str(whole)
    skipped = [record.getMessage() for record in caplog.records]
    assert [message.split(",")[0] for message in skipped] == [
        f"Skipping {tmp_path / f'checkpoint-{step}'}" for step in (50, 40, 30, 20)]
