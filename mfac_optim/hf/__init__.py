"""`--optim MFAC` for HF Trainer scripts: the arguments (arguments, with optim_args, the text of --optim_args),
the Trainer (trainer, with training_log, the keys it adds to the log), the memory preflight before a model loads
(preflight), checkpoints (checkpoints) and the model card's sections (cards). All but optim_args and training_log
import transformers; this package's own module imports nothing, so that those two load without it."""
