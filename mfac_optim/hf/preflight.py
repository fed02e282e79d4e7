"""The memory preflight: before a model loads, an upper bound of M-FAC's memory per process from the model's config
and the arguments, and the refusal of a window that cannot fit in the training device's free memory."""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from ..memory import memory_bound_bytes
from .arguments import MFAC_NAME
from .optim_args import MFACArgumentError


def mfac_memory_bound(config, model_class, training_args, tokens_per_example: int,
                      trust_remote_code: bool = False,
                      adapt: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
                      ids_per_batch: Optional[int] = None) -> Optional[int]:
    """For --optim MFAC, an upper bound of the optimizer's bytes in each process, from the shapes of the parameters
    that train in `model_class.from_config(config)` (built on the meta device: no weights, no memory), after
    `adapt` if given (adapters: only they and the modules trained in full), and the M-FAC arguments; None for
    other optimizers. Embedding rows stored per gradient are bounded by what one batch can hold, unless weight
    decay makes the embedding gradients dense: a position embedding (as many rows as the config's
    max_position_embeddings) by the tokens of one example, any other by the tokens of one step's batches, or by
    `ids_per_batch`, the most distinct ids those batches of the training data can hold, where the caller counted
    them."""
    if training_args.optim != MFAC_NAME:
        return None
    with torch.device("meta"):
        model = model_class.from_config(config, trust_remote_code=trust_remote_code)
        if adapt is not None:
            model = adapt(model)
    arguments = training_args.mfac
    # One optimizer step's gradient sums the micro-batches of an accumulation.
    tokens_per_batch = examples_per_gradient(training_args) * tokens_per_example
    token_rows = tokens_per_batch if ids_per_batch is None else min(ids_per_batch, tokens_per_batch)
    positions = getattr(config, "max_position_embeddings", None)
    embedding_rows = {} if arguments.weight_decay > 0 else {
        id(module.weight): min(module.num_embeddings,
                               tokens_per_example if module.num_embeddings == positions else token_rows)
        for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    return memory_bound_bytes([p.shape for p in params],
                              {i: embedding_rows[id(p)] for i, p in enumerate(params) if id(p) in embedding_rows},
                              arguments.num_grads, arguments.grad_dtype, arguments.momentum > 0,
                              training_args.world_size if arguments.shard else 1, arguments.density)


def examples_per_gradient(training_args) -> int:
    """The training examples one process's optimizer step sees: its batch times the accumulation steps."""
    return training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps


def check_mfac_fits(bound: int, training_args) -> None:
    """Refuses, before the weights load, an M-FAC window that cannot fit in the training device's free memory."""
    where, available = available_memory(training_args)
    if available is None or bound <= available:
        return
    advice = "use a smaller num_grads"
    if training_args.mfac.grad_dtype == "float32":
        advice += ' or "grad_dtype": "bfloat16"'
    raise MFACArgumentError(f"--optim_args: M-FAC with num_grads={training_args.mfac.num_grads} needs up to "
                            f"{bound / 2**30:.2f} GiB per process for this model, but {where} has "
                            f"{available / 2**30:.2f} GiB available: {advice}")


def available_memory(training_args) -> tuple[str, Optional[int]]:
    """(what, free bytes) of the training device for one process: a GPU's free memory, or the machine's available
    RAM shared by the processes launched on it; None where it cannot be asked."""
    device = training_args.device
    if device.type == "cuda":
        return f"GPU {device}", torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil

        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        share = f" (shared by {local_processes} processes)" if local_processes > 1 else ""
        return f"this machine's RAM{share}", psutil.virtual_memory().available // local_processes
    return str(device), None
