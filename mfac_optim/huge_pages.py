"""The window's large CPU tensors on transparent huge pages.

A dense pass reads every slot's row in segments a whole row length apart, so with 4 KiB pages nearly every segment
starts on a page the TLB does not hold and a stream the prefetcher has to start again. On Linux with transparent
huge pages in "madvise" mode (a common default) memory is put on 2 MiB pages only where it is asked for, before it
is first touched; memory the allocator hands out again, already touched, is moved onto them in place afterwards
(MADV_COLLAPSE, Linux 6.1 and later). On this project's CPU machine a dense step took about 5% less time on huge
pages (docs/benchmarks.md). Where the request is refused (another system, huge pages off, an older kernel for
reused memory), the tensor is the same, on 4 KiB pages. The window's parts are made here, and so are the copies
`load_state_dict` takes of a loaded state.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <linux/mman.h>
HUGE_PAGE_BYTES = 2 << 20  # smaller tensors could not fill one huge page


def zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """`torch.zeros(shape)`, on huge pages when on the CPU and at least one huge page large."""
    return on_huge_pages(torch.empty(shape, dtype=dtype, device=device), Tensor.zero_)


def copy(value: Tensor, device: torch.device) -> Tensor:
    """A contiguous copy of `value` on `device`, on huge pages as `zeros` makes them."""
    return on_huge_pages(torch.empty(value.shape, dtype=value.dtype, device=device), lambda new: new.copy_(value))


def on_huge_pages(tensor: Tensor, first_touch: Callable[[Tensor], Tensor]) -> Tensor:
    """`first_touch(tensor)`, with huge pages asked for before it and the memory moved onto them after it where the
    first request could not apply (memory already touched)."""
    large = tensor.device.type == "cpu" and tensor.nbytes >= HUGE_PAGE_BYTES
    if large:
        advise(tensor, MADV_HUGEPAGE)
    first_touch(tensor)
    if large:
        advise(tensor, MADV_COLLAPSE)  # quick where the pages are huge already
    return tensor


def advise(tensor: Tensor, advice: int) -> bool:
    """madvise over the whole pages of `tensor`'s memory; True if the kernel took the advice."""
    madvise = libc_madvise()
    if madvise is None:
        return False
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    return last > first and madvise(first, last - first, advice) == 0


def transparent_huge_pages() -> str:
    """The kernel's transparent huge page mode (always, madvise, never), or "absent" (not Linux, or no THP)."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not setting.exists():
        return "absent"
    return setting.read_text().split("[")[1].split("]")[0]


@functools.cache
def libc_madvise() -> Optional[Callable[[int, int, int], int]]:
    """libc's madvise where the kernel has transparent huge pages, unless its administrator turned them off
    (MADV_COLLAPSE would not ask)."""
    if transparent_huge_pages() in ("never", "absent"):
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise
