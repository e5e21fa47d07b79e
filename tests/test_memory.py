"""memory.py: free heap pages really go back to the OS (checked in a fresh interpreter, so no other
test's heap is in the way), a safe no-op where the C library is not glibc; the peak RSS reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from seq2seq_cli import memory

GLIBC = memory._glibc() is not None

FRAGMENT = """
import json, torch
from seq2seq_cli.memory import release_free_heap

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

# 64 KiB tensors live in malloc's heap (below its mmap threshold); keeping every tenth one alive
# pins the heap's top, so freeing the others leaves ~220 MiB of free, touched pages inside it
blocks = [torch.ones(16384) for _ in range(4000)]
keep = blocks[::10]
del blocks
before = rss()
released = release_free_heap()
after = rss()
assert all(float(t[0]) == 1.0 for t in keep)  # the live blocks are untouched
print(json.dumps({"before": before, "after": after, "released": released}))
"""


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_free_heap_returns_fragmented_free_pages_to_the_os() -> None:
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["released"] is True
    assert r["before"] - r["after"] > 150, r  # MiB: most of the ~220 MiB freed in the middle of the heap


def test_without_glibc_release_does_nothing(monkeypatch) -> None:
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.release_free_heap() is False


def test_peak_rss_is_this_process_high_water_mark() -> None:
    import torch

    before = memory.peak_rss_mib()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert memory.peak_rss_mib() >= before and memory.peak_rss_mib() > 64
    del block


def test_kernel_cache_caps_per_purpose_and_the_environment_wins(monkeypatch) -> None:
    from seq2seq_cli.memory import bound_kernel_caches

    for training, primitives in ((True, "16"), (False, "32")):
        monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
        monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
        bound_kernel_caches(training)
        assert os.environ["LRU_CACHE_CAPACITY"] == "8"
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == primitives
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    bound_kernel_caches(False)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
