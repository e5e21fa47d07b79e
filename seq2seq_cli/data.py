"""Reading, checking and batching parallel text.

Reading: every line is checked (UTF-8, line counts, TSV shape) and cleaned the same way at
training and decoding time (`clean_line`): a leading BOM, CR line ends, control and
zero-width characters are removed, tabs become spaces; problems raise `DataError` naming the
file and the line. Blank pairs are skipped on both sides together and counted.

Files may be gzip-compressed (name ending in `.gz`). `iter_pairs` streams a split pair by pair
(constant memory: `translate prepare` and the tokenizer sample read corpora of any size).

Batching: pairs are sorted by length (random order among equal lengths) into batches of at most
`batch_tokens` padded tokens per side, then the batch order is shuffled; both draws are seeded
by (seed, epoch), so a resumed run rebuilds the same epoch and skips to its position; ranks take
disjoint shards. It is vectorised with numpy: no Python object per pair, whatever the corpus size.

This room does not know the model. Public names: DataError, read_lines, iter_pairs, read_split,
clean_line, ParallelText, encode_pairs, EncodedCorpus, make_batches, shard_batches, Batch, collate.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .recipe import Split, UserError
from .tokenizer import Tokenizer

__all__ = [
    "DataError",
    "decode_bytes",
    "read_lines",
    "iter_lines",
    "iter_pairs",
    "sample_pairs",
    "PairCounts",
    "open_bytes",
    "checked_lines",
    "split_tsv_line",
    "read_split",
    "clean_line",
    "ParallelText",
    "encode_pairs",
    "EncodedCorpus",
    "length_batches",
    "make_batches",
    "pad_rows",
    "shard_batches",
    "Batch",
    "collate",
]


class DataError(UserError):
    """A problem with a user's data file; the message names the file and, where known, the line."""


# C0/C1 controls except tab/newline, plus zero-width and BOM characters.
_INVISIBLE = re.compile("[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b-\u200d\u2060\ufeff]")


def clean_line(line: str) -> str:
    """Strip the line end, drop control / zero-width characters, turn tabs into spaces, trim."""
    line = line.rstrip("\r\n")
    if "\t" in line:
        line = line.replace("\t", " ")
    if _INVISIBLE.search(line):
        line = _INVISIBLE.sub("", line)
    return line.strip()


