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

Document decoding (issue 18): per-line lexical constraints (a constraints file and/or a glossary
whose source terms are matched case-insensitively at word boundaries), forced target prefixes,
and Pharaoh word alignments (align.py) are read, checked and threaded through `run_decode`.

This room does not train. Public names: Translator, TranslateStats, set_precision, format_hypotheses,
run_decode, read_constraints, read_glossary, read_prefixes, glossary_constraints.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import CheckpointError, load_checkpoint, load_model
from .data import DataError, clean_line
from .memory import bound_kernel_caches
from .model import MultiHeadAttention, RowStableLinear
from .precision import bf16_matmuls, native_bf16, resolve_precision
from .recipe import DecodeConfig, resolve_decode
from .search import Ensemble, Hypothesis, translate_ids
from .tokenizer import Tokenizer

__all__ = [
    "Translator",
    "TranslateStats",
    "set_precision",
    "plan_bf16_matmul",
    "Bf16Plan",
    "format_hypotheses",
    "run_decode",
    "LineInputs",
    "read_constraints",
    "read_glossary",
    "read_prefixes",
    "glossary_constraints",
]

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger(__name__)


LayerShape = tuple[int, int, bool]  # a linear layer's in_features, out_features, has a bias


def set_precision(
    model: torch.nn.Module, precision: str, device: torch.device, bf16_layers: Optional[Mapping[LayerShape, int]] = None
) -> torch.nn.Module:
    """The model to decode with at `precision` (fp32 and bf16: the model itself; int8: a quantised copy).

    bf16-matmul (see precision.py): linear layers that always take oneDNN's path
    (model.RowStableLinear); those whose shape is in `bf16_layers` (see plan_bf16_matmul: shape ->
    the layer's row_floor) get bf16 weights and give bf16 results, the others, and always the
    output layer, keep fp32 weights and become bf16 products with fp32 results inside
    precision.bf16_matmuls() (which Translator.autocast() enters); the attention products and
    their stored keys/values in bf16.
    """
    if precision == "bf16-matmul":
        if device.type != "cpu":
            raise DataError("precision bf16-matmul is for CPUs: use fp32 or bf16 on a GPU")
        output, bf16_layers = getattr(model, "output", None), bf16_layers or {}
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.__class__ = RowStableLinear  # same parameters and state dict, another forward
                if module is not output and _shape(module) in bf16_layers:
                    module.to(torch.bfloat16)
                    module.row_floor = bf16_layers[_shape(module)]
            elif isinstance(module, MultiHeadAttention):
                module.kv_dtype = torch.bfloat16
        return model
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


def _shape(layer: torch.nn.Linear) -> LayerShape:
    return layer.in_features, layer.out_features, layer.bias is not None


@dataclass(frozen=True)
class Bf16Plan:
    """How bf16-matmul decodes one model on this CPU (plan_bf16_matmul)."""

    bf16_layers: Mapping[LayerShape, int] = field(default_factory=dict)  # shapes run as bf16 layers -> row_floor
    problem: Optional[str] = None  # None when every product gives a row the same bits in any batch


ROW_COUNTS = (1, 2, 5, 33, 64, 100, 200, 255, 256, 300, 512)
"""Row counts whose products the plan compares with the first rows of a 1,000-row product: oneDNN
picks its kernel and its blocking of the sum by the number of rows (measured on AMX: a 1024 -> 256
bf16 layer sums in another order for 33-255 rows than for fewer or more)."""


def _rows_agree(layer: torch.nn.Module, x: Tensor) -> bool:
    """Whether every row of x gets the same bits from `layer` in each prefix of x as in all of x."""
    full = layer(x)
    return all(torch.equal(layer(x[:m]), full[:m]) for m in ROW_COUNTS if m < x.size(0))


