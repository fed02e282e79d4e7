#!/usr/bin/env python
# Copyright 2020 The HuggingFace Inc. team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# Forks transformers v5.0.0: examples/pytorch/text-classification/run_glue.py at the tag v5.0.0 of
# huggingface/transformers. Changes: `--optim MFAC`, the script's dependency list, and the blocks marked
# "M-FAC fork" (their helpers live in mfac_glue and mfac_optim.hf). `bash scripts/upstream_diff.sh <transformers
# clone>` prints the tag's commit and the diff against that file.

# /// script
# dependencies = [
#     "transformers >= 5.0, < 6",
#     "accelerate >= 0.12.0",
#     "datasets >= 1.8.0",
#     "scipy",
#     "scikit-learn",
#     "torch >= 2.4",
#     "mfac-optim",
# ]
# ///

"""Finetuning the library models for sequence classification on GLUE."""
# You can also adapt this script on your own text classification task. Pointers for this are left as comments.

import logging
import os
import random
import sys
from collections import Counter

import datasets
import numpy as np
from datasets import load_dataset

import transformers
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedConfig,
    default_data_collator,
    set_seed,
)
from transformers.utils import check_min_version
from transformers.utils.versions import require_version

# M-FAC fork: the optimizer's Trainer, and what the script adds to HF's (mfac_glue), its two argument dataclasses
# included (mfac_glue.arguments: the experiments parse a command line as this script does, without importing it).
from mfac_glue.arguments import parse_arguments
from mfac_glue.command_line import check_before_loading_weights, quiet_transformers_logging
from mfac_glue.data import (GLUE_ON_THE_HUB, TASK_LABELS, TASK_TO_KEYS, first_rows_of_each_split, hub_split_name,
                            most_ids_in_a_batch, sentence_keys)
from mfac_glue.metrics import GlueMetric
from mfac_glue.model_types import hub_options, load_config, load_tokenizer
from mfac_glue.records import model_source_record, write_eval_predictions, write_run_info
from mfac_glue.trainer_callbacks import trainer_callbacks
from mfac_optim.hf.trainer import MFACTrainer
from mfac_optim.hf.preflight import examples_per_gradient


# Will error if the minimal version of Transformers is not installed. Remove at your own risks.
check_min_version("5.0.0")

require_version("datasets>=1.8.0", "To fix: pip install -r requirements.txt")  # M-FAC fork: the project's file

task_to_keys = TASK_TO_KEYS  # M-FAC fork: GLUE's sentence keys from mfac_glue, which checks local files by them

logger = logging.getLogger(__name__)