def _check_path(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a text file")


def decode_bytes(raw: bytes, name: str, line_no: int, errors: str, counts: dict) -> str:
    """UTF-8 decode one line (BOM on line 1 dropped); strict errors name the source and line."""
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors == "strict":
            raise DataError(
                f"{name}:{line_no}: invalid UTF-8 byte 0x{raw[exc.start]:02x} at column {exc.start + 1} "
                "(set encoding_errors to replace to substitute such bytes)"
            ) from None
        counts["replaced_lines"] = counts.get("replaced_lines", 0) + 1
        return raw.decode("utf-8", errors="replace")


def iter_lines(path: Path, errors: str = "strict", counts: Optional[dict] = None) -> Iterator[str]:
    """Yield the raw lines of a UTF-8 file (line end stripped), lazily.

    errors='strict': a non-UTF-8 line raises DataError with its line number; 'replace': the bad
    bytes become U+FFFD and `counts['replaced_lines']` is incremented.
    """
    _check_path(path)
    counts = {} if counts is None else counts
    with open_bytes(path) as f:
        for no, raw in enumerate(checked_lines(f, path), 1):
            yield decode_bytes(raw, str(path), no, errors, counts).rstrip("\r\n")


def open_bytes(path: Path):
    """The file opened for binary line reading; transparently gunzipped when the name ends in .gz."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def checked_lines(lines: Iterable[bytes], path: Path) -> Iterator[bytes]:
    """Lines of a (maybe gzip) file; a damaged gzip stream is a DataError naming the file."""
    try:
        yield from lines
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read it as gzip ({exc})") from None


@dataclass
class PairCounts:
    """What streaming a split saw: pairs read, blank pairs skipped, lines with replaced bytes."""

    read: int = 0
    blank: int = 0
    replaced_lines: int = 0


def iter_pairs(
    split: Split, errors: str = "strict", counts: Optional[PairCounts] = None
) -> Iterator[tuple[int, str, str]]:
    """Stream (1-based line number, source, target) of a split's non-blank pairs, cleaned.

    Constant memory. Unequal line counts raise DataError when the shorter file ends; a TSV line
    without exactly one tab raises DataError naming its line. `split.max_lines` is honoured.
    """
    counts = PairCounts() if counts is None else counts
    tally: dict = {}
    limit = split.max_lines or None
    if split.tsv is not None:
        _check_path(split.tsv)
        pairs: Iterator[tuple[str, str]] = (
            split_tsv_line(line, split.tsv, no) for no, line in enumerate(iter_lines(split.tsv, errors, tally), 1)
        )
    else:
        assert split.src is not None and split.tgt is not None
        _check_path(split.src)
        _check_path(split.tgt)
        pairs = _zip_strict(
            iter_lines(split.src, errors, tally), iter_lines(split.tgt, errors, tally), split.src, split.tgt
        )
    for no, (s, t) in enumerate(pairs, 1):
        if limit is not None and no > limit:
            break
        counts.read += 1
        counts.replaced_lines = tally.get("replaced_lines", 0)
        s, t = clean_line(s), clean_line(t)
        if not s or not t:
            counts.blank += 1
            continue
        yield no, s, t
    counts.replaced_lines = tally.get("replaced_lines", 0)


def sample_pairs(
    splits: Sequence[Split], size: int, seed: int, errors: str = "strict"
) -> tuple[list[str], list[str], PairCounts]:
    """A uniform sample of at most `size` non-blank pairs of the splits, streamed (reservoir sampling).

    Algorithm R with random.Random(seed): pair i (0-based) replaces a random slot j <= i when j <
    size. Memory holds `size` pairs whatever the corpus size; with size 0, or a stream of at most
    `size` pairs, every pair is kept. The sample is returned in stream order.
    """
    import random

    rng = random.Random(seed)
    counts = PairCounts()
    kept: list[tuple[int, str, str]] = []
    i = -1
    for split in splits:
        for _, s, t in iter_pairs(split, errors, counts):
            i += 1
            if not size or len(kept) < size:
                kept.append((i, s, t))
            else:
                j = rng.randint(0, i)
                if j < size:
                    kept[j] = (i, s, t)
    kept.sort(key=lambda x: x[0])
    return [x[1] for x in kept], [x[2] for x in kept], counts


def split_tsv_line(line: str, path: Path | str, no: int) -> tuple[str, str]:
    """(source, target) of one 'source<TAB>target' line; a blank line is ('', ''); else DataError naming path:no."""
    parts = line.split("\t")
    if len(parts) == 2:
        return parts[0], parts[1]
    if not line.strip():
        return "", ""
    raise DataError(f"{path}:{no}: expected 'source<TAB>target', found {len(parts) - 1} tabs")


def _zip_strict(a: Iterator[str], b: Iterator[str], pa: Path, pb: Path) -> Iterator[tuple[str, str]]:
    n = 0
    for n, x in enumerate(a, 1):
        try:
            y = next(b)
        except StopIteration:
            raise DataError(f"{pb}: has {n - 1} lines but {pa} has more; parallel files must be line-aligned") from None
        yield x, y
    if next(b, None) is not None:
        raise DataError(f"{pb}: has more lines than {pa} ({n}); parallel files must be line-aligned")


def read_lines(path: Path, errors: str = "strict", counts: Optional[dict] = None) -> list[str]:
    """All lines of a file, cleaned by `clean_line`."""
    return [clean_line(x) for x in iter_lines(path, errors, counts)]


@dataclass
class ParallelText:
    """Line-aligned source/target sentences and what reading them skipped or changed."""

    src: list[str]
    tgt: list[str]
    refs: list[list[str]] = field(default_factory=list)  # extra reference streams (test only)
    blank_pairs: int = 0
    replaced_lines: int = 0
    kept_index: list[int] = field(default_factory=list)  # original 0-based line number of each pair


def _read_tsv(path: Path, errors: str, counts: dict) -> tuple[list[str], list[str]]:
    src, tgt = [], []
    for no, line in enumerate(iter_lines(path, errors, counts), 1):
        s, t = split_tsv_line(line, path, no)
        src.append(clean_line(s))
        tgt.append(clean_line(t))
    return src, tgt


def read_split(split: Split, errors: str = "strict", keep_blank: bool = False) -> ParallelText:
    """Read and check one split: equal line counts, non-empty; blank pairs skipped unless keep_blank."""
    counts: dict = {}
    if split.tsv is not None:
        src, tgt = _read_tsv(split.tsv, errors, counts)
        names = [split.tsv]
    else:
        assert split.src is not None and split.tgt is not None
        src, tgt = read_lines(split.src, errors, counts), read_lines(split.tgt, errors, counts)
        names = [split.src, split.tgt]
        if len(src) != len(tgt):
            raise DataError(
                f"{split.tgt}: has {len(tgt)} lines but {split.src} has {len(src)}; parallel files must be line-aligned"
            )
    if split.max_lines:
        src, tgt = src[: split.max_lines], tgt[: split.max_lines]
    refs = [read_lines(r, errors, counts)[: split.max_lines or None] for r in split.refs]
    for r, lines in zip(split.refs, refs):
        if len(lines) != len(src):
            raise DataError(f"{r}: has {len(lines)} lines but {names[0]} has {len(src)}")
    if not src:
        raise DataError(f"{names[0]}: file is empty")
    keep = [i for i in range(len(src)) if keep_blank or (src[i] and tgt[i])]
    if not keep:
        raise DataError(f"{names[0]}: every line pair is blank")
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return ParallelText(
        pick(src), pick(tgt), [pick(r) for r in refs], len(src) - len(keep), counts.get("replaced_lines", 0), keep
    )


@dataclass
class EncodedCorpus:
    """Token ids per pair (src ends with EOS; tgt has neither BOS nor EOS) and the filter report."""

    src: list[list[int]]
    tgt: list[list[int]]
    dropped_too_long: int = 0
    dropped_ratio: int = 0

    def __len__(self) -> int:
        return len(self.src)

    def n_tokens(self) -> tuple[int, int]:
        """Source and target tokens as the model sees them (src incl. EOS, tgt + one BOS/EOS)."""
        return sum(map(len, self.src)), sum(len(t) + 1 for t in self.tgt)


def encode_pairs(
    text: ParallelText,
    tok: Tokenizer,
    max_len: int,
    max_len_ratio: float = 0.0,
    filter_long: bool = True,
    truncate: bool = False,
) -> EncodedCorpus:
    """Encode both sides; drop pairs longer than max_len pieces (+1 for EOS) or beyond the ratio.

    With truncate=True (dev sets) long sides are cut to max_len - 1 pieces instead of dropped.
    """
    src_ids = tok.encode_src_batch(text.src)
    tgt_ids = tok.encode_tgt_batch(text.tgt)
    if truncate:
        src_ids = [s[: max_len - 1] for s in src_ids]
        tgt_ids = [t[: max_len - 1] for t in tgt_ids]
    out = EncodedCorpus([], [])
    for s, t in zip(src_ids, tgt_ids):
        if filter_long and (len(s) + 1 > max_len or len(t) + 1 > max_len):
            out.dropped_too_long += 1
            continue
        if max_len_ratio > 0 and max(len(s), len(t)) > max_len_ratio * max(1, min(len(s), len(t))):
            out.dropped_ratio += 1
            continue
        out.src.append(s + [tok.eos_id])
        out.tgt.append(t)
    return out


def length_batches(order: Sequence[int], lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Cut indices, taken in `order`, into consecutive batches with rows * max(lengths) <= batch_tokens.

    The one batching rule of the package (training, validation, decoding). An item longer than
    batch_tokens gets a batch of its own.
    """
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        if cur and (len(cur) + 1) * grown > batch_tokens:
            batches.append(cur)
            cur, grown = [], lengths[i]
        cur.append(i)
        longest = grown
    if cur:
        batches.append(cur)
    return batches


def make_batches(
    src_lens: Sequence[int] | np.ndarray,
    tgt_lens: Sequence[int] | np.ndarray,
    batch_tokens: int,
    seed: int,
    epoch: int,
    ids: Optional[np.ndarray] = None,
) -> list[np.ndarray]:
    """Length-bucketed batches of pair indices, in a shuffled order fixed by (seed, epoch).

    A pair's padded length is L = max(src_len, tgt_len + 1) (the model sees BOS+y and y+EOS). The
    pairs `ids` (default: all; an index may repeat) are sorted by L, in a random order among equal
    L, and cut greedily into batches of n pairs with n * max L <= batch_tokens; a pair longer than
    batch_tokens gets a batch of its own. Then the batch order is shuffled. Vectorised: with L
    sorted, the greedy cut inside a run of equal L = v is every k = batch_tokens // v rows, so the
    loop is over distinct lengths, not pairs.
    """
    src = np.asarray(src_lens, dtype=np.int32)
    tgt = np.asarray(tgt_lens, dtype=np.int32)
    ids = np.arange(len(src), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    length = np.maximum(src[ids], tgt[ids] + 1)
    perm = rng.permutation(len(ids))
    order = perm[np.argsort(length[perm], kind="stable")]
    starts = _greedy_starts(length[order], batch_tokens)
    batches = np.split(ids[order], starts[1:])
    return [batches[i] for i in rng.permutation(len(batches))]


def _greedy_starts(length: np.ndarray, batch_tokens: int) -> np.ndarray:
    """Start positions of the greedy batches over ascending lengths (see make_batches)."""
    starts = [0]
    values, firsts, counts = np.unique(length, return_index=True, return_counts=True)
    for v, first, count in zip(values.tolist(), firsts.tolist(), counts.tolist()):
        k = max(1, batch_tokens // v)  # rows of length v that fit one batch
        end = first + count
        if first - starts[-1] >= k:  # the open batch cannot take one more row of length v
            starts.append(first)
        starts.extend(range(starts[-1] + k, end, k))
    return np.asarray(starts, dtype=np.int64)


def shard_batches(batches: list[list[int]], rank: int, world: int, group: int = 1) -> list[list[int]]:
    """Rank `rank`'s share: batches are dealt in steps of world*group so every rank gets the same
    number of steps; the remainder that does not fill a whole step is dropped."""
    per_step = world * group
    usable = len(batches) - len(batches) % per_step
    return [b for i, b in enumerate(batches[:usable]) if (i // group) % world == rank]


@dataclass
class Batch:
    """Padded tensors for one batch. src (B, S); tgt_in = BOS + y (B, T); tgt_out = y + EOS (B, T)."""

    src: Tensor
    tgt_in: Tensor
    tgt_out: Tensor
    n_src: int
    n_tgt: int

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            self.src.to(device, non_blocking=non_blocking),
            self.tgt_in.to(device, non_blocking=non_blocking),
            self.tgt_out.to(device, non_blocking=non_blocking),
            self.n_src,
            self.n_tgt,
        )


def pad_rows(rows: Iterable[Sequence[int]], pad_id: int) -> Tensor:
    """A (len(rows), longest) long tensor of the rows, right-padded with pad_id."""
    rows = list(rows)
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(corpus: EncodedCorpus, index: Sequence[int], pad_id: int, bos_id: int, eos_id: int) -> Batch:
    """Build the padded Batch for the pairs `index` of corpus."""
    return collate_rows([corpus.src[i] for i in index], [corpus.tgt[i] for i in index], pad_id, bos_id, eos_id)


def collate_rows(
    src: Sequence[Sequence[int]],
    tgt: Sequence[Sequence[int]],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    multiple: int = 1,
) -> Batch:
    """The padded Batch of source rows (ending in EOS) and target rows (no BOS/EOS): numpy, no per-token Python.

    multiple > 1 rounds both padded lengths up to a multiple of it (fewer distinct tensor shapes).
    """
    n, s_max, t_max = len(src), max(map(len, src)), max(map(len, tgt)) + 1
    s_max, t_max = -(-s_max // multiple) * multiple, -(-t_max // multiple) * multiple
    src_arr = np.full((n, s_max), pad_id, dtype=np.int64)
    tgt_in = np.full((n, t_max), pad_id, dtype=np.int64)
    tgt_out = np.full((n, t_max), pad_id, dtype=np.int64)
    tgt_in[:, 0] = bos_id
    n_src = n_tgt = 0
    for i, (s, t) in enumerate(zip(src, tgt)):
        src_arr[i, : len(s)] = s
        tgt_in[i, 1 : len(t) + 1] = t
        tgt_out[i, : len(t)] = t
        tgt_out[i, len(t)] = eos_id
        n_src, n_tgt = n_src + len(s), n_tgt + len(t) + 1
    return Batch(torch.from_numpy(src_arr), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out), n_src, n_tgt)
