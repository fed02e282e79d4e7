"""run_glue.py keeps the behaviour of HF's script where ours once differed: a pretrained head's own label order, and
the model card (or the push to the Hub) at the end, with M-FAC's settings on the card."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import run_glue
from mfac_optim.glue import data as glue_data
from mfac_optim.glue.records import model_source_record

QUICK = ["--per_device_eval_batch_size", "64", "--max_seq_length", "32", "--report_to", "none",
         "--disable_tqdm", "true", "--save_strategy", "no"]
EVAL_SAMPLES = 64


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
                   "--validation_file", str(glue_dir / "SST-2" / "dev.tsv"), "--max_eval_samples", str(EVAL_SAMPLES),
                   "--output_dir", str(output), *QUICK])
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
    gold = [glue_data.TASK_LABELS["sst2"][label] for label in dev["label"][:EVAL_SAMPLES]]
    names = predicted_label_names(model, dev["sentence"][:EVAL_SAMPLES])
    by_name = float(np.mean([predicted == expected for predicted, expected in zip(names, gold)]))
    assert by_name not in (0.5,) and 0 < by_name < 1  # the two orders give different accuracies
    results = evaluate_only(tmp_path, model, glue_dir)
    assert results["eval_accuracy"] == pytest.approx(by_name)  # the dataset order would give 1 − by_name


def test_head_with_other_labels_warns_and_uses_the_task_order(tmp_path, tiny_bert, glue_dir, caplog):
    caplog.set_level("WARNING", logger="run_glue")
    model = model_with_labels(tmp_path, tiny_bert, {"bad": 0, "good": 1})
    dev = glue_data.read_glue_tsv(str(glue_dir / "SST-2" / "dev.tsv"), "sst2")
    logits_order = predicted_label_names(model, dev["sentence"][:EVAL_SAMPLES])
    by_index = float(np.mean([(name == "good") == bool(label)
                              for name, label in zip(logits_order, dev["label"][:EVAL_SAMPLES])]))
    results = evaluate_only(tmp_path, model, glue_dir)
    assert "Your model seems to have been trained with labels, but they don't match the dataset" in caplog.text
    assert "model labels: ['bad', 'good'], dataset labels: ['negative', 'positive']" in caplog.text
    assert results["eval_accuracy"] == pytest.approx(by_index)  # index i scored as the task's label i


def train_sst2(tmp_path: Path, tiny_bert: Path, glue_dir: Path, *extra: str) -> Path:
    output = tmp_path / "trained"
    run_glue.main(["--model_name_or_path", str(tiny_bert), "--task_name", "sst2", "--do_train", "--do_eval",
                   "--train_file", str(glue_dir / "SST-2" / "train.tsv"), "--validation_file",
                   str(glue_dir / "SST-2" / "dev.tsv"), "--max_train_samples", "32", "--max_eval_samples", "32",
                   "--per_device_train_batch_size", "16", "--seed", "7", "--output_dir", str(output), *QUICK, *extra])
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
    from mfac_optim.hf_trainer import incomplete_checkpoint_reason, last_complete_checkpoint

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
    with caplog.at_level("WARNING", logger="mfac_optim.hf_trainer"):
        assert last_complete_checkpoint(str(tmp_path)) == str(whole)
    skipped = [record.getMessage() for record in caplog.records]
    assert [message.split(",")[0] for message in skipped] == [
        f"Skipping {tmp_path / f'checkpoint-{step}'}" for step in (50, 40, 30, 20)]
