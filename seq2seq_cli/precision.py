"""Which number format to compute in, chosen by what the machine does natively.

`precision: auto` (the default of `train.precision`, `decode.precision` and `--precision`) resolves
once per process to the fastest precision that is native on the device in use and, for decoding,
batch-invariant:

  device                                   train                   decode
  CPU with native bf16 (AVX512_BF16/AMX,   bf16                    bf16-matmul
  or ARM's BF16 extension)
  other CPUs (e.g. AVX2 only)              fp32                    fp32
  CUDA, compute capability >= 8.0          bf16                    fp32
  older CUDA                               fp16 (+ loss scaling)   fp32

On a CPU without native bf16, oneDNN emulates bf16 matmuls about 50x slower than fp32.

Decoding must be batch-invariant: a line's translation must not depend on the other lines of its
batch (what `translate serve` and `translate decode` promise). Where that breaks, and why:
  * bf16 (autocast) and int8 (dynamic quantisation, one activation scale per tensor) are not: 13 of
    150 lines decoded alone differed from the same lines in a batch in bf16 (30-minute Bible model,
    2026-12-02). The fused attention kernel's sums depend on the padding, fp32 (MKL) products on how
    many rows share the call, and a one-row product takes another oneDNN path; each leaves last-bit
    differences that a bf16 rounding or an int8 quantisation of the next input turns into visible
    ones, which change beam decisions.
  * fp32 has the same last-bit differences, but they stay at fp32 rounding size: 0 of 150.
  * bf16-matmul (decoding, CPU): every product takes bf16 inputs with fp32 accumulation, and only
    in shapes whose rows get the same bits whatever else is in the product. Linear layers always
    take oneDNN's path (never fewer rows than it needs: model.RowStableLinear); those the start-up
    plan finds row-invariant as bf16 layers (translate.plan_bf16_matmul: on an AMX Xeon the
    256-input ones, and the 1024 -> 256 one with its products of 33-255 rows, where it sums in
    another order, padded to 256 rows) get bf16 weights and bf16 results; any other, and always
    the output layer, keeps fp32 weights and fp32 results through oneDNN's bf16 fpmath mode.
    Attention is computed explicitly on bf16 keys/values with an fp32 softmax
    (model.MultiHeadAttention.kv_dtype), over sources padded to whole blocks of 32 keys, at least
    two (model.KEY_BLOCK), except the self-attention over its cache, whose length follows the step
    alone and which takes the fused kernel; the residual stream, LayerNorm, the logits and the
    length penalty (computed per distinct length: penalties.py) stay fp32. Alone vs batched, to
    the last bit of the score (2026-12-02, 30-minute Bible model): 0 of 300 + 200 lines (beam 5)
    and 0 of 200 (greedy; with the explicit self-attention 7 of 200 greedy scores differed by up
    to 1e-3, tokens equal). `auto` picks it where bf16 is native, and falls back to fp32 for a
    model whose shapes fail the plan's check.
bf16 and int8 stay available by name (`--precision bf16`, the fastest where native). Training has no
such contract and uses bf16 where native. "Native" needs both the instructions (torch's CPU probes)
and oneDNN agreeing to use them: `ONEDNN_MAX_CPU_ISA=AVX2` on a bf16 machine makes it behave, and be
detected, as a machine without native bf16.

Recipes and checkpoints keep what was asked for (`auto`), never the resolved choice, so a model
trained on one machine decodes at the right precision on another.

This room imports nothing of the package. Public names: CpuInfo, cpu_info, native_bf16,
resolve_precision, bf16_matmuls.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

__all__ = ["CpuInfo", "cpu_info", "native_bf16", "resolve_precision", "bf16_matmuls"]

log = logging.getLogger(__name__)

Purpose = Literal["train", "decode"]
_ISA_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "avx", "bf16", "asimd", "sve")


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU is and what it computes natively (for choices and for every reported figure)."""

    model: str
    flags: tuple[str, ...]  # the ISA flags of interest that /proc/cpuinfo lists
    native_bf16: bool
    onednn_isa_cap: str  # ONEDNN_MAX_CPU_ISA, or "" when not set

    def describe(self) -> str:
        isa = "/".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "bf16", "sve") if f in self.flags)
        cap = f", ONEDNN_MAX_CPU_ISA={self.onednn_isa_cap}" if self.onednn_isa_cap else ""
        return f"{self.model} ({isa or 'no AVX2'}; bf16 {'native' if self.native_bf16 else 'not native'}{cap})"


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    import os

    text = _cpuinfo_text()
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in text.splitlines()
                if line.lower().startswith(("model name", "cpu model", "hardware"))
            ),
            "",
        )
        or platform.processor()
    )
    words = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            words.update(line.split(":", 1)[1].split())
    flags = tuple(f for f in _ISA_FLAGS if f in words)
    return CpuInfo(model or "unknown CPU", flags, native_bf16(), os.environ.get("ONEDNN_MAX_CPU_ISA", ""))


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware, and oneDNN will use it.

    x86: AVX512_BF16 or AMX (torch's probes); ARM: the BF16 extension (/proc/cpuinfo 'bf16').
    Either way oneDNN must also report bf16 support, which it does not under an ISA cap such as
    ONEDNN_MAX_CPU_ISA=AVX2 (then bf16 would be emulated).
    """
    cpu = getattr(torch, "cpu", None)
    hardware = any(
        bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    if not hardware and platform.machine().lower() in ("aarch64", "arm64"):
        hardware = any(
            line.lower().startswith("features") and "bf16" in line.split() for line in _cpuinfo_text().splitlines()
        )
    if not hardware:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def resolve_precision(
    requested: str, device_type: str, purpose: Purpose, cuda_capability: tuple[int, int] = (0, 0)
) -> str:
    """The precision to compute in: `requested` unless it is "auto" (then by the table above).

    Logged once per (request, device, purpose): the choice and why. An explicit bf16 on a CPU
    that would emulate it runs as asked, with a one-time warning.
    """
    if requested == "auto" and purpose == "decode":
        if device_type == "cpu" and native_bf16():
            chosen, why = "bf16-matmul", f"CPU has native bf16 ({cpu_info().describe()}), batch-invariant"
        elif device_type == "cpu":
            chosen, why = "fp32", f"CPU has no native bf16 ({cpu_info().describe()})"
        else:
            chosen, why = "fp32", "the batch-invariant precision on CUDA"
        log.info("precision auto -> %s for decoding: %s", chosen, why)
        return chosen
    if requested == "auto":
        if device_type == "cuda":
            chosen, why = (
                ("bf16", f"CUDA compute capability {cuda_capability[0]}.{cuda_capability[1]} >= 8.0")
                if cuda_capability >= (8, 0)
                else ("fp16", f"CUDA compute capability {cuda_capability[0]}.{cuda_capability[1]} < 8.0")
            )
        elif device_type == "cpu" and native_bf16():
            chosen, why = "bf16", f"CPU has native bf16 ({cpu_info().describe()})"
        else:
            chosen, why = "fp32", f"CPU has no native bf16 ({cpu_info().describe()})"
        log.info("precision auto -> %s for %s: %s", chosen, "training" if purpose == "train" else "decoding", why)
        return chosen
    if requested in ("bf16", "bf16-matmul") and device_type == "cpu" and not native_bf16():
        log.warning(
            "precision %s on a CPU without native bf16 (%s): bf16 is emulated there, typically "
            "~50x slower than fp32; precision auto would choose fp32",
            requested,
            cpu_info().describe(),
        )
    return requested


_matmul_lock = threading.Lock()
_matmul_users = 0
_matmul_before = "none"


@contextlib.contextmanager
def bf16_matmuls() -> Iterator[None]:
    """While any caller is inside, fp32 matrix products on the CPU take bf16 inputs with fp32
    accumulation and fp32 results (torch.backends.mkldnn.matmul.fp32_precision = "bf16").

    The setting is process-wide, unlike autocast: decoding workers (threads) enter it together,
    so it is counted and restored only when the last one leaves; a worker never sees it switched
    off under it mid-batch.
    """
    global _matmul_users, _matmul_before
    flags = torch.backends.mkldnn.matmul
    with _matmul_lock:
        if _matmul_users == 0:
            _matmul_before = flags.fp32_precision
            flags.fp32_precision = "bf16"
        _matmul_users += 1
    try:
        yield
    finally:
        with _matmul_lock:
            _matmul_users -= 1
            if _matmul_users == 0:
                flags.fp32_precision = _matmul_before
