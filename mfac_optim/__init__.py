"""M-FAC: matrix-free inverse empirical Fisher preconditioning (Frantar, Kurtic, Alistarh, NeurIPS 2021).

    from mfac_optim import MFAC
    optimizer = MFAC(model.parameters(), lr=1e-4, num_grads=1024, damp=1e-6)

Notation (as in docs/design.md): d parameters, a window G (m × d) of the last m gradients (empty slots are zero
rows), damp λ > 0, and the dampened empirical Fisher F = λI + (1/m) GᵀG. Each step stores the new gradient g as row
i of G and moves the parameters along u = F⁻¹g = m · Gᵀ K⁻¹ eᵢ with K = mλI + GGᵀ (m × m), a form without the
cancellation of g/λ − Gᵀ(…)/λ.

Modules: optimizer (the torch.optim plumbing), config (each setting declared once), layout (every offset), storage
and compressed (the window's storage kinds: dense, row-sparse, top-k with error feedback), window (the ring buffer
and the step's two passes), algebra (the m × m system), distributed (sharding across processes: shard=True and
FSDP2), distributed_checkpoint (loading through torch.distributed.checkpoint), memory (an upper bound before
training), kernels (the passes: compiled, Triton, torch), phases (the step's profiler ranges), hf (the HF Trainer's
`--optim MFAC`: arguments, optim_args, trainer, preflight, checkpoints, cards; they import transformers, so their
names below load on first use). The GLUE application and its experiments are the package `mfac_glue`, which imports
this one.
"""
from typing import Any

from .memory import memory_bound_bytes
from .optimizer import MFAC

# The HF Trainer glue imports transformers, and the DCP planner torch.distributed.checkpoint, which the optimizer
# alone does not need: their names load on first use.
_LAZY_NAMES = {"MFACArguments": "hf.arguments", "MFACArgumentError": "hf.optim_args",
               "MFACTrainingArguments": "hf.arguments", "MFACTrainer": "hf.trainer",
               "MFACLoadPlanner": "distributed_checkpoint"}

__all__ = ["MFAC", "MFACArgumentError", "MFACArguments", "MFACLoadPlanner", "MFACTrainer", "MFACTrainingArguments",
           "memory_bound_bytes"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
