"""Give back the resident pages of a tensor read from a file's memory map once it has been copied.

safetensors maps a whole file; every page a read touches stays resident (and counts in the process's
memory) until the map is closed, so copying a block's tensors out of a map holds the block twice. After
the copy, `madvise(MADV_PAGEOUT)` on the tensor's whole pages reclaims them: the kernel drops clean file
pages (they would be read from the file again if touched). PAGEOUT never changes contents, so it is safe
on any memory; on kernels or systems without it (Linux < 5.4, macOS) it is a no-op.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import sys

import torch

log = logging.getLogger(__name__)

_MADV_PAGEOUT = 21
_PAGE = mmap.PAGESIZE
_libc = None
_disabled = not sys.platform.startswith("linux")


def release_pages(t: torch.Tensor) -> None:
    """Reclaim the whole pages under `t`'s data (a view of a file map whose contents were copied)."""
    global _libc, _disabled
    if _disabled or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # pages wholly inside t only
    if last <= first:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        failed = _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:  # an optimization only: memory stays as it was before this module existed
        _disabled = True
        log.debug("madvise(MADV_PAGEOUT) is not available here: mapped pages stay resident until their file closes")
