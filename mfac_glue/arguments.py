"""run_glue.py's arguments: HF's GLUE script's two dataclasses, as the script has them with the fork's changes (marked
"M-FAC fork"), and the parser that run_glue.py's main() and the experiments share. Kept here rather than in the
script, so that the experiments never import the script."""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from mfac_optim.hf.arguments import MFACTrainingArguments

from .adapters import check_lora_arguments
from .command_line import parse_and_check_inputs
from .data import TASK_TO_KEYS, check_data_arguments
from .model_types import check_model_arguments


@dataclass
class DataTrainingArguments:
    """
    Arguments pertaining to what data we are going to input our model for training and eval.

    Using `HfArgumentParser` we can turn this class
    into argparse arguments to be able to specify them on
    the command line.
    """

    task_name: str | None = field(
        default=None,
        metadata={"help": "The name of the task to train on: " + ", ".join(TASK_TO_KEYS.keys())},
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    max_seq_length: int = field(
        default=128,
        metadata={
            "help": (
                "The maximum total input sequence length after tokenization. Sequences longer "
                "than this will be truncated, sequences shorter will be padded."
            )
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Overwrite the cached preprocessed datasets or not."}
    )
    pad_to_max_length: bool = field(
        default=True,
        metadata={
            "help": (
                "Whether to pad all samples to `max_seq_length`. "
                "If False, will pad the samples dynamically when batching to the maximum length in the batch."
            )
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of training examples to this "
                "value if set."
            )
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of evaluation examples to this "
                "value if set."
            )
        },
    )
    max_predict_samples: int | None = field(
        default=None,
        metadata={
            "help": (
                "For debugging purposes or quicker training, truncate the number of prediction examples to this "
                "value if set."
            )
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "A tsv (GLUE's own), csv or json file containing the training data."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A tsv (GLUE's own), csv or json file containing the validation data."}
    )
    # M-FAC fork: MNLI's mismatched dev file, which HF reads from the Hub alone.
    validation_mismatched_file: str | None = field(
        default=None, metadata={"help": "MNLI only: the mismatched validation data (GLUE's dev_mismatched.tsv)."}
    )
    test_file: str | None = field(default=None, metadata={"help": "A tsv, csv or json file containing the test data."})

    def __post_init__(self):
        # M-FAC fork: GLUE's .tsv files too, and one error line naming the flag (mfac_glue.data).
        check_data_arguments(self)


@dataclass
class ModelArguments:
    """
    Arguments pertaining to which model/config/tokenizer we are going to fine-tune from.
    """

    # M-FAC fork: optional, so that --config_name and --tokenizer_name alone train a randomly initialised model.
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Path to pretrained model or model identifier from huggingface.co/models"}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name"}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Pretrained tokenizer name or path if not the same as model_name"}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where do you want to store the pretrained models downloaded from huggingface.co"},
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={"help": "Whether to use one of the fast tokenizer (backed by the tokenizers library) or not."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The specific model version to use (can be a branch name, tag name or commit id)."},
    )
    token: str = field(
        default=None,
        metadata={
            "help": (
                "The token to use as HTTP bearer authorization for remote files. If not specified, will use the token "
                "generated when running `hf auth login` (stored in `~/.huggingface`)."
            )
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": (
                "Whether to trust the execution of code from datasets/models defined on the Hub."
                " This option should only be set to `True` for repositories you trust and in which you have read the"
                " code, as it will execute code present on the Hub on your local machine."
            )
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Will enable to load a pretrained model whose head dimensions are different."},
    )

    # M-FAC fork: LoRA adapters through PEFT (mfac_glue.adapters).
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank: 0 (the default) trains the whole model; r > 0 trains rank-r adapters "
                                     "on --lora_target_modules, and the classification head in full."}
    )
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA's scale numerator: updates are scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapters' input, in [0, 1)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules that get adapters, by name or its last parts (BERT: query value); "
                                        "default: PEFT's for the model type."}
    )
    lora_train_pooler: str = field(
        default="auto", metadata={"help": "Train the pooler in full: true, false, or auto (when the checkpoint's "
                                          "pooler was never trained: missing, or its bias all zeros)."}
    )

    def __post_init__(self):
        check_model_arguments(self)  # M-FAC fork
        check_lora_arguments(self)  # M-FAC fork


def parse_arguments(argv: list[str]) -> tuple:
    """(model, data and training arguments, local datasets) from a command line, checked before any model loads:
    run_glue.py's main() and the experiments (tune, search_space) parse the same way."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, MFACTrainingArguments))
    return parse_and_check_inputs(parser, argv)
