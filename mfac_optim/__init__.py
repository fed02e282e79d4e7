"""M-FAC: matrix-free inverse empirical Fisher preconditioning (Frantar, Kurtic, Alistarh, NeurIPS 2021).

    from mfac_optim import MFAC
    optimizer = MFAC(model.parameters(), lr=1e-4, num_grads=1024, damp=1e-6)

Notation (as in docs/design.md): d parameters, a window G (m × d) of the last m gradients (empty slots are zero
rows), damp λ > 0, and the dampened empirical Fisher F = λI + (1/m) GᵀG. Each step stores the new gradient g as row
i of G and moves the parameters along u = F⁻¹g = m · Gᵀ K⁻¹ eᵢ with K = mλI + GGᵀ (m × m), a form without the
cancellation of g/λ − Gᵀ(…)/λ.

Modules: optimizer (the torch.optim plumbing), layout (every offset), storage and compressed (the window's
storage kinds: dense, row-sparse, top-k with error feedback), window (the ring buffer and the step's two passes),
algebra (the m × m system), distributed (sharding across processes), memory (an upper bound before training),
kernels (compiled passes), hf_arguments and hf_trainer (the HF Trainer's `--optim MFAC`; they import
transformers, so they are not imported here).
"""
from .hyperparameters import GRAD_DTYPES, resolve_grad_dtype
from .memory import memory_bound_bytes
from .optimizer import MFAC

__all__ = ["GRAD_DTYPES", "MFAC", "memory_bound_bytes", "resolve_grad_dtype"]
