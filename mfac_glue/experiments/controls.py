"""The score a trained model must beat on a GLUE dev set, with no training at all:

    python scripts/controls.py --task_name stsb --validation_file STS-B/dev.tsv --model_name_or_path path/to/model
    python scripts/controls.py --task_name rte --train_file RTE/train.tsv --validation_file RTE/dev.tsv
    python scripts/controls.py --task_name sst2 --train_file SST-2/train.tsv --validation_file SST-2/dev.tsv \
        --model_name_or_path path/to/model

- classification: the majority class of the training file, answered for every dev example; with a model, also
  a linear probe: logistic regression (standardised features, C = 1, fixed, not tuned on dev) trained on the
  training file's frozen mean-pooled encodings (a sentence pair as u, v, |u − v|, u·v), what the checkpoint
  knows of the task without fine-tuning;
- STS-B (a constant answer has no correlation): the checkpoint's own zero-shot score, the cosine similarity of
  the two sentences' mean-pooled last hidden states (how sentence encoders such as all-MiniLM-L6-v2 are used).
Prints the metrics ×100 and, with --output, writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from .. import exit_with_usage_error
from ..data import GLUE_TSV_LAYOUTS, TASK_TO_KEYS, read_glue_tsv
from ..metrics import GlueMetric

ENCODE_BATCH = 64
PROBE_C = 1.0  # logistic regression's inverse regularisation, sklearn's default: fixed, never chosen on dev
PROBE_ITERATIONS = 2000
PROBE = "linear probe on frozen encodings"


def majority_answer(train: dict[str, list], size: int) -> np.ndarray:
    """The training file's most frequent class, once per dev example."""
    return np.full(size, Counter(train["label"]).most_common(1)[0][0])


def mean_pooled(model, tokenizer, sentences: list[str], max_length: int) -> np.ndarray:
    """Each sentence's last hidden states averaged over its tokens (padding left out). Batches take sentences of
    similar length (less padding to encode), and the rows come back in the order given."""
    import torch

    order = sorted(range(len(sentences)), key=lambda index: len(sentences[index]))
    vectors = []
    for start in range(0, len(order), ENCODE_BATCH):
        batch = tokenizer([sentences[index] for index in order[start:start + ENCODE_BATCH]], padding=True,
                          truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vectors.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    encoded = np.empty((len(sentences), vectors[0].shape[1]), dtype=vectors[0].dtype)
    encoded[order] = np.concatenate(vectors)
    return encoded


def frozen_encoder(model_path: str):
    """The checkpoint's encoder (no task head) and tokenizer, for encodings without training."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line per control, no loading bar
    return AutoModel.from_pretrained(model_path).eval(), AutoTokenizer.from_pretrained(model_path)


def zero_shot_similarity(model_path: str, dev: dict[str, list], max_length: int) -> np.ndarray:
    """Cosine similarity of each dev pair's mean-pooled encodings: the checkpoint's own STS-B answer."""
    model, tokenizer = frozen_encoder(model_path)
    first, second = (mean_pooled(model, tokenizer, dev[key], max_length) for key in TASK_TO_KEYS["stsb"])
    return (first * second).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


def probe_features(model, tokenizer, examples: dict[str, list], task: str, max_length: int) -> np.ndarray:
    """A sentence's mean-pooled encoding; for a pair (u, v), u, v, |u − v| and u·v side by side."""
    encoded = [mean_pooled(model, tokenizer, examples[key], max_length) for key in TASK_TO_KEYS[task] if key]
    if len(encoded) == 1:
        return encoded[0]
    first, second = encoded
    return np.concatenate([first, second, np.abs(first - second), first * second], axis=1)


def probe_answers(model_path: str, train: dict[str, list], dev: dict[str, list], task: str,
                  max_length: int) -> np.ndarray:
    """A logistic-regression probe on the frozen encodings, fitted on the training examples: its dev answers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model, tokenizer = frozen_encoder(model_path)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_ITERATIONS))
    probe.fit(probe_features(model, tokenizer, train, task, max_length), train["label"])
    return probe.predict(probe_features(model, tokenizer, dev, task, max_length))


def controls(task: str, train_file: Optional[str], validation_file: str, model_path: Optional[str],
             max_length: int) -> dict[str, dict[str, float]]:
    """control name -> the task's metrics on dev."""
    dev = read_glue_tsv(validation_file, task)
    labels = np.array(dev["label"])
    metric = GlueMetric(task, is_regression=task == "stsb")
    if task == "stsb":
        return {"zero-shot cosine": metric.compute(zero_shot_similarity(model_path, dev, max_length), labels)}
    train = read_glue_tsv(train_file, task)
    scores = {"majority class": metric.compute(majority_answer(train, len(labels)), labels)}
    if model_path is not None:
        scores[PROBE] = metric.compute(probe_answers(model_path, train, dev, task, max_length), labels)
    return scores


def write_controls(path: Path, task: str, scores: dict[str, dict[str, float]]) -> None:
    path.write_text(json.dumps({"task_name": task, "controls": scores}, indent=2) + "\n")


def read_controls(path: Path) -> tuple[str, dict[str, dict[str, float]]]:
    """The task and its controls (name -> metric -> score) from a file `--output` wrote; ValueError otherwise."""
    try:
        record = json.loads(path.read_text())
        task, scores = record["task_name"], record["controls"]
        return task, {name: {metric: float(value) for metric, value in metrics.items()}
                      for name, metrics in scores.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a file written by controls.py --output ({type(error).__name__}: {error})")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task_name", required=True, help=f"one of {', '.join(GLUE_TSV_LAYOUTS)}")
    parser.add_argument("--train_file", help="the task's GLUE train.tsv (classification: its majority class)")
    parser.add_argument("--validation_file", required=True, help="the task's GLUE dev.tsv")
    parser.add_argument("--model_name_or_path", help="STS-B: the checkpoint to score zero-shot; classification: "
                        "the checkpoint whose frozen encodings the linear probe reads (no probe without it)")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--output", type=Path, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    task = args.task_name.lower()
    if task not in GLUE_TSV_LAYOUTS:
        exit_with_usage_error(f"--task_name: {args.task_name!r} (allowed: {', '.join(GLUE_TSV_LAYOUTS)})")
    needed = ("--model_name_or_path", args.model_name_or_path) if task == "stsb" else ("--train_file", args.train_file)
    if needed[1] is None:
        exit_with_usage_error(f"{needed[0]}: needed for {task}'s control")
    for flag, path in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
        if path is not None and not Path(path).is_file():
            exit_with_usage_error(f"{flag}: {path} is not a file")
    scores = controls(task, args.train_file, args.validation_file, args.model_name_or_path, args.max_seq_length)
    for name, metrics in scores.items():
        print(f"{task} {name}: " + ", ".join(f"{key} {100 * value:.2f}" for key, value in metrics.items()))
    if args.output:
        write_controls(args.output, task, scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