def plan_bf16_matmul(model: torch.nn.Module, beam: int = 5) -> Bf16Plan:
    """Which linear layers of `model` bf16-matmul decoding runs as bf16 layers, and whether all of
    its products give a row the same bits whatever other rows share them, on this machine.

    oneDNN's kernels depend on the shapes and on the number of rows, so the claims are checked on
    random numbers for the model's own shapes (60-100 ms, once per model): each linear layer over
    1-1,000 rows (ROW_COUNTS), as a bf16 layer (bf16 weights, results rounded to bf16: half the
    memory traffic, fewer conversions) where that agrees, else as a bf16 layer whose products of
    33-255 rows are padded to 256 (RowStableLinear.row_floor), else with fp32 weights and bf16
    fpmath (fp32 results), which the output layer always keeps so that the logits stay fp32; the
    cross-attention products (a sentence's 64 keys alone and padded to 128 among others, 1, beam
    and 32 queries) and the fused self-attention (a row alone and among 40). problem names the
    first product that agrees in no way tried.
    """
    g = torch.Generator().manual_seed(0)
    output = getattr(model, "output", None)
    shapes = {(_shape(m), m is output) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    attention = next((m for m in model.modules() if isinstance(m, MultiHeadAttention)), None)
    bf16: dict[LayerShape, int] = {}
    ways = ((torch.bfloat16, 0), (torch.bfloat16, 256), (torch.float32, 0))  # dtype, row_floor
    with torch.inference_mode(), bf16_matmuls():
        for (d_in, d_out, bias), is_output in sorted(shapes):
            x = torch.randn(1000, d_in, generator=g)
            for dtype, floor in ways[2:] if is_output else ways:
                probe = RowStableLinear(d_in, d_out, bias=bias, device="meta", dtype=dtype).to_empty(device="cpu")
                probe.row_floor = floor
                for param in probe.parameters():
                    param.copy_(torch.randn(param.shape, generator=g))
                if _rows_agree(probe, x):
                    if dtype == torch.bfloat16:
                        bf16[(d_in, d_out, bias)] = floor
                    break
            else:
                return Bf16Plan(bf16, f"a {d_in} -> {d_out} product depends on the other rows")
        if attention is not None:
            h, d = attention.n_heads, attention.d_head
            for queries in sorted({1, beam, 32}):
                # cross-attention: a sentence's 64 keys (the least model.start pads to) alone and
                # padded to 128 among others
                q = torch.randn(3, h, queries, d, generator=g).bfloat16()
                k = torch.zeros(3, h, 128, d, dtype=torch.bfloat16)
                k[:, :, :64] = torch.randn(3, h, 64, d, generator=g)
                p = torch.zeros(3, h, queries, 128, dtype=torch.bfloat16)
                p[..., :64] = torch.rand(3, h, queries, 64, generator=g)
                scores, ctx = q @ k.transpose(-2, -1), p @ k
                alone = q[1:2] @ k[1:2, :, :64].transpose(-2, -1), p[1:2, ..., :64] @ k[1:2, :, :64]
                if not (torch.equal(scores[1:2, ..., :64], alone[0]) and torch.equal(ctx[1:2], alone[1])):
                    problem = f"attention products (head size {d}, {queries} queries) depend on the padding"
                    return Bf16Plan(bf16, problem)
            # self-attention over a cache (fused kernel, same key length): one row alone and among 40
            q = torch.randn(40, h, 1, d, generator=g).bfloat16()
            k, v = (torch.randn(40, h, 48, d, generator=g).bfloat16() for _ in range(2))
            visible = (torch.arange(48) < 37)[None]
            together = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
            if not torch.equal(
                F.scaled_dot_product_attention(q[7:8], k[7:8], v[7:8], attn_mask=visible), together[7:8]
            ):
                return Bf16Plan(bf16, f"the fused self-attention (head size {d}) depends on the other rows")
    return Bf16Plan(bf16)


@dataclass
class TranslateStats:
    """Counts reported at the end of a decode."""

    lines: int = 0
    empty: int = 0
    truncated: int = 0
    target_tokens: int = 0
    truncated_lines: list[int] = field(default_factory=list)
    config: Optional[DecodeConfig] = None  # the settings in force
    unmet_lines: list[int] = field(default_factory=list)  # constraints not all met (max_len reached)


class Translator:
    """Load one checkpoint (or an ensemble) and translate raw text lines.

    `config` is the DecodeConfig in force: the first checkpoint's stored one with `recipe`'s
    explicit keys and the `options` given (see `recipe.resolve_decode`). Its precision and
    workers are fixed here; the search fields may be varied per call (`options`).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        device: str = "cpu",
        threads: int = 0,
        options: Optional[dict[str, Any]] = None,
        recipe: Optional[DecodeConfig] = None,
    ) -> None:
        bound_kernel_caches(training=False)  # before the first matmul (memory.py)
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
        plans = [Bf16Plan()] * len(loaded)
        if self.precision == "bf16-matmul" and self.device.type == "cpu":
            plans = [plan_bf16_matmul(m, self.config.beam) for m, _ in loaded]
            why = next((p.problem for p in plans if p.problem), None)
            if why and self.config.precision == "auto":
                log.warning("precision auto -> fp32 for decoding after all: with bf16 products %s on this CPU", why)
                self.precision = "fp32"
            elif why:
                log.warning("precision bf16-matmul: not batch-invariant for this model here (%s)", why)
        models = [set_precision(m, self.precision, self.device, p.bf16_layers) for (m, _), p in zip(loaded, plans)]
        self.model = models[0] if len(models) == 1 else Ensemble(models)
        self.max_src = min(m.cfg.max_positions for m in models) - 1
        self.stats = TranslateStats(config=self.config)
        self._last_ids: dict[int, list[int]] = {}  # source ids of the last window's non-empty lines
        self._word_cont: Optional[torch.Tensor] = None
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
        linear layers ignore autocast. bf16-matmul: precision.bf16_matmuls(). Else nothing."""
        if self.precision in _HALF:
            return torch.autocast(self.device.type, dtype=_HALF[self.precision])
        if self.precision == "int8" and native_bf16():
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "bf16-matmul":
            return bf16_matmuls()
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

    def translate_window(
        self,
        lines: Sequence[str],
        opts: Optional[DecodeConfig] = None,
        first_line_no: int = 1,
        on_batch: Optional[Callable[[int, int], None]] = None,
        constraints: Optional[Sequence[Sequence[str]]] = None,
        prefixes: Optional[Sequence[str]] = None,
    ) -> list[list[Hypothesis]]:
        """Translate a list of lines (with `opts`, default the config in force); empty ones give an
        empty hypothesis list. constraints[i]: target phrases line i's output must contain;
        prefixes[i]: text its output starts with."""
        opts = opts or self.config
        cleaned = [clean_line(x) for x in lines]
        todo = [i for i, x in enumerate(cleaned) if x]
        self.stats.lines += len(lines)
        self.stats.empty += len(lines) - len(todo)
        ids = [self.encode(cleaned[i], first_line_no + i) for i in todo]
        cons = None if constraints is None else [self.encode_constraints(constraints[i]) for i in todo]
        pre = None if prefixes is None else [self.tokenizer.encode_tgt(prefixes[i]) for i in todo]
        hyps = translate_ids(
            self.model,
            ids,
            opts,
            self.device,
            self.tokenizer.pad_id,
            on_batch,
            self.workers,
            self.autocast,
            cons,
            pre,
            None if cons is None else self.word_continuations(),
        )
        out: list[list[Hypothesis]] = [[] for _ in lines]
        for i, h in zip(todo, hyps):
            out[i] = h
            self.stats.target_tokens += sum(len(x.tokens) for x in h[:1])
            if h and h[0].unmet:
                self.stats.unmet_lines.append(first_line_no + i)
                log.warning(
                    "line %d: %d of its %d constraints not met within the length limit",
                    first_line_no + i,
                    h[0].unmet,
                    len(constraints[i]) if constraints else 0,
                )
        self._last_ids = dict(zip(todo, ids))
        return out

    def word_continuations(self) -> torch.Tensor:
        """(V,) True at target pieces that continue a word: no '▁', first character a letter or
        digit (punctuation may follow a constraint directly)."""
        if self._word_cont is None:
            pieces = [self.tokenizer.id_to_piece(i, "tgt") for i in range(self.tokenizer.tgt_vocab_size)]
            self._word_cont = torch.tensor([p[:1].isalnum() for p in pieces], dtype=torch.bool)
        return self._word_cont

    def encode_constraints(self, phrases: Sequence[str]) -> list[list[int]]:
        """Target ids of each distinct phrase. sentencepiece encodes a phrase alone with the
        word-initial '▁' it has after a space in a sentence, and never lets a piece cross a space,
        so a phrase encodes as it appears inside a translation (after a space or at the start)."""
        out: list[list[int]] = []
        for p in dict.fromkeys(x.strip() for x in phrases):
            ids = self.tokenizer.encode_tgt(p) if p else []
            if not ids:
                raise DataError(f"constraint {p!r} encodes to no target pieces")
            out.append(ids)
        return out

    def alignments(self, hyps: Sequence[list[Hypothesis]], n_best: int) -> list[list[str]]:
        """Pharaoh word alignments (see align.py) of the hypotheses of the last translate_window."""
        from .align import align_batch

        model = self.model.models[0] if isinstance(self.model, Ensemble) else self.model
        pairs = [(i, h) for i, hs in enumerate(hyps) if hs for h in hs[: max(1, n_best)]]
        out: list[list[str]] = [[] for _ in hyps]
        for start in range(0, len(pairs), 64):
            chunk = pairs[start : start + 64]
            with torch.inference_mode(), self.autocast():
                links = align_batch(
                    model,
                    self.tokenizer,
                    [self._last_ids[i] for i, _ in chunk],
                    [h.tokens for _, h in chunk],
                    self.device,
                )
            for (i, _), a in zip(chunk, links):
                out[i].append(a)
        return out

    def detok(self, hyp: Hypothesis) -> str:
        return self.tokenizer.decode_tgt(hyp.tokens)

    def detok_ids(self, pieces: Sequence[str]) -> str:
        """Target text of target pieces (for titles): '▁' back to spaces."""
        return "".join(pieces).replace("\u2581", " ").strip()


def format_hypotheses(
    translator: Translator, hyps: list[Hypothesis], index: int, n_best: int, alignments: Optional[list[str]] = None
) -> list[str]:
    """1-best: the detokenised text (empty for an empty input line); n-best: 'index<TAB>score<TAB>text'
    rows. With alignments (one Pharaoh string per hypothesis), each row gains '<TAB>alignment'."""

    def tail(j: int) -> str:
        if alignments is None:
            return ""
        return "\t" + (alignments[j] if j < len(alignments) else "")

    if n_best <= 1:
        return [(translator.detok(hyps[0]) if hyps else "") + tail(0)]
    if not hyps:
        return [f"{index}\t0.0\t" + tail(0)]
    return [f"{index}\t{h.score:.4f}\t{translator.detok(h)}" + tail(j) for j, h in enumerate(hyps[:n_best])]


def translate_split(translator: Translator, lines: Sequence[str], opts: Optional[DecodeConfig] = None) -> list[str]:
    """Translate each line as a document: split into sentences, translate them all in one window,
    rejoin per line (the same split and join as `translate serve`)."""
    from .segment import join_document, split_document

    lang = translator.recipe.data.src_lang
    docs = [split_document(clean_line(line), lang) for line in lines]
    sentences = [s for d in docs for s in d.sentences]
    hyps = translator.translate_window(sentences, opts)
    texts = [translator.detok(h[0]) if h else "" for h in hyps]
    out, start = [], 0
    for d in docs:
        out.append(join_document(d, texts[start : start + len(d.sentences)]))
        start += len(d.sentences)
    return out


# ---------------------------------------------------------- document decoding inputs (issue 18)


def read_constraints(path: Path, errors: str = "strict") -> list[list[str]]:
    """One line per input line: target phrases separated by tabs; an empty line = no constraint."""
    from .data import iter_lines

    out = []
    for n, line in enumerate(iter_lines(path, errors, {}), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            out.append([])
            continue
        fields = [f.strip() for f in line.split("\t")]
        if not all(fields):
            raise DataError(f"{path}: line {n}: empty constraint (two tabs in a row, or a tab at an end)")
        out.append(fields)
    return out


def read_prefixes(path: Path, errors: str = "strict") -> list[str]:
    """One line per input line: the text its translation starts with (empty = none)."""
    from .data import iter_lines

    return [clean_line(x) for x in iter_lines(path, errors, {})]


def read_glossary(path: Path, errors: str = "strict") -> list[tuple[re.Pattern[str], str]]:
    """'source term<TAB>target term' lines (blank lines skipped) → (source pattern, target term).
    A term matches case-insensitively at word boundaries (not inside a longer word)."""
    from .data import iter_lines

    out = []
    for n, line in enumerate(iter_lines(path, errors, {}), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{path}: line {n}: expected 'source term<TAB>target term', found no tab")
        src, tgt = (x.strip() for x in line.split("\t", 1))
        if not src or not tgt or "\t" in tgt:
            raise DataError(f"{path}: line {n}: expected two non-empty fields: 'source term<TAB>target term'")
        words = r"\s+".join(re.escape(w) for w in src.split())
        out.append((re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE), tgt))
    return out


def glossary_constraints(glossary: Sequence[tuple[re.Pattern[str], str]], line: str) -> list[str]:
    """Target terms of the glossary entries whose source term occurs in `line`."""
    return [tgt for pattern, tgt in glossary if pattern.search(line)]


def _slice(rows: Optional[list], start: int, n: int, path: Optional[Path]) -> Optional[list]:
    """rows[start:start+n], or a one-line error when the file has fewer lines than the input."""
    if rows is None:
        return None
    if start + n > len(rows):
        raise DataError(f"{path}: has {len(rows)} lines but the input has more (line {len(rows) + 1} is missing)")
    return rows[start : start + n]


@dataclass(frozen=True)
class LineInputs:
    """Per-line inputs of `translate decode` besides the text: constraints, glossary, prefixes, alignments."""

    constraints_file: Optional[Path] = None  # tab-separated target phrases per input line
    glossary_file: Optional[Path] = None  # source term<TAB>target term; a term found in a line adds a constraint
    prefix_file: Optional[Path] = None  # the text each output line starts with
    align: bool = False  # append Pharaoh word alignments
    split_sentences: bool = False  # cut each line into sentences, translate them, rejoin (one line per line)


def run_decode(
    paths: Sequence[Path],
    input: str,
    output: str,
    options: dict[str, Any],
    stream: bool = False,
    device: str = "auto",
    threads: int = 0,
    encoding_errors: str = "strict",
    recipe: Optional[DecodeConfig] = None,
    inputs: LineInputs = LineInputs(),
) -> TranslateStats:
    """The `translate decode` workflow: read lines, translate in order, write atomically, report.

    `options` are the command line's decoding settings (None = not given); `recipe` a recipe's
    decode section whose explicit keys rank below them (`translate run`); `inputs` the per-line
    constraints, glossary, prefixes, the alignment switch and sentence splitting.
    """
    import sys
    import time

    from .distributed import pick_device
    from .textio import AtomicOutput, file_chunks, stdin_chunks

    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"--encoding-errors must be strict or replace, not {encoding_errors!r}")
    constraints_file, prefix_file = inputs.constraints_file, inputs.prefix_file
    # read and check the per-line inputs before loading the model
    cons_rows = None if constraints_file is None else read_constraints(Path(constraints_file), encoding_errors)
    glossary = None if inputs.glossary_file is None else read_glossary(Path(inputs.glossary_file), encoding_errors)
    prefix_rows = None if prefix_file is None else read_prefixes(Path(prefix_file), encoding_errors)
    if input != "-" and (cons_rows is not None or prefix_rows is not None):
        from .data import iter_lines

        n_input = sum(1 for _ in iter_lines(Path(input), encoding_errors, {}))
        for rows_, path in ((cons_rows, constraints_file), (prefix_rows, prefix_file)):
            if rows_ is not None and len(rows_) != n_input:
                raise DataError(f"{path}: has {len(rows_)} lines but {input} has {n_input}")
    translator = Translator(paths, str(pick_device(device)), threads, options, recipe)
    opts = translator.config
    if (cons_rows is not None or glossary is not None) and opts.sample:
        raise DataError("--constraints and --glossary need beam search, not --sample")
    if inputs.split_sentences and (
        opts.n_best > 1 or inputs.align or cons_rows is not None or glossary is not None or prefix_rows is not None
    ):
        raise DataError(
            "--split-sentences gives one line per input line: it does not go with --n-best, --align, "
            "--constraints, --glossary or --prefix"
        )
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
            if inputs.split_sentences:
                rows = translate_split(translator, chunk, opts)
            else:
                cons = _slice(cons_rows, index, len(chunk), constraints_file)
                if glossary is not None:
                    base = cons if cons is not None else [[] for _ in chunk]
                    cons = [c + glossary_constraints(glossary, clean_line(line)) for c, line in zip(base, chunk)]
                pre = _slice(prefix_rows, index, len(chunk), prefix_file)
                hyps = translator.translate_window(chunk, opts, index + 1, constraints=cons, prefixes=pre)
                aligned = translator.alignments(hyps, opts.n_best) if inputs.align else [None] * len(hyps)
                rows = [
                    r
                    for i, (h, a) in enumerate(zip(hyps, aligned))
                    for r in format_hypotheses(translator, h, index + i, opts.n_best, a)
                ]
            out.write_lines(rows, flush=from_stdin or output == "-")
            index += len(chunk)
            if not from_stdin:
                rate = index / max(time.perf_counter() - start, 1e-9)
                toks = translator.stats.target_tokens / max(time.perf_counter() - start, 1e-9)
                sys.stderr.write(f"\r{index} lines  {rate:.1f} sent/s  {toks:.0f} tok/s")
        for rows_, path in ((cons_rows, constraints_file), (prefix_rows, prefix_file)):
            if rows_ is not None and len(rows_) != index:
                raise DataError(f"{path}: has {len(rows_)} lines but the input has {index}")
        out.commit()
    except BaseException:
        out.abort()
        raise
    s = translator.stats
    if not from_stdin:
        sys.stderr.write("\n")
    if s.unmet_lines:
        log.warning(
            "%d lines did not meet all their constraints within the length limit (lines %s)",
            len(s.unmet_lines),
            ", ".join(map(str, s.unmet_lines[:20])),
        )
    if s.truncated or counts.get("replaced_lines"):
        log.warning(
            "%d lines truncated to the model's length limit, %d lines with invalid UTF-8 replaced",
            s.truncated,
            counts.get("replaced_lines", 0),
        )
    return s
