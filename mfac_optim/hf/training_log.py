"""The keys the HF Trainer glue adds to the Trainer's log history (trainer.TrainingClock), apart from it so that
the tools that read a kept history (compare) do not import transformers to find them."""

TRAIN_SECONDS = "train_seconds"  # an evaluation's log entry: training time up to it, evaluations excluded
LOAD_AVERAGE = "load_average"  # the machine's 1-minute load average at that entry
