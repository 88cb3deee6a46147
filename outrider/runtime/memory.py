"""Model weights in 2 MiB pages.

A decode step streams every weight once (about 1 GB for the 1.5B target at Q4_K_M). On 4 KiB pages that walk
crosses a page every few dozen weight blocks: a TLB miss each time, and the hardware prefetchers stop at every
page boundary. With THP in `madvise` mode (this machine's, and most distributions' default) only memory that asks
for huge pages gets them, and torch's allocator does not ask. So the weights are copied into one anonymous mapping
advised MADV_HUGEPAGE, each tensor on its own 4 KiB boundary (the packed kernels use aligned vector loads).
Measured on this machine (ad hoc, all linears of the 1.5B gguf target back to back, M = 1): 32.5 -> 27.9 ms median.
"""
from __future__ import annotations

import logging
import mmap

import torch

log = logging.getLogger(__name__)
HUGE_PAGE = 2 << 20
ALIGN = 4096


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def in_huge_pages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of `state`'s CPU tensors laid out in one huge-page-advised mapping (same names, shapes, dtypes).
    Where the kernel refuses the advice (THP off, not Linux) the copies still work, on ordinary pages."""
    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    total = sum(_round_up(s, ALIGN) for s in sizes.values())
    if total == 0:
        return dict(state)
    arena = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        arena.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError) as e:  # costs speed only
        log.info("huge pages not available for the weights (%s)", e)
    buf = torch.frombuffer(arena, dtype=torch.uint8)  # the tensors keep the mapping alive
    offset = (-buf.data_ptr()) % HUGE_PAGE  # start on a huge-page boundary
    out = {}
    for name, t in state.items():
        dst = buf[offset:offset + sizes[name]].view(t.dtype).view(t.shape)
        dst.copy_(t)
        out[name] = dst
        offset += _round_up(sizes[name], ALIGN)
    return out
