"""The window passes in plain torch, on any device and in any accumulation dtype: what serves where the compiled CPU
kernels and the Triton kernels do not apply (float64 sums, a float16 window on the CPU, a GPU without Triton, a
machine without a compiler). `TorchPasses` has the compiled module's function names and signatures, so a window
picks its backend once and its storage parts call it without knowing which it is. Sums of one block are
accumulated in the accumulation dtype and the blocks summed in float64, which bounds the rounding error by the
block length rather than by d.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

# Columns per block of the dense passes.
BLOCK_COLUMNS = 1 << 16
# Slots per gather of the row-sparse and compressed passes: bounds their temporaries (slots × stored entries).
SLOTS_PER_CHUNK = 64


def slot_chunks(filled: int, per_chunk: int = SLOTS_PER_CHUNK) -> Iterator[slice]:
    """The first `filled` slots in runs of at most `per_chunk`: what a pass takes at a time."""
    for start in range(0, filled, per_chunk):
        yield slice(start, min(start + per_chunk, filled))


def compressed_select(error: Tensor, values: Tensor, offsets: Tensor, slot: int, block: int, last_kept: int,
                      size: int) -> None:
    """Slot `slot` of the (blocks, m, kept) compressed window keeps each block's largest |error| (a last block
    short of `block` coordinates: its `last_kept` largest among its real ones, then distinct padding positions past
    them), rounded to the window's dtype, in ascending positions; the error keeps what was not stored."""
    accumulated = error.view(-1, block)
    kept = torch.topk(accumulated.abs(), values.shape[2], dim=1, sorted=False).indices
    if size < accumulated.numel():
        real = size - (accumulated.shape[0] - 1) * block
        chosen = torch.topk(accumulated[-1, :real].abs(), last_kept, sorted=False).indices
        padding = torch.arange(real, real + values.shape[2] - last_kept, device=chosen.device)
        kept[-1] = torch.cat([chosen, padding])
    kept = kept.sort(dim=1).values
    exact = accumulated.gather(1, kept)  # zero at the padding positions: past the window's end, e stays 0
    rounded = exact.to(values.dtype)
    values[:, slot] = rounded
    offsets[:, slot] = kept.to(torch.int16)
    accumulated.scatter_(1, kept, exact - rounded.float())  # what rounding left behind stays in the error


