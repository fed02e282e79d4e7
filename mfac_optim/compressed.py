"""The compressed window: top-k with error feedback (Modoranu et al., "Error Feedback Can Accurately Compress
Preconditioners", ICML 2024; see docs/design.md).

Per step, over this process's local gradient g: a = e + g (e: the error, fp32, zero at first); c keeps, in every
block of BLOCK coordinates, the max(1, ⌈density · n⌉) entries of largest |a|, n being the coordinates the block
really holds (fewer in the last block, and in a window smaller than a block), rounded to the window dtype;
e ← a − c. So the stored
rows plus e add up to the sum of all gradients (the subtraction is exact in fp32). c is stored as slot i, and the
step is F⁻¹c over the stored rows, u = m · Cᵀ K⁻¹ eᵢ, exactly as for the dense window.

Storage is block-major, (blocks, m, kept), with int16 offsets inside a block: a pass visits one block's entries of
every slot together and gathers from (dots) or scatters into (combine) one block-sized buffer that stays in cache.
The passes are the window's backend's (kernels.passes_for): the fused kernels of kernels/cpu_passes.cpp on the CPU,
Triton's dots and deterministic combine on a GPU (with torch's top-k), or the torch passes of
kernels/torch_passes.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import huge_pages
from .phases import phase
from .storage import PartPlan, StateEntry, StoredPart, tensor_bytes

# Coordinates per block: int16 offsets address 0 … 32767, so every position of a block fits.
BLOCK = 1 << 15


def num_blocks(size: int) -> int:
    return max(1, -(-size // BLOCK))


def kept_of(density: float, coordinates: int) -> int:
    """Entries a block of `coordinates` real coordinates keeps."""
    return max(1, math.ceil(density * coordinates))


def kept_per_block(density: float, size: int) -> int:
    """The entries a slot stores per block of a window over `size` coordinates: a full block's share (a window
    smaller than one block is its only block)."""
    return kept_of(density, min(size, BLOCK))


def last_block_size(size: int) -> int:
    """The coordinates the last block of a window over `size` coordinates really holds."""
    return size - (num_blocks(size) - 1) * BLOCK


def kept_in_last_block(density: float, size: int) -> int:
    """The last block's share of its real coordinates: its storage has room for a full block's, the rest of
    which holds zeros at positions past the window's end."""
    return kept_of(density, last_block_size(size))


class CompressedRows(StoredPart):
    """The window over `size` local coordinates (zero-padded to whole blocks) as top-k entries per block per slot,
    and the error buffer of the error feedback, in the window's state dict. Same interface as the other storage
    kinds (storage.py); `plan.columns` is the window's local size."""

    KEYS = ("compressed_values", "compressed_offsets", "error")

    def __init__(self, state: dict[str, Tensor], plan: PartPlan, passes) -> None:
        # (blocks, m, kept) values in the window dtype, their int16 offsets (ascending within a slot's block), and
        # the (blocks · BLOCK,) fp32 error.
        self._state = state
        self.size = plan.columns
        self.last_kept = kept_in_last_block(plan.density, plan.columns)
        self.accumulate_dtype = plan.accumulate_dtype
        self._passes = passes
        self._result: Optional[Tensor] = None  # the combine's output, reused (page faults otherwise)

    @classmethod
    def allocate(cls, plan: PartPlan, state: dict[str, Tensor], device: torch.device, passes) -> CompressedRows:
        blocks, kept = num_blocks(plan.columns), kept_per_block(plan.density, plan.columns)
        state["compressed_values"] = huge_pages.zeros((blocks, plan.num_grads, kept), dtype=plan.dtype,
                                                     device=device)
        # Empty slots point at distinct positions (their values are zero): had they all pointed at one, the combine
        # pass would chain its read-modify-writes through that single address.
        state["compressed_offsets"] = torch.arange(kept, dtype=torch.int16, device=device).repeat(
            blocks, plan.num_grads, 1)
        state["error"] = torch.zeros(blocks * BLOCK, dtype=torch.float32, device=device)
        return cls(state, plan, passes)

    @staticmethod
    def bound_bytes(plan: PartPlan) -> int:
        """Values and int16 offsets of the kept entries, the fp32 error buffer and the combine's result, both over
        whole blocks."""
        blocks = num_blocks(plan.columns)
        return blocks * plan.num_grads * kept_per_block(plan.density, plan.columns) * (plan.element_size + 2) + \
            (4 + plan.accumulate_size) * blocks * BLOCK

    values = StateEntry("compressed_values")
    offsets = StateEntry("compressed_offsets")
    error = StateEntry("error")

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def covers(self, columns: int) -> bool:
        return self.values.shape[0] == num_blocks(columns)

    @property
    def kept(self) -> int:
        """Entries a slot stores per block."""
        return self.values.shape[2]

    @property
    def num_grads(self) -> int:
        return self.values.shape[1]

    def memory_bytes(self) -> int:
        return tensor_bytes(self.values, self.offsets, self.error, self._result)

    def store(self, slot: int, grad: Tensor) -> bool:
        """a = e + g (the error feedback); slot `slot` keeps each block's largest |a|, rounded; e ← a − c. All in
        the error buffer."""
        with phase("error feedback"):
            self.error[:self.size] += grad
        with phase("top-k"):
            self._passes.compressed_select(self.error, self.values, self.offsets, slot, BLOCK, self.last_kept,
                                           self.size)
        return True

    def dots(self, slot: int, filled: int) -> Tensor:
        """⟨c_j, c_slot⟩ for the first `filled` slots j, accumulated in float64: the kept entries span the gradient's
        whole dynamic range, so fp32 sums of their products lose digits in the Gram matrix, and with few entries
        per block the float64 arithmetic costs little next to the gathers."""
        return self._passes.compressed_dots(self.values, self.offsets, slot, BLOCK, filled)

    def combine(self, coefficients: Tensor) -> Tensor:
        """Σ_j c_j · slot j over the first len(c) slots, over the local coordinates, in the accumulation dtype (a
        buffer the next call overwrites)."""
        if self._result is None:
            self._result = torch.empty(self.error.numel(), dtype=self.accumulate_dtype, device=self.values.device)
        self._passes.compressed_combine(self.values, self.offsets, coefficients.to(self.accumulate_dtype),
                                        self._result, BLOCK, len(coefficients))
        return self._result[:self.size]

    def to_dense(self) -> Tensor:
        """The stored rows as an (m, size) fp32 matrix, exactly."""
        values = self.values
        blocks, m, kept = values.shape
        dense = torch.zeros(m, blocks, BLOCK, dtype=torch.float32, device=values.device)
        dense.scatter_(2, self.offsets.long().permute(1, 0, 2), values.float().permute(1, 0, 2))
        return dense.reshape(m, -1)[:, :self.size]
