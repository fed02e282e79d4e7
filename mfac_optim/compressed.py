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
The torch passes here are device-generic; on the CPU the fused kernels (kernels/cpu_passes.cpp) serve instead, and
on a GPU the dots and a deterministic combine are Triton kernels (kernels/triton_passes.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .kernels import fused_passes_for, triton_passes_for
from .phases import phase
from .storage import slot_chunks, tensor_bytes

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


class CompressedRows:
    """The window over `size` local coordinates (zero-padded to whole blocks) as top-k entries per block per slot,
    and the error buffer of the error feedback. Same interface as the other storage kinds (storage.py)."""

    # Slots per gather/scatter in the torch passes: bounds their temporaries (blocks × slots × kept).
    SLOTS_PER_CHUNK = 64

    def __init__(self, values: Tensor, offsets: Tensor, error: Tensor, size: int, density: float,
                 accumulate_dtype: torch.dtype) -> None:
        self.values = values  # (blocks, m, kept), window dtype
        self.offsets = offsets  # (blocks, m, kept) int16, ascending within a slot's block
        self.error = error  # (blocks · BLOCK,) fp32
        self.size = size
        self.last_kept = kept_in_last_block(density, size)
        self.accumulate_dtype = accumulate_dtype
        self._fused = fused_passes_for(values, accumulate_dtype)
        # On a GPU the dots and the combine are Triton kernels: the torch combine (scatter_add_) would add with float
        # atomics there, in no fixed order.
        self._triton = triton_passes_for(values, accumulate_dtype)
        self._result: Optional[Tensor] = None  # the fused combine's output, reused (page faults otherwise)

    @classmethod
    def allocate(cls, num_grads: int, size: int, density: float, dtype: torch.dtype, accumulate_dtype: torch.dtype,
                 device: torch.device) -> CompressedRows:
        blocks, kept = num_blocks(size), kept_per_block(density, size)
        values = torch.zeros(blocks, num_grads, kept, dtype=dtype, device=device)
        # Empty slots point at distinct positions (their values are zero): had they all pointed at one, the combine
        # pass would chain its read-modify-writes through that single address.
        offsets = torch.arange(kept, dtype=torch.int16, device=device).repeat(blocks, num_grads, 1)
        error = torch.zeros(blocks * BLOCK, dtype=torch.float32, device=device)
        return cls(values, offsets, error, size, density, accumulate_dtype)

    @classmethod
    def from_state(cls, saved: dict[str, Tensor], size: int, density: float,
                   accumulate_dtype: torch.dtype) -> CompressedRows:
        return cls(saved["compressed_values"], saved["compressed_offsets"], saved["error"], size, density,
                   accumulate_dtype)

    def state(self) -> dict[str, Tensor]:
        return {"compressed_values": self.values, "compressed_offsets": self.offsets, "error": self.error}

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

    @staticmethod
    def bound_bytes(num_grads: int, size: int, density: float, element_size: int) -> int:
        """Values and int16 offsets of the kept entries, the fp32 error buffer and the combine's result, both over
        whole blocks."""
        blocks = num_blocks(size)
        return blocks * num_grads * kept_per_block(density, size) * (element_size + 2) + 2 * 4 * blocks * BLOCK

    def memory_bytes(self) -> int:
        return tensor_bytes(self.values, self.offsets, self.error, self._result)

    def store(self, slot: int, grad: Tensor) -> bool:
        """a = e + g (the error feedback); slot `slot` keeps each block's largest |a|, rounded; e ← a − c. All in
        the error buffer."""
        with phase("error feedback"):
            self.error[:self.size] += grad
        with phase("top-k"):
            if self._fused is not None:
                self._fused.compressed_select(self.error, self.values, self.offsets, slot, BLOCK, self.last_kept,
                                              self.size)
            else:
                self._select(slot)
        return True

    def _select(self, slot: int) -> None:
        accumulated = self.error.view(-1, BLOCK)
        kept = torch.topk(accumulated.abs(), self.values.shape[2], dim=1, sorted=False).indices
        if self.size < accumulated.numel():  # a last block short of BLOCK: only its real coordinates compete
            kept[-1] = self._last_block_positions(accumulated[-1])
        kept = kept.sort(dim=1).values
        exact = accumulated.gather(1, kept)  # zero at the padding positions: past the window's end, e stays 0
        rounded = exact.to(self.values.dtype)
        self.values[:, slot] = rounded
        self.offsets[:, slot] = kept.to(torch.int16)
        accumulated.scatter_(1, kept, exact - rounded.float())  # what rounding left behind stays in the error

    def _last_block_positions(self, accumulated: Tensor) -> Tensor:
        """The last block's largest |a| among its real coordinates, then distinct padding positions past them."""
        real = last_block_size(self.size)
        chosen = torch.topk(accumulated[:real].abs(), self.last_kept, sorted=False).indices
        padding = torch.arange(real, real + self.values.shape[2] - self.last_kept, device=chosen.device)
        return torch.cat([chosen, padding])

    def dots(self, slot: int, filled: int) -> Tensor:
        """⟨c_j, c_slot⟩ for the first `filled` slots j, accumulated in float64: the kept entries span the gradient's
        whole dynamic range, so fp32 sums of their products lose digits in the Gram matrix, and with few entries
        per block the float64 arithmetic costs little next to the gathers."""
        kernels = self._fused or self._triton
        if kernels is not None:
            return kernels.compressed_dots(self.values, self.offsets, slot, BLOCK, filled)
        new = torch.zeros(self.values.shape[0], BLOCK, dtype=torch.float64, device=self.values.device)
        new.scatter_(1, self.offsets[:, slot].long(), self.values[:, slot].double())
        dots = torch.empty(filled, dtype=torch.float64, device=self.values.device)
        for chunk in slot_chunks(filled, self.SLOTS_PER_CHUNK):
            offsets, values = self.offsets[:, chunk], self.values[:, chunk]
            gathered = new.gather(1, offsets.long().reshape(offsets.shape[0], -1)).view(offsets.shape)
            dots[chunk] = (gathered * values.double()).sum(dim=(0, 2))
        return dots

    def combine(self, coefficients: Tensor) -> Tensor:
        """Σ_j c_j · slot j over the first len(c) slots, over the local coordinates, in fp32."""
        filled = len(coefficients)
        kernels = self._fused or self._triton
        if kernels is not None:
            if self._result is None:
                self._result = torch.empty(self.error.numel(), dtype=torch.float32, device=self.values.device)
            kernels.compressed_combine(self.values, self.offsets, coefficients.float(), self._result, BLOCK, filled)
            return self._result[:self.size]
        result = torch.zeros(self.values.shape[0], BLOCK, dtype=self.accumulate_dtype, device=self.values.device)
        coefficients = coefficients.to(self.accumulate_dtype)
        for chunk in slot_chunks(filled, self.SLOTS_PER_CHUNK):
            offsets, values = self.offsets[:, chunk], self.values[:, chunk]
            scaled = values.to(self.accumulate_dtype) * coefficients[chunk][None, :, None]
            result.scatter_add_(1, offsets.long().reshape(offsets.shape[0], -1), scaled.reshape(offsets.shape[0], -1))
        return result.view(-1)[:self.size].float()

    def to_dense(self) -> Tensor:
        """The stored rows as an (m, size) fp32 matrix, exactly."""
        blocks, m, kept = self.values.shape
        dense = torch.zeros(m, blocks, BLOCK, dtype=torch.float32, device=self.values.device)
        dense.scatter_(2, self.offsets.long().permute(1, 0, 2), self.values.float().permute(1, 0, 2))
        return dense.reshape(m, -1)[:, :self.size]
