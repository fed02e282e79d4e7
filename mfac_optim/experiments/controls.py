"""The score a trained model must beat on a GLUE dev set, with no training at all:

    python scripts/controls.py --task_name stsb --validation_file STS-B/dev.tsv --model_name_or_path path/to/model
    python scripts/controls.py --task_name rte --train_file RTE/train.tsv --validation_file RTE/dev.tsv

- classification: the majority class of the training file, answered for every dev example;
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

from ..glue import exit_with_usage_error
from ..glue.data import GLUE_TSV_LAYOUTS, TASK_TO_KEYS, read_glue_tsv
from ..glue.metrics import GlueMetric

ENCODE_BATCH = 64


def majority_answer(train: dict[str, list], size: int) -> np.ndarray:
    """The training file's most frequent class, once per dev example."""
    return np.full(size, Counter(train["label"]).most_common(1)[0][0])


def mean_pooled(model, tokenizer, sentences: list[str], max_length: int) -> np.ndarray:
    """Each sentence's last hidden states averaged over its tokens (padding left out)."""
    import torch

    vectors = []
    for start in range(0, len(sentences), ENCODE_BATCH):
        batch = tokenizer(sentences[start:start + ENCODE_BATCH], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vectors.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(vectors)


def zero_shot_similarity(model_path: str, dev: dict[str, list], max_length: int) -> np.ndarray:
    """Cosine similarity of each dev pair's mean-pooled encodings: the checkpoint's own STS-B answer."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line per control, no loading bar
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    first, second = (mean_pooled(model, tokenizer, dev[key], max_length) for key in TASK_TO_KEYS["stsb"])
    return (first * second).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


def controls(task: str, train_file: Optional[str], validation_file: str, model_path: Optional[str],
             max_length: int) -> dict[str, dict[str, float]]:
    """control name -> the task's metrics on dev."""
    dev = read_glue_tsv(validation_file, task)
    labels = np.array(dev["label"])
    metric = GlueMetric(task, is_regression=task == "stsb")
    if task == "stsb":
        return {"zero-shot cosine": metric.compute(zero_shot_similarity(model_path, dev, max_length), labels)}
    return {"majority class": metric.compute(majority_answer(read_glue_tsv(train_file, task), len(labels)), labels)}


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
    parser.add_argument("--model_name_or_path", help="STS-B: the checkpoint to score zero-shot")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--output", type=Path, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    task = args.task_name.lower()
    if task not in GLUE_TSV_LAYOUTS:
        exit_with_usage_error(f"--task_name: {args.task_name!r} (allowed: {', '.join(GLUE_TSV_LAYOUTS)})")
    needed = ("--model_name_or_path", args.model_name_or_path) if task == "stsb" else ("--train_file", args.train_file)
    if needed[1] is None:
        exit_with_usage_error(f"{needed[0]}: needed for {task}'s control")
    if task != "stsb" and args.model_name_or_path is not None:
        exit_with_usage_error("--model_name_or_path: only STS-B's control (zero-shot) reads a model")
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
