"""The Translator: checkpoint(s) + tokenizer + search, over lines of raw text.

Lines are sorted by length into token-budgeted batches for speed and restored to input order;
input is consumed in windows so a file of any size is translated with bounded memory. Empty
lines give empty translations without touching the model; lines longer than the model's
position limit are truncated and counted. Streaming mode translates each line as soon as it
arrives. The settings are one `recipe.DecodeConfig`, resolved once (`recipe.resolve_decode`).

Precision: fp32; bf16 (autocast: matmuls in bf16, softmax/norms and the search in fp32); int8
(every nn.Linear replaced by a dynamically quantised one: int8 weights per tensor, activations
quantised per batch on the fly, int32 accumulation; CPU only), with attention and its cached keys/
values in bf16 autocast where the CPU computes bf16 natively. Embeddings stay fp32.

This room does not train. Public names: Translator, TranslateStats, set_precision, format_hypotheses,
run_decode.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_model
from .data import DataError, clean_line
from .precision import native_bf16, resolve_precision
from .recipe import DecodeConfig, resolve_decode
from .search import Ensemble, Hypothesis, translate_ids
from .tokenizer import Tokenizer

__all__ = ["Translator", "TranslateStats", "set_precision", "format_hypotheses", "run_decode"]

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger(__name__)


def set_precision(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """The model to decode with at `precision` (fp32 and bf16: the model itself; int8: a quantised copy)."""
    if precision in ("bf16", "fp16"):
        # autocast would cast every weight at every call: cast the matmul weights once instead
        # (LayerNorm keeps fp32; autocast still runs norms, softmax and the residual stream in fp32)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.to(_HALF[precision])
        return model
    if precision != "int8":
        return model
    if device.type != "cpu":
        raise DataError("int8 decoding runs on the CPU only: use --device cpu, or --precision bf16 on a GPU")
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


@dataclass
class TranslateStats:
    """Counts reported at the end of a decode."""

    lines: int = 0
    empty: int = 0
    truncated: int = 0
    target_tokens: int = 0
    truncated_lines: list[int] = field(default_factory=list)
    config: Optional[DecodeConfig] = None  # the settings in force


class Translator:
    """Load one checkpoint (or an ensemble) and translate raw text lines.

    `config` is the DecodeConfig in force: the first checkpoint's stored one with `recipe`'s
    explicit keys and the `options` given (see `recipe.resolve_decode`). Its precision and
    workers are fixed here; the search fields may be varied per call (`options`).
    """

    def __init__(self, paths: Sequence[Path], device: str = "cpu", threads: int = 0,
                 options: Optional[dict[str, Any]] = None, recipe: Optional[DecodeConfig] = None) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        ckpts = [load_checkpoint(p, mmap=True) for p in paths]
        self.config = resolve_decode(ckpts[0].decode, recipe, options)
        loaded = [load_model(c, self.device) for c in ckpts]
        self.tokenizer: Tokenizer = loaded[0][1]
        for c, (_, tok) in zip(ckpts[1:], loaded[1:]):
            if tok.to_state() != self.tokenizer.to_state():
                raise CheckpointError(f"{c.path}: an ensemble needs one tokenizer; this checkpoint has another")
        self.recipe = ckpts[0].recipe
        capability = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else (0, 0)
        self.precision = resolve_precision(self.config.precision, self.device.type, "decode", capability)
        models = [set_precision(m, self.precision, self.device) for m, _ in loaded]
        self.model = models[0] if len(models) == 1 else Ensemble(models)
        self.max_src = min(m.cfg.max_positions for m in models) - 1
        self.stats = TranslateStats(config=self.config)
        self.workers = self.config.workers or self.auto_workers(self.device)

    @staticmethod
    def auto_workers(device: torch.device) -> int:
        """Batches searched at once when not set: one per CPU thread, at most 4 (one on a GPU).

        Measured (2-core CPU, beam 5): two batches with one thread each decode 1.1-1.4x faster
        than one batch with two threads, since the small matmuls of a decoding step do not split
        well across threads. Each worker holds one batch in memory.
        """
        return 1 if device.type != "cpu" else max(1, min(4, torch.get_num_threads()))

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for bf16; for int8 too on a CPU with native bf16 (AVX-512 BF16 or AMX),
        where it runs what is not quantised (attention, its caches) in bf16: the quantised
        linear layers ignore autocast. Else nothing."""
        if self.precision in _HALF:
            return torch.autocast(self.device.type, dtype=_HALF[self.precision])
        if self.precision == "int8" and native_bf16():
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def options(self, **changes: Any) -> DecodeConfig:
        """The config in force with some search fields changed (None = unchanged), validated."""
        return resolve_decode(self.config, None, changes)

    def encode(self, line: str, line_no: int) -> list[int]:
        """Source ids (+EOS) of an already cleaned line, truncated to the model's limit."""
        ids = self.tokenizer.encode_src(line)
        if len(ids) > self.max_src:
            self.stats.truncated += 1
            self.stats.truncated_lines.append(line_no)
            log.warning("line %d: %d pieces, truncated to the model's limit of %d", line_no, len(ids), self.max_src)
            ids = ids[: self.max_src]
        return ids + [self.tokenizer.eos_id]

    def translate_window(self, lines: Sequence[str], opts: Optional[DecodeConfig] = None, first_line_no: int = 1,
                         on_batch: Optional[Callable[[int, int], None]] = None) -> list[list[Hypothesis]]:
        """Translate a list of lines (with `opts`, default the config in force); empty ones give an
        empty hypothesis list."""
        opts = opts or self.config
        cleaned = [clean_line(x) for x in lines]
        todo = [i for i, x in enumerate(cleaned) if x]
        self.stats.lines += len(lines)
        self.stats.empty += len(lines) - len(todo)
        ids = [self.encode(cleaned[i], first_line_no + i) for i in todo]
        hyps = translate_ids(self.model, ids, opts, self.device, self.tokenizer.pad_id, on_batch,
                             self.workers, self.autocast)
        out: list[list[Hypothesis]] = [[] for _ in lines]
        for i, h in zip(todo, hyps):
            out[i] = h
            self.stats.target_tokens += sum(len(x.tokens) for x in h[:1])
        return out

    def detok(self, hyp: Hypothesis) -> str:
        return self.tokenizer.decode_tgt(hyp.tokens)