class TorchPasses:
    """The passes of every storage kind, summing in `accumulate_dtype` (fp32, or float64 where the window is
    nearly rank-deficient or the parameters are float64). Outputs are written into the caller's `result` buffers,
    in the accumulation dtype."""

    compressed_select = staticmethod(compressed_select)

    def __init__(self, accumulate_dtype: torch.dtype) -> None:
        self.accumulate_dtype = accumulate_dtype
        # A block of the dense window converted to the accumulation dtype, reused: fresh allocations of this size
        # cost more in page faults than the conversion.
        self._block_buffer: Optional[Tensor] = None

    def buffer_bytes(self) -> int:
        block = self._block_buffer
        return 0 if block is None else block.numel() * block.element_size()

    # ------------------------------------------------------------------------------------- dense rows
    def window_dots(self, window: Tensor, slot: int) -> Tensor:
        """G ĝ in float64 over the (filled, n) rows, ĝ = row `slot`."""
        stored = window[slot]
        dots = torch.zeros(window.shape[0], dtype=torch.float64, device=window.device)
        for columns, block in self._column_blocks(window):
            dots += torch.mv(block, stored[columns].to(self.accumulate_dtype))
        return dots

    def window_combine(self, window: Tensor, coefficients: Tensor, result: Tensor) -> None:
        """result = Gᵀc over the (filled, n) rows."""
        coefficients = coefficients.to(self.accumulate_dtype)
        for columns, block in self._column_blocks(window):
            result[columns] = torch.mv(block.t(), coefficients)

    def _column_blocks(self, window: Tensor) -> Iterator[tuple[slice, Tensor]]:
        for start in range(0, window.shape[1], BLOCK_COLUMNS):
            columns = slice(start, start + BLOCK_COLUMNS)
            block = window[:, columns]
            if block.dtype != self.accumulate_dtype:
                rows, width = window.shape[0], min(BLOCK_COLUMNS, window.shape[1])
                buffer = self._block_buffer
                if buffer is None or buffer.shape[0] < rows or buffer.shape[1] < width or buffer.device != window.device:
                    buffer = self._block_buffer = torch.empty(rows, width, dtype=self.accumulate_dtype,
                                                              device=window.device)
                block = buffer[:rows, :block.shape[1]].copy_(block)
            yield columns, block

    # ------------------------------------------------------------------------------------- row-sparse rows
    def sparse_dots(self, indices: Tensor, values: Tensor, new: Tensor) -> Tensor:
        """s_j = Σ over slot j's stored rows of ⟨row values, new[row index]⟩, in float64, for the (filled,
        capacity) row indices and (filled, capacity, columns) values."""
        dots = torch.empty(indices.shape[0], dtype=torch.float64, device=values.device)
        for chunk in slot_chunks(indices.shape[0]):
            products = new[indices[chunk]] * values[chunk].to(self.accumulate_dtype)
            dots[chunk] = products.sum(dim=(1, 2), dtype=torch.float64)
        return dots

    def sparse_combine(self, indices: Tensor, values: Tensor, coefficients: Tensor, result: Tensor) -> None:
        """result (rows × columns) = Σ_j c_j · slot j scattered into rows."""
        result.zero_()
        coefficients = coefficients.to(self.accumulate_dtype)
        with adding_in_a_fixed_order(values.device):
            for chunk in slot_chunks(indices.shape[0]):
                scaled = values[chunk].to(self.accumulate_dtype) * coefficients[chunk, None, None]
                result.index_add_(0, indices[chunk].reshape(-1), scaled.reshape(-1, values.shape[2]))

    # ------------------------------------------------------------------------------------- compressed rows
    @staticmethod
    def compressed_dots(values: Tensor, offsets: Tensor, slot: int, block: int, filled: int) -> Tensor:
        """⟨slot j, slot `slot`⟩ for the first `filled` slots of the (blocks, m, kept) window, in float64."""
        new = torch.zeros(values.shape[0], block, dtype=torch.float64, device=values.device)
        new.scatter_(1, offsets[:, slot].long(), values[:, slot].double())
        dots = torch.empty(filled, dtype=torch.float64, device=values.device)
        for chunk in slot_chunks(filled):
            chunk_offsets, chunk_values = offsets[:, chunk], values[:, chunk]
            gathered = new.gather(1, chunk_offsets.long().reshape(offsets.shape[0], -1)).view(chunk_offsets.shape)
            dots[chunk] = (gathered * chunk_values.double()).sum(dim=(0, 2))
        return dots

    def compressed_combine(self, values: Tensor, offsets: Tensor, coefficients: Tensor, result: Tensor, block: int,
                           filled: int) -> None:
        """result (blocks · block) = Σ_j c_j · slot j over the first `filled` slots."""
        by_block = result.view(values.shape[0], block).zero_()
        coefficients = coefficients.to(self.accumulate_dtype)
        with adding_in_a_fixed_order(values.device):
            for chunk in slot_chunks(filled):
                chunk_offsets, chunk_values = offsets[:, chunk], values[:, chunk]
                scaled = chunk_values.to(self.accumulate_dtype) * coefficients[chunk][None, :, None]
                by_block.scatter_add_(1, chunk_offsets.long().reshape(values.shape[0], -1),
                                      scaled.reshape(values.shape[0], -1))


@contextmanager
def adding_in_a_fixed_order(device: torch.device) -> Iterator[None]:
    """index_add_ and scatter_add_ on CUDA add with float atomics, in no fixed order, unless deterministic
    algorithms are on: they are, for a combine (then restored), so that a resumed run repeats it bit for bit.
    Elsewhere it changes nothing. Only a GPU without Triton gets here, and slowly: this index_add_ sorts and
    serialises repeated rows (about 170 ms a step on bert-mini on an H100, against a few ms for the Triton
    combine)."""
    if device.type != "cuda":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
