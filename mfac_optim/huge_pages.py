"""The window's large CPU tensors on transparent huge pages.

A dense pass reads every slot's row in segments a whole row length apart, so with 4 KiB pages nearly every segment
starts on a page the TLB does not hold and a stream the prefetcher has to start again. On Linux with transparent
huge pages in "madvise" mode (a common default) memory is put on 2 MiB pages only where it is asked for, before it
is first touched. Asked for, the window's two passes read 10–15% faster on this project's CPU machine
(docs/benchmarks.md). Where the request is refused (another system, huge pages off), the tensor is the same, on
4 KiB pages. The window's parts are made here, and so are the tensors a distributed checkpoint loads into; a window
read by `torch.load` keeps the pages it was read into (moving it would need a second copy of it).
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from typing import Callable, Optional, Sequence

import torch

MADV_HUGEPAGE = 14  # <linux/mman.h>
HUGE_PAGE_BYTES = 2 << 20  # smaller tensors could not fill one huge page


def empty(shape: Sequence[int], dtype: torch.dtype, device: Optional[torch.device] = None) -> torch.Tensor:
    """`torch.empty(shape)`, on torch's default device unless `device` is given; on the CPU, a tensor of at least
    one huge page is asked onto huge pages."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.device.type == "cpu" and tensor.nbytes >= HUGE_PAGE_BYTES:
        ask_for_huge_pages(tensor)
    return tensor


def zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros(shape)`, asked onto huge pages as `empty` asks before its first touch."""
    return empty(shape, dtype=dtype, device=device).zero_()


def ask_for_huge_pages(tensor: torch.Tensor) -> bool:
    """Advises the kernel to back the whole pages of `tensor`'s memory with huge pages; True if it accepted."""
    madvise = libc_madvise()
    if madvise is None:
        return False
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    return last > first and madvise(first, last - first, MADV_HUGEPAGE) == 0


@functools.cache
def libc_madvise() -> Optional[Callable[[int, int, int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise
