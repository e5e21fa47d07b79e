"""The Translator: checkpoint(s) + tokenizer + search, over lines of raw text.

Lines are sorted by length into token-budgeted batches for speed and restored to input order;
input is consumed in windows so a file of any size is translated with bounded memory. Empty
lines give empty translations without touching the model; lines longer than the model's
position limit are truncated and counted. Streaming mode translates each line as soon as it
arrives.

Precision: fp32; bf16 (autocast: matmuls in bf16, softmax/norms and the search in fp32); int8
(every nn.Linear replaced by a dynamically quantised one: int8 weights per tensor, activations
quantised per batch on the fly, int32 accumulation; CPU only), with attention and its cached keys/
values in bf16 autocast where the CPU computes bf16 natively. Embeddings stay fp32.

This room does not train. Public names: Translator, batch_by_tokens, translate_ids, set_precision.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_model
from .data import DataError, clean_line
from .search import Ensemble, Hypothesis, SearchOptions, search
from .tokenizer import Tokenizer

__all__ = ["Translator", "batch_by_tokens", "translate_ids", "TranslateStats", "set_precision", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "int8")

log = logging.getLogger(__name__)


def batch_by_tokens(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut so that rows * max_len <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, longest = [], [], 0
    for i in order:
        longest_new = max(longest, lengths[i])
        if cur and (len(cur) + 1) * longest_new > batch_tokens:
            batches.append(cur)
            cur, longest_new = [], lengths[i]
        cur.append(i)
        longest = longest_new
    if cur:
        batches.append(cur)
    return batches


def set_precision(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """The model to decode with at `precision` (fp32 and bf16: the model itself; int8: a quantised copy)."""
    if precision not in PRECISIONS:
        raise DataError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16":
        # autocast would cast every weight at every call: cast the matmul weights once instead
        # (LayerNorm keeps fp32; autocast still runs norms, softmax and the residual stream in fp32)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.to(torch.bfloat16)
        return model
    if precision != "int8":
        return model
    if device.type != "cpu":
        raise DataError("int8 decoding runs on the CPU only: use --device cpu, or --precision bf16 on a GPU")
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (else oneDNN emulates them, slowly)."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def translate_ids(model, src_ids: Sequence[list[int]], opts: SearchOptions, batch_tokens: int,
                  device: torch.device, pad_id: int,
                  on_batch: Optional[Callable[[int, int], None]] = None, workers: int = 1,
                  context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> list[list[Hypothesis]]:
    """Search every source (ids ending in EOS), batched by length; results in input order.

    The token budget is divided by the beam size, since each sentence occupies `beam` rows.
    `workers` > 1 searches that many batches at once, each in its own thread (PyTorch releases
    the GIL inside its kernels), with the caller's intra-op threads shared out among them; the
    result does not depend on it, since every batch is searched on its own. `context()` is
    entered in each thread (autocast is per thread). `on_batch(n_sentences, n_target_tokens)` is
    called after each batch, in order, from the calling thread (progress).
    """
    out: list[list[Hypothesis]] = [[] for _ in src_ids]
    per_row = max(1, batch_tokens // max(1, opts.beam if not opts.sample else opts.n_best))
    batches = batch_by_tokens([len(s) for s in src_ids], per_row)

    def run(index: list[int]) -> list[list[Hypothesis]]:
        rows = [src_ids[i] for i in index]
        src = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
        for r, ids in enumerate(rows):
            src[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        with torch.inference_mode(), context():
            return search(model, src.to(device), opts)

    def done(index: list[int], hyps: list[list[Hypothesis]]) -> None:
        for i, h in zip(index, hyps):
            out[i] = h
        if on_batch is not None:
            on_batch(len(index), sum(len(h[0].tokens) + 1 for h in hyps if h))

    workers = max(1, min(workers, len(batches)))
    if workers == 1:
        for index in batches:
            done(index, run(index))
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))  # read by each new worker thread
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    try:
        for index, hyps in zip(batches, pool.map(run, batches)):
            done(index, hyps)
    finally:  # on an error or Ctrl-C, queued batches are dropped; running ones end with their batch
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(threads)
    return out


@dataclass
class TranslateStats:
    """Counts reported at the end of a decode."""

    lines: int = 0
    empty: int = 0
    truncated: int = 0
    target_tokens: int = 0
    truncated_lines: list[int] = field(default_factory=list)


class Translator:
    """Load one checkpoint (or an ensemble) and translate raw text lines."""

    def __init__(self, paths: Sequence[Path], device: str = "cpu", threads: int = 0,
                 precision: Optional[str] = None, workers: Optional[int] = None) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        ckpts = [load_checkpoint(p, mmap=True) for p in paths]
        loaded = [load_model(c, self.device) for c in ckpts]
        self.tokenizer: Tokenizer = loaded[0][1]
        for c, (_, tok) in zip(ckpts[1:], loaded[1:]):
            if tok.to_state() != self.tokenizer.to_state():
                raise CheckpointError(f"{c.path}: an ensemble needs one tokenizer; this checkpoint has another")
        self.recipe = ckpts[0].recipe
        self.decode_defaults = ckpts[0].state.get("decode") or self.recipe.decode.model_dump()
        self.precision = precision or self.decode_defaults.get("precision", "fp32")
        models = [set_precision(m, self.precision, self.device) for m, _ in loaded]
        self.model = models[0] if len(models) == 1 else Ensemble(models)
        self.max_src = min(m.cfg.max_positions for m in models) - 1
        self.stats = TranslateStats()
        if workers is None:
            workers = int(self.decode_defaults.get("workers", 0))
        if workers < 0:
            raise DataError(f"workers must be 0 (auto) or more, not {workers}")
        self.workers = workers or self.auto_workers(self.device)

    @staticmethod
    def auto_workers(device: torch.device) -> int:
        """Batches searched at once when not set: one per CPU thread, at most 4 (one on a GPU).

        Measured (2-core CPU, beam 5): two batches with one thread each decode 1.1-1.4x faster
        than one batch with two threads, since the small matmuls of a decoding step do not split
        well across threads. Each worker holds one batch in memory.
        """
        return 1 if device.type != "cpu" else max(1, min(4, torch.get_num_threads()))

    @property
    def batch_tokens(self) -> int:
        """The decode batch budget stored in the checkpoint."""
        return int(self.decode_defaults.get("batch_tokens", 4096))

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for bf16; for int8 too on a CPU with native bf16 (AVX-512 BF16 or AMX),
        where it runs what is not quantised (attention, its caches) in bf16: the quantised
        linear layers ignore autocast. Else nothing."""
        if self.precision == "bf16" or (self.precision == "int8" and native_bf16()):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def options(self, **overrides) -> SearchOptions:
        """Search options: the checkpoint's decode defaults, then non-None overrides."""
        values = {**self.decode_defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return SearchOptions.from_config(SimpleNamespace(**values))

    def encode(self, line: str, line_no: int) -> list[int]:
        """Source ids (+EOS) of an already cleaned line, truncated to the model's limit."""
        ids = self.tokenizer.encode_src(line)
        if len(ids) > self.max_src:
            self.stats.truncated += 1
            self.stats.truncated_lines.append(line_no)
            log.warning("line %d: %d pieces, truncated to the model's limit of %d", line_no, len(ids), self.max_src)
            ids = ids[: self.max_src]
        return ids + [self.tokenizer.eos_id]

    def translate_window(self, lines: Sequence[str], opts: SearchOptions, batch_tokens: int,
                         first_line_no: int = 1,
                         on_batch: Optional[Callable[[int, int], None]] = None) -> list[list[Hypothesis]]:
        """Translate a list of lines; empty ones give an empty hypothesis list."""
        cleaned = [clean_line(x) for x in lines]
        todo = [i for i, x in enumerate(cleaned) if x]
        self.stats.lines += len(lines)
        self.stats.empty += len(lines) - len(todo)
        ids = [self.encode(cleaned[i], first_line_no + i) for i in todo]
        hyps = translate_ids(self.model, ids, opts, batch_tokens, self.device, self.tokenizer.pad_id, on_batch,
                             self.workers, self.autocast)
        out: list[list[Hypothesis]] = [[] for _ in lines]
        for i, h in zip(todo, hyps):
            out[i] = h
            self.stats.target_tokens += sum(len(x.tokens) for x in h[:1])
        return out

    def detok(self, hyp: Hypothesis) -> str:
        return self.tokenizer.decode_tgt(hyp.tokens)

    def translate_stream(self, lines: Iterable[str], opts: SearchOptions, batch_tokens: int,
                         window: int = 2000, on_batch: Optional[Callable[[int, int], None]] = None
                         ) -> Iterator[list[Hypothesis]]:
        """Yield the hypotheses of each input line in order, reading `window` lines at a time
        (window=1 translates each line as soon as it is read)."""
        buf: list[str] = []
        line_no = 1
        for line in lines:
            buf.append(line)
            if len(buf) >= window:
                yield from self.translate_window(buf, opts, batch_tokens, line_no, on_batch)
                line_no += len(buf)
                buf = []
        if buf:
            yield from self.translate_window(buf, opts, batch_tokens, line_no, on_batch)


def format_hypotheses(translator: Translator, hyps: list[Hypothesis], index: int, n_best: int) -> list[str]:
    """1-best: the detokenised text (empty for an empty input line); n-best: 'index<TAB>score<TAB>text' rows."""
    if n_best <= 1:
        return [translator.detok(hyps[0]) if hyps else ""]
    if not hyps:
        return [f"{index}\t0.0\t"]
    return [f"{index}\t{h.score:.4f}\t{translator.detok(h)}" for h in hyps[:n_best]]


def translate_split(translator: Translator, lines: Sequence[str], opts: SearchOptions, batch_tokens: int
                    ) -> list[str]:
    """Translate each line as a document: split into sentences, translate them all in one window,
    rejoin per line (the same split and join as `translate serve`)."""
    from .segment import join_document, split_document

    lang = translator.recipe.data.src_lang
    docs = [split_document(clean_line(line), lang) for line in lines]
    sentences = [s for d in docs for s in d.sentences]
    hyps = translator.translate_window(sentences, opts, batch_tokens)
    texts = [translator.detok(h[0]) if h else "" for h in hyps]
    out, start = [], 0
    for d in docs:
        out.append(join_document(d, texts[start:start + len(d.sentences)]))
        start += len(d.sentences)
    return out


def run_decode(paths: Sequence[Path], input: str, output: str, overrides: dict, batch_tokens: Optional[int],
               stream: bool, device: str, threads: int, encoding_errors: str,
               precision: Optional[str] = None, workers: Optional[int] = None,
               split_sentences: bool = False) -> TranslateStats:
    """The `translate decode` workflow: read lines, translate in order, write atomically, report.

    split_sentences: each line is cut into sentences (segment.py, by the model's source language),
    they are translated together, and each line's translations are joined with spaces.
    """
    import sys
    import time

    from .textio import AtomicOutput, file_chunks, stdin_chunks
    from .distributed import pick_device

    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"--encoding-errors must be strict or replace, not {encoding_errors!r}")
    if overrides.get("length_penalty") not in (None, "gnmt", "power"):
        raise DataError(f"--length-penalty must be gnmt or power, not {overrides['length_penalty']!r}")
    if precision is not None and precision not in PRECISIONS:
        raise DataError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    translator = Translator(paths, str(pick_device(device)), threads, precision, workers)
    opts = translator.options(**overrides)
    if opts.n_best > opts.beam and not opts.sample:
        raise DataError(f"--n-best ({opts.n_best}) must not exceed --beam ({opts.beam})")
    if split_sentences and opts.n_best > 1:
        raise DataError("--split-sentences gives one line per input line: it does not go with --n-best")
    budget = batch_tokens or translator.batch_tokens
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
            if split_sentences:
                rows = translate_split(translator, chunk, opts, budget)
            else:
                hyps = translator.translate_window(chunk, opts, budget, index + 1)
                rows = [r for i, h in enumerate(hyps)
                        for r in format_hypotheses(translator, h, index + i, opts.n_best)]
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