# M-FAC fork: `argv` (HF's reads sys.argv) and `callbacks` (added to the Trainer's, with those the process asked for:
# a tuning trial's pruning callback, mfac_glue.trainer_callbacks).
def main(argv=None, callbacks=None):
    # See all possible arguments in src/transformers/training_args.py
    # or by passing the --help flag to this script.
    # We now keep distinct sets of args, for a cleaner separation of concerns.

    # M-FAC fork: `--optim MFAC` (MFACTrainingArguments); the first argument may be a JSON file that later flags
    # override; local data files and model configs are read and checked here; a mistake is one line, exit status 2.
    model_args, data_args, training_args, local_datasets = parse_arguments(sys.argv[1:] if argv is None else argv)

    # Setup logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )

    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()

    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("mfac_optim").setLevel(log_level)  # M-FAC fork: the optimizer's memory, logged by its Trainer
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    # Log on each process the small summary:
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, n_gpu: {training_args.n_gpu}, "
        + f"distributed training: {training_args.parallel_mode.value == 'distributed'}, 16-bits training: {training_args.fp16}"
    )
    # M-FAC fork: the training arguments are logged after the preflight below, so that a refusal comes first.

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Get the datasets: you can either provide your own CSV/JSON training and evaluation files (see below)
    # or specify a GLUE benchmark task (the dataset will be downloaded automatically from the datasets Hub).
    #
    # For CSV/JSON files, this script will use as labels the column called 'label' and as pair of sentences the
    # sentences in columns called 'sentence1' and 'sentence2' if such column exists or the first two columns not named
    # label if at least two columns are provided.
    #
    # If the CSVs/JSONs contain only one non-label column, the script does single sentence classification on this
    # single column. You can easily tweak this behavior (see below)
    #
    # In distributed training, the load_dataset function guarantee that only one local process can concurrently
    # download the dataset.
    if local_datasets is not None:
        # M-FAC fork: local files, also with --task_name (GLUE's .tsv as distributed), read while checking arguments.
        raw_datasets = local_datasets
    elif data_args.task_name is not None:
        # Downloading and loading a dataset from the hub.
        raw_datasets = load_dataset(
            GLUE_ON_THE_HUB,  # M-FAC fork: the name of glue/data.py, which tune.py also loads from
            data_args.task_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    else:
        # Downloading and loading a dataset from the hub.
        raw_datasets = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    # See more about loading any type of standard or custom dataset at
    # https://huggingface.co/docs/datasets/loading_datasets.

    # Labels
    if data_args.task_name is not None:
        is_regression = data_args.task_name == "stsb"
        if not is_regression:
            label_list = TASK_LABELS[data_args.task_name]  # M-FAC fork: also for local files, and without a train split
            num_labels = len(label_list)
        else:
            num_labels = 1
    else:
        # Trying to have good defaults here, don't hesitate to tweak to your needs.
        is_regression = raw_datasets["train"].features["label"].dtype in ["float32", "float64"]
        if is_regression:
            num_labels = 1
        else:
            # A useful fast method:
            # https://huggingface.co/docs/datasets/package_reference/main_classes#datasets.Dataset.unique
            label_list = raw_datasets["train"].unique("label")
            label_list.sort()  # Let's sort it for determinism
            num_labels = len(label_list)

    # M-FAC fork: the --max_*_samples rows are cut before tokenizing, not after (the same rows and features; HF's
    # order tokenizes a whole training file to keep 64 of its rows), and before the memory preflight below, which
    # tokenizes the training rows kept. The labels above are still the whole training file's.
    raw_datasets = first_rows_of_each_split(raw_datasets, data_args)

    # Load pretrained model and tokenizer
    #
    # In distributed training, the .from_pretrained methods guarantee that only one local process can concurrently
    # download model & vocab.
    # M-FAC fork: a config.json without "model_type" (prajjwal1/bert-mini) gets the type transformers 4 inferred.
    # Before the weights load, LoRA's target modules are checked against the model, and an M-FAC window that cannot
    # fit in the training device's memory is refused (its embedding rows bounded by the distinct token ids a step's
    # batches of the training rows kept can hold). Config and tokenizer load quietly, so that a refusal is the first
    # line; the arguments and the config are logged after it.
    with quiet_transformers_logging():
        config = load_config(model_args, num_labels=num_labels, finetuning_task=data_args.task_name)
        tokenizer = load_tokenizer(model_args)
        preflight = check_before_loading_weights(
            config, AutoModelForSequenceClassification, model_args, training_args, data_args.max_seq_length,
            ids_per_batch=(lambda: most_ids_in_a_batch(
                raw_datasets["train"], tokenizer,
                sentence_keys(data_args.task_name, raw_datasets["train"].column_names),
                examples_per_gradient(training_args), data_args.max_seq_length))
            if training_args.do_train and "train" in raw_datasets else None,
        )
    logger.info(f"Training/evaluation parameters {training_args}")
    logger.info(f"Model config {config}")
    if model_args.model_name_or_path is None:  # M-FAC fork: random initialisation from --config_name
        logger.info(f"No --model_name_or_path: training a randomly initialised model from {model_args.config_name}")
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            **hub_options(model_args),
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    if preflight.lora is not None:  # M-FAC fork: LoRA adapters through PEFT (mfac_glue.adapters)
        model = preflight.lora.apply(model)
        model.print_trainable_parameters()

    # Preprocessing the raw_datasets
    # M-FAC fork: HF's rule for the sentence columns, shared with the check of local files before loading.
    sentence1_key, sentence2_key = sentence_keys(
        data_args.task_name, next(iter(raw_datasets.values())).column_names
    )

    # Padding strategy
    if data_args.pad_to_max_length:
        padding = "max_length"
    else:
        # We will pad later, dynamically at batch creation, to the max sequence length in each batch
        padding = False

    # Some models have set the order of the labels to use, so let's make sure we do use it.
    label_to_id = None
    if (
        model.config.label2id != PreTrainedConfig(num_labels=num_labels).label2id
        and data_args.task_name is not None
        and not is_regression
    ):
        # Some have all caps in their config, some don't.
        label_name_to_id = {k.lower(): v for k, v in model.config.label2id.items()}
        if sorted(label_name_to_id.keys()) == sorted(label_list):
            label_to_id = {i: int(label_name_to_id[label_list[i]]) for i in range(num_labels)}
        else:
            logger.warning(
                "Your model seems to have been trained with labels, but they don't match the dataset: "
                f"model labels: {sorted(label_name_to_id.keys())}, dataset labels: {sorted(label_list)}."
                "\nIgnoring the model labels as a result.",
            )
    elif data_args.task_name is None and not is_regression:
        label_to_id = {v: i for i, v in enumerate(label_list)}

    if label_to_id is not None:
        model.config.label2id = label_to_id
        model.config.id2label = {id: label for label, id in model.config.label2id.items()}
    elif data_args.task_name is not None and not is_regression:
        model.config.label2id = {l: i for i, l in enumerate(label_list)}
        model.config.id2label = {id: label for label, id in model.config.label2id.items()}

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"The max_seq_length passed ({data_args.max_seq_length}) is larger than the maximum length for the "
            f"model ({tokenizer.model_max_length}). Using max_seq_length={tokenizer.model_max_length}."
        )
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess_function(examples):
        # Tokenize the texts
        args = (
            (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key], examples[sentence2_key])
        )
        result = tokenizer(*args, padding=padding, max_length=max_seq_length, truncation=True)

        # Map labels to IDs (not necessary for GLUE tasks)
        if label_to_id is not None and "label" in examples:
            result["label"] = [(label_to_id[l] if l != -1 else -1) for l in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(
            preprocess_function,
            batched=True,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )

    def print_class_distribution(dataset, split_name):
        if is_regression:  # M-FAC fork: a regression label is a score, not a class (STS-B would log every value)
            return
        label_counts = Counter(dataset["label"])
        total = sum(label_counts.values())
        logger.info(f"Class distribution in {split_name} set:")
        for label, count in label_counts.items():
            logger.info(f"  Label {label}: {count} ({count / total:.2%})")

    if training_args.do_train:
        if "train" not in raw_datasets:
            raise ValueError("--do_train requires a train dataset")
        train_dataset = raw_datasets["train"]
        if data_args.max_train_samples is not None:
            max_train_samples = min(len(train_dataset), data_args.max_train_samples)
            train_dataset = train_dataset.select(range(max_train_samples))
        print_class_distribution(train_dataset, "train")

    if training_args.do_eval:
        # M-FAC fork: MNLI's split names from glue/data.py, where local files and tune.py take them too.
        if hub_split_name(data_args.task_name, "validation") not in raw_datasets:
            raise ValueError("--do_eval requires a validation dataset")
        eval_dataset = raw_datasets[hub_split_name(data_args.task_name, "validation")]
        if data_args.max_eval_samples is not None:
            max_eval_samples = min(len(eval_dataset), data_args.max_eval_samples)
            eval_dataset = eval_dataset.select(range(max_eval_samples))
        print_class_distribution(eval_dataset, "validation")

    # M-FAC fork: only with --do_predict (HF's script also demands a test split for any --task_name, which local
    # GLUE files without test.tsv do not have).
    if training_args.do_predict:
        if hub_split_name(data_args.task_name, "test") not in raw_datasets:
            raise ValueError("--do_predict requires a test dataset")
        predict_dataset = raw_datasets[hub_split_name(data_args.task_name, "test")]
        if data_args.max_predict_samples is not None:
            max_predict_samples = min(len(predict_dataset), data_args.max_predict_samples)
            predict_dataset = predict_dataset.select(range(max_predict_samples))
        print_class_distribution(predict_dataset, "test")

    # Log a few random samples from the training set:
    if training_args.do_train:
        for index in random.sample(range(len(train_dataset)), 3):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")

    # Get the metric function
    # M-FAC fork: computed locally (mfac_glue.metrics), under the keys of HF's `evaluate` metrics.
    metric = GlueMetric(data_args.task_name, is_regression)

    # You can define your custom compute_metrics function. It takes an `EvalPrediction` object (a namedtuple with a
    # predictions and label_ids field) and has to return a dictionary string to float.
    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        labels = p.label_ids
        if not training_args.eval_do_concat_batches:
            preds = np.concatenate(preds, axis=0)
            labels = np.concatenate(p.label_ids, axis=0)
        preds = np.squeeze(preds) if is_regression else np.argmax(preds, axis=1)
        result = metric.compute(predictions=preds, references=labels)
        if len(result) > 1:
            result["combined_score"] = np.mean(list(result.values())).item()
        return result

    # Data collator will default to DataCollatorWithPadding when the tokenizer is passed to Trainer, so we change it if
    # we already did the padding.
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    elif training_args.fp16:
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    else:
        data_collator = None

    # Initialize our Trainer
    # M-FAC fork: MFACTrainer builds M-FAC for `--optim MFAC`, and measures any optimizer's state after a step.
    trainer = MFACTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=data_collator,
        optimizer_memory_bound=preflight.optimizer_memory_bound,
        callbacks=[*(callbacks or []), *trainer_callbacks()],
    )
    # M-FAC fork: run_info.json, what scripts/compare.py groups runs by.
    if trainer.is_world_process_zero():
        write_run_info(training_args.output_dir, model_args, data_args, training_args,
                       train_examples=len(train_dataset) if training_args.do_train else None)

    # Training
    if training_args.do_train:
        checkpoint = None
        if training_args.resume_from_checkpoint is not None:
            checkpoint = training_args.resume_from_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        max_train_samples = (
            data_args.max_train_samples if data_args.max_train_samples is not None else len(train_dataset)
        )
        metrics["train_samples"] = min(max_train_samples, len(train_dataset))
        metrics["optimizer_state_bytes"] = trainer.optimizer_state_bytes  # M-FAC fork

        trainer.save_model()  # Saves the tokenizer too for easy upload

        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    # Evaluation
    if training_args.do_eval:
        logger.info("*** Evaluate ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        eval_datasets = [eval_dataset]
        # M-FAC fork: local MNLI files may come without the mismatched one.
        if data_args.task_name == "mnli" and "validation_mismatched" in raw_datasets:
            tasks.append("mnli-mm")
            valid_mm_dataset = raw_datasets["validation_mismatched"]
            if data_args.max_eval_samples is not None:
                max_eval_samples = min(len(valid_mm_dataset), data_args.max_eval_samples)
                valid_mm_dataset = valid_mm_dataset.select(range(max_eval_samples))
            eval_datasets.append(valid_mm_dataset)
        combined = {}

        for eval_dataset, task in zip(eval_datasets, tasks):
            # M-FAC fork: the per-example predictions are kept beside the metrics (eval_predictions_<task>.tsv), for
            # intervals over examples; the metrics are logged as Trainer.evaluate logs them.
            evaluation = trainer.predict(eval_dataset, metric_key_prefix="eval")
            metrics = evaluation.metrics
            trainer.log(metrics)
            if trainer.is_world_process_zero():
                write_eval_predictions(training_args.output_dir, task, evaluation.predictions, evaluation.label_ids,
                                       is_regression)

            max_eval_samples = (
                data_args.max_eval_samples if data_args.max_eval_samples is not None else len(eval_dataset)
            )
            metrics["eval_samples"] = min(max_eval_samples, len(eval_dataset))

            if task == "mnli-mm":
                metrics = {k + "_mm": v for k, v in metrics.items()}
            if task is not None and "mnli" in task:
                combined.update(metrics)

            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", combined if task is not None and "mnli" in task else metrics)

    if training_args.do_predict:
        logger.info("*** Predict ***")

        # Loop to handle MNLI double evaluation (matched, mis-matched)
        tasks = [data_args.task_name]
        predict_datasets = [predict_dataset]
        if data_args.task_name == "mnli" and "test_mismatched" in raw_datasets:  # M-FAC fork: as for evaluation
            tasks.append("mnli-mm")
            predict_datasets.append(raw_datasets["test_mismatched"])

        id2label = model.config.id2label
        for predict_dataset, task in zip(predict_datasets, tasks):
            # Removing the `label` columns because it contains -1 and Trainer won't like that.
            predict_dataset = predict_dataset.remove_columns("label")
            predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
            predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)

            output_predict_file = os.path.join(training_args.output_dir, f"predict_results_{task}.txt")
            if trainer.is_world_process_zero():
                with open(output_predict_file, "w") as writer:
                    logger.info(f"***** Predict results {task} *****")
                    writer.write("index\tprediction\n")
                    for index, item in enumerate(predictions):
                        if is_regression:
                            writer.write(f"{index}\t{item:3.3f}\n")
                        else:
                            item = id2label[item]
                            writer.write(f"{index}\t{item}\n")

    # M-FAC fork: only a Hub id is linked as the base model; a local folder is named by its record (the folder's
    # name and its weights' hash), never by its path.
    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if model_args.model_name_or_path is not None and os.path.isdir(model_args.model_name_or_path):
        kwargs.update(finetuned_from=None, local_base=model_source_record(model_args.model_name_or_path))
    if data_args.task_name is not None:
        kwargs["language"] = "en"
        kwargs["dataset_tags"] = "glue"
        kwargs["dataset_args"] = data_args.task_name
        kwargs["dataset"] = f"GLUE {data_args.task_name.upper()}"

    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


def _mp_fn(index):
    # For xla_spawn (TPUs)
    main()


if __name__ == "__main__":
    main()