def format_hypotheses(translator: Translator, hyps: list[Hypothesis], index: int, n_best: int) -> list[str]:
    """1-best: the detokenised text (empty for an empty input line); n-best: 'index<TAB>score<TAB>text' rows."""
    if n_best <= 1:
        return [translator.detok(hyps[0]) if hyps else ""]
    if not hyps:
        return [f"{index}\t0.0\t"]
    return [f"{index}\t{h.score:.4f}\t{translator.detok(h)}" for h in hyps[:n_best]]


def run_decode(paths: Sequence[Path], input: str, output: str, options: dict[str, Any], stream: bool = False,
               device: str = "auto", threads: int = 0, encoding_errors: str = "strict",
               recipe: Optional[DecodeConfig] = None) -> TranslateStats:
    """The `translate decode` workflow: read lines, translate in order, write atomically, report.

    `options` are the command line's decoding settings (None = not given); `recipe` a recipe's
    decode section whose explicit keys rank below them (`translate run`).
    """
    import sys
    import time

    from .distributed import pick_device
    from .textio import AtomicOutput, file_chunks, stdin_chunks

    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"--encoding-errors must be strict or replace, not {encoding_errors!r}")
    translator = Translator(paths, str(pick_device(device)), threads, options, recipe)
    n_best = translator.config.n_best
    counts: dict = {}
    from_stdin = input == "-"
    if from_stdin:
        chunks = stdin_chunks(1 if stream else 2000, encoding_errors, counts)
    else:
        chunks = file_chunks(Path(input), 2000, encoding_errors, counts)
    out = AtomicOutput(output)
    start, index = time.perf_counter(), 0
    try:
        for chunk in chunks:
            hyps = translator.translate_window(chunk, None, index + 1)
            rows = [r for i, h in enumerate(hyps) for r in format_hypotheses(translator, h, index + i, n_best)]
            out.write_lines(rows, flush=from_stdin or output == "-")
            index += len(chunk)
            if not from_stdin:
                rate = index / max(time.perf_counter() - start, 1e-9)
                toks = translator.stats.target_tokens / max(time.perf_counter() - start, 1e-9)
                sys.stderr.write(f"\r{index} lines  {rate:.1f} sent/s  {toks:.0f} tok/s")
        out.commit()
    except BaseException:
        out.abort()
        raise
    s = translator.stats
    if not from_stdin:
        sys.stderr.write("\n")
    if s.truncated or counts.get("replaced_lines"):
        log.warning("%d lines truncated to the model's length limit, %d lines with invalid UTF-8 replaced",
                    s.truncated, counts.get("replaced_lines", 0))
    return s
