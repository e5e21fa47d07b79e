"""Process memory: what the C allocator keeps after torch frees a tensor.

torch allocates CPU tensors with malloc. glibc keeps freed blocks in its heap for reuse, and a
training or decoding process frees blocks of many sizes (batch shapes rarely repeat), so the heap
fragments and resident memory (RSS) climbs long after the live tensors stopped growing. Measured on
the default recipe (bf16, 1 thread, Intel Xeon with AMX): after 100 updates RSS was 1.8 GB, and
`malloc_trim(0)` brought it to 0.6 GB, i.e. two thirds of it was free heap.

  release_free_heap()   glibc's malloc_trim(0), through ctypes: hand the free pages of the heap
                        back to the OS. Training calls it before the first update, every log
                        window and after each validation (the next update faults its pages in
                        again, ~0.1 s per call); elsewhere than glibc (macOS, musl) it does nothing;
  peak_rss_mib()        the process's resident high-water mark (getrusage), in MiB;
  bound_kernel_caches() caps the two caches of compiled oneDNN kernels (one per matmul shape,
                        each holding its scratch memory), through their environment variables, which
                        are read at first use: torch's own (ideep's LRU_CACHE_CAPACITY, default
                        1,024) to 8 for training and decoding, and oneDNN's primitive cache
                        (ONEDNN_PRIMITIVE_CACHE_CAPACITY, default 1,024) to 16 for training and 32
                        for decoding. A value already in the environment wins.

Why the kernel caches: training's and decoding's batch shapes rarely repeat, so the caches fill
with kernels never used again. Measured on the bible recipe (bf16, 1 thread, Intel Xeon with AMX,
malloc_trim every 50 updates), peak RSS over 250 updates: 1,894 MiB and still climbing with
torch's cache at 1,024, a flat 1,304 with 8, at the same speed (7,400-7,500 tok/s). Decoding the
bible test (2 workers): bf16 1.64-1.73 GB -> 1.31-1.35 GB, fp32 0.94-0.96 -> 0.86-0.90 GB, same
speed. oneDNN's own cache: after 100 updates 3,111 MiB at 128, 1,759 at 16, same speed; 0 is 25%
slower (16 still holds one layer's shapes for the next layers of the same update). Decoding with
bf16-matmul (whole Bible test, 2 workers): 1,274 MB at 76.1 sent/s with oneDNN's cache at 1,024,
841 at 128, 764 at 64 (72.4 sent/s), 671 at 16 (62.2: a decoding step's ~15 shapes per worker no
longer fit). With bf16 layers and the fused self-attention (fewer oneDNN shapes per step; today's
model, 2026-12-02, three runs each): 865-931 MB at 64, 816-847 at 32, 759-813 at 16, at the same
speed within the runs' noise (92.6-102.6 sent/s), so decoding now caps it at 32.

Measured against trimming every 10 updates (1.70 GB peak, 4% slower): every 50 costs nothing
measurable. This room imports nothing of the package. Public names: release_free_heap,
peak_rss_mib, bound_kernel_caches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from typing import Optional

__all__ = ["release_free_heap", "peak_rss_mib", "bound_kernel_caches"]


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (malloc_trim is glibc's), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Return the free pages of every malloc heap to the OS; True if any were released."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def peak_rss_mib() -> float:
    """The largest resident set size this process has had, in MiB (getrusage's ru_maxrss: KiB on
    Linux, bytes on macOS); 0 where there is no getrusage."""
    try:
        import resource  # not on Windows
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def bound_kernel_caches(training: bool) -> None:
    """Cap torch's (ideep's) oneDNN kernel cache at 8 entries, and oneDNN's primitive cache at 16
    when training and 32 when decoding, unless the environment already sets them. Call before the
    first matmul."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", "8")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16" if training else "32")
