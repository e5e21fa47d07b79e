"""`translate prepare`: stream each training corpus once, filter it, encode it in worker processes, write shards.

For every training corpus (`data.train`, or each of `data.corpora`, and `data.replay`) the files
(plain or .gz) are read in chunks of raw line pairs; worker processes decode and clean the lines
(`data.clean_line`), skip blank pairs, encode both sides with the run's tokenizer, drop pairs
longer than `data.max_len` pieces (+1 for EOS) or beyond `data.max_len_ratio`, and return flat
id arrays; the parent removes exact duplicates (`data.dedup`, within the corpus, by a 64-bit
hash of the cleaned pair) and appends the chunks, in input order, to `shards.ShardWriter`. The
result does not depend on the number of workers. A corpus whose manifest matches its inputs,
tokenizer and filter settings is skipped (`shards.check_fresh`).

Memory: at most 2 x workers chunks are in flight, plus 12 bytes per kept pair for the lengths
(and ~70 bytes per pair for the duplicate set when dedup is on).

Public names: prepare, open_training_set, corpus_dir, ensure_tokenizer.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .checkpoint import CheckpointError, RunDir, load_checkpoint
from .data import DataError, checked_lines, clean_line, decode_bytes, open_bytes, split_tsv_line
from .recipe import Recipe, Split
from .shards import (
    PreparedCorpus,
    ShardError,
    ShardWriter,
    TrainingSet,
    check_fresh,
    epoch_count,
    input_record,
    install,
    read_manifest,
)
from .tokenizer import Tokenizer, TokenizerError

__all__ = ["prepare", "open_training_set", "corpus_dir", "ensure_tokenizer", "corpus_specs"]

log = logging.getLogger(__name__)

CHUNK_PAIRS = 8192


def corpus_specs(recipe: Recipe) -> list[tuple[str, Split, Optional[float]]]:
    """(name, split, weight) of every corpus to prepare; the replay corpus has weight None (set by its ratio)."""
    specs: list[tuple[str, Split, Optional[float]]] = [(c.name, c, c.weight) for c in recipe.data.training_corpora()]
    if recipe.data.replay is not None:
        specs.append(("replay", recipe.data.replay, None))
    return specs


def corpus_dir(recipe: Recipe, name: str) -> Path:
    return recipe.output_dir / "prepared" / name


def _inputs(split: Split) -> list[Path]:
    return [split.tsv] if split.tsv is not None else [split.src, split.tgt]  # type: ignore[list-item]


def _filters(recipe: Recipe, split: Split) -> dict[str, Any]:
    d = recipe.data
    return {
        "max_len": d.max_len,
        "max_len_ratio": d.max_len_ratio,
        "dedup": d.dedup,
        "encoding_errors": d.encoding_errors,
        "max_lines": split.max_lines,
    }


def tokenizer_sha256(tok: Tokenizer) -> str:
    state = tok.to_state()
    h = hashlib.sha256(state["src"] or b"")
    h.update(b"|" + (state["tgt"] or b""))
    return h.hexdigest()


def ensure_tokenizer(recipe: Recipe) -> Tokenizer:
    """The run's tokenizer; with train.init_from and none written yet, the parent's is written first."""
    run = RunDir(recipe.output_dir)
    try:
        return Tokenizer.load(run.tokenizer)
    except TokenizerError:
        if recipe.train.init_from is None:
            raise
    try:
        parent = load_checkpoint(recipe.train.init_from, mmap=True)
        tok = Tokenizer.from_state(dict(parent.tokenizer))
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_from: {exc}") from None
    tok.save(run.tokenizer)
    return tok


# ------------------------------------------------------------------------------ workers


@dataclass
class _Encoded:
    """One chunk after a worker: kept pairs as flat ids + lengths, and what was counted."""

    src: np.ndarray
    src_lens: np.ndarray
    tgt: np.ndarray
    tgt_lens: np.ndarray
    hashes: Optional[np.ndarray]
    counts: dict[str, int] = field(default_factory=dict)


_WORKER: dict[str, Any] = {}


def _init_worker(protos: tuple[bytes, Optional[bytes]], names: tuple[str, str], settings: dict[str, Any]) -> None:
    _WORKER.update(tok=Tokenizer(*protos, num_threads=1), names=names, settings=settings)


def _encode_chunk(first_line: int, src_raw: list[bytes], tgt_raw: Optional[list[bytes]]) -> _Encoded:
    """Decode, clean, skip blanks, encode and filter one chunk (in a worker, or in-process)."""
    tok: Tokenizer = _WORKER["tok"]
    names, cfg = _WORKER["names"], _WORKER["settings"]
    counts: dict[str, int] = collections.Counter()
    src_txt, tgt_txt = [], []
    for k, raw in enumerate(src_raw):
        no = first_line + k
        if tgt_raw is None:  # TSV
            line = decode_bytes(raw, names[0], no, cfg["encoding_errors"], counts).rstrip("\r\n")
            s, t = split_tsv_line(line, names[0], no)
        else:
            s = decode_bytes(raw, names[0], no, cfg["encoding_errors"], counts)
            t = decode_bytes(tgt_raw[k], names[1], no, cfg["encoding_errors"], counts)
        s, t = clean_line(s), clean_line(t)
        if s and t:
            src_txt.append(s)
            tgt_txt.append(t)
    counts["read"] = len(src_raw)
    counts["blank"] = len(src_raw) - len(src_txt)
    src_ids = tok.encode_src_batch(src_txt)
    tgt_ids = tok.encode_tgt_batch(tgt_txt)
    s_len = np.fromiter(map(len, src_ids), dtype=np.int64, count=len(src_ids))
    t_len = np.fromiter(map(len, tgt_ids), dtype=np.int64, count=len(tgt_ids))
    src_flat = np.fromiter(itertools.chain.from_iterable(src_ids), dtype=np.int64, count=int(s_len.sum()))
    tgt_flat = np.fromiter(itertools.chain.from_iterable(tgt_ids), dtype=np.int64, count=int(t_len.sum()))
    counts.update(
        sentences=len(src_txt),
        src_pieces=int(s_len.sum()),
        tgt_pieces=int(t_len.sum()),
        src_unk=int((src_flat == tok.unk_id).sum()),
        tgt_unk=int((tgt_flat == tok.unk_id).sum()),
    )
    max_len, ratio = cfg["max_len"], cfg["max_len_ratio"]
    too_long = (s_len + 1 > max_len) | (t_len + 1 > max_len)
    keep = ~too_long
    if ratio > 0:
        bad_ratio = np.maximum(s_len, t_len) > ratio * np.maximum(1, np.minimum(s_len, t_len))
        counts["ratio"] = int((bad_ratio & keep).sum())
        keep &= ~bad_ratio
    counts["too_long"] = int(too_long.sum())
    hashes = None
    if cfg["dedup"]:
        kept_idx = np.nonzero(keep)[0].tolist()
        hashes = np.fromiter(
            (
                int.from_bytes(
                    hashlib.blake2b(f"{src_txt[i]}\t{tgt_txt[i]}".encode(), digest_size=8).digest(), "little"
                )
                for i in kept_idx
            ),
            dtype=np.uint64,
            count=len(kept_idx),
        )
    src_keep, tgt_keep = _select(src_flat, s_len, keep), _select(tgt_flat, t_len, keep)
    # source rows end with EOS (as the model sees them)
    s_kept = s_len[keep]
    src_with_eos = np.insert(src_keep, np.cumsum(s_kept), tok.eos_id)
    return _Encoded(src_with_eos, s_kept + 1, tgt_keep, t_len[keep], hashes, dict(counts))


def _select(flat: np.ndarray, lens: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The ids of the kept rows of a flat array of rows with lengths `lens`."""
    return flat[np.repeat(keep, lens)]


def _raw_chunks(split: Split, counter: list[int]) -> Iterator[tuple[int, list[bytes], Optional[list[bytes]]]]:
    """(first line number, source lines, target lines or None for TSV) in chunks; counter[0] = bytes read.

    The files' existence is checked by the caller (`_prepare_one`)."""
    paths = _inputs(split)
    limit = split.max_lines or None
    with contextlib.ExitStack() as files:
        raw = files.enter_context(open(paths[0], "rb"))
        first = checked_lines(_gunzip(raw, paths[0]), paths[0])
        second = checked_lines(files.enter_context(open_bytes(paths[1])), paths[1]) if len(paths) == 2 else None
        no = 0
        while True:
            take = CHUNK_PAIRS if limit is None else min(CHUNK_PAIRS, limit - no)
            src = list(itertools.islice(first, take)) if take > 0 else []
            tgt = list(itertools.islice(second, len(src))) if second is not None else None
            counter[0] = raw.tell()
            if tgt is not None and len(tgt) < len(src):
                n = no + len(tgt)
                raise DataError(f"{paths[1]}: has {n} lines but {paths[0]} has more; parallel files must align")
            if not src:
                if second is not None and (limit is None or no < limit) and next(second, None) is not None:
                    raise DataError(
                        f"{paths[1]}: has more lines than {paths[0]} ({no}); parallel files must be line-aligned"
                    )
                return
            yield no + 1, src, tgt
            no += len(src)


def _gunzip(raw, path: Path):
    import gzip

    return gzip.GzipFile(fileobj=raw, mode="rb") if str(path).endswith(".gz") else raw


# ------------------------------------------------------------------------------ one corpus


def _prepare_one(
    recipe: Recipe, name: str, split: Split, tok: Tokenizer, tok_hash: str, workers: int, progress: bool
) -> dict[str, Any]:
    final = corpus_dir(recipe, name)
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    inputs = _inputs(split)
    for p in inputs:
        if not p.is_file():
            raise DataError(f"{p}: {'is a directory, expected a text file' if p.is_dir() else 'file not found'}")
    writer = ShardWriter(tmp, max(tok.src_vocab_size, tok.tgt_vocab_size), recipe.data.max_len)
    settings = _filters(recipe, split)
    names = (str(inputs[0]), str(inputs[-1]))
    total = collections.Counter()
    seen: set[int] = set()
    counter = [0]
    size = inputs[0].stat().st_size
    start = time.perf_counter()
    bar = _Bar(f"prepare {name}", size, progress)
    try:
        for enc in _encoded(split, tok, names, settings, workers, counter):
            if enc.hashes is not None:
                keep = np.ones(len(enc.hashes), dtype=bool)
                for i, h in enumerate(enc.hashes.tolist()):
                    if h in seen:
                        keep[i] = False
                    else:
                        seen.add(h)
                total["duplicates"] += int((~keep).sum())
                enc = _Encoded(
                    _select(enc.src, enc.src_lens, keep),
                    enc.src_lens[keep],
                    _select(enc.tgt, enc.tgt_lens, keep),
                    enc.tgt_lens[keep],
                    None,
                )
            writer.append(enc.src, enc.src_lens, enc.tgt, enc.tgt_lens)
            total.update(enc.counts)
            bar.update(counter[0], total["read"])
        bar.close()
        if writer.pairs == 0:
            raise DataError(f"{inputs[0]}: no training pair left after filtering (data.max_len={recipe.data.max_len})")
        seconds = time.perf_counter() - start
        counts = {
            k: int(total.get(k, 0))
            for k in ("read", "blank", "too_long", "ratio", "duplicates", "replaced_lines", "sentences")
        }
        counts.update(kept=writer.pairs)
        coverage = {
            side: {"pieces": int(total[f"{side}_pieces"]), "unk": int(total[f"{side}_unk"])} for side in ("src", "tgt")
        }
        manifest = writer.finish(
            {
                "name": name,
                "inputs": [input_record(p) for p in inputs],
                "tokenizer_sha256": tok_hash,
                "filters": settings,
                "counts": counts,
                "coverage": coverage,
                "seconds": round(seconds, 2),
                "workers": workers,
            }
        )
        install(tmp, final)
    except BaseException:
        bar.close()
        writer.abort()
        raise
    log.info(
        "prepared %s: %d pairs kept of %d read (%d blank, %d too long, %d by ratio, %d duplicates) "
        "in %.1f s (%.0f pairs/s, %d workers) -> %s",
        name,
        counts["kept"],
        counts["read"],
        counts["blank"],
        counts["too_long"],
        counts["ratio"],
        counts["duplicates"],
        seconds,
        counts["read"] / max(seconds, 1e-9),
        workers,
        final,
    )
    return {**counts, "seconds": round(seconds, 2), "tokens": manifest["tokens"], "skipped": False}


def _encoded(
    split: Split, tok: Tokenizer, names: tuple[str, str], settings: dict[str, Any], workers: int, counter: list[int]
) -> Iterator[_Encoded]:
    """Encoded chunks in input order: in-process for 1 worker, else a bounded pool of forked processes."""
    protos = (tok.to_state()["src"], tok.to_state()["tgt"])
    chunks = _raw_chunks(split, counter)
    if workers <= 1:
        _init_worker(protos, names, settings)  # type: ignore[arg-type]
        for first, src, tgt in chunks:
            yield _encode_chunk(first, src, tgt)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(protos, names, settings)) as pool:
        pending: collections.deque = collections.deque()
        for first, src, tgt in chunks:
            pending.append(pool.apply_async(_encode_chunk, (first, src, tgt)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Bar:
    """A rich progress bar over the input bytes, with pairs/s and ETA (off when not wanted)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[pairs]:,} pairs, {task.fields[rate]:,.0f} pairs/s"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(label, total=total, pairs=0, rate=0.0)
            self.start = time.perf_counter()

    def update(self, done: int, pairs: int) -> None:
        if self.progress is not None:
            rate = pairs / max(1e-9, time.perf_counter() - self.start)
            self.progress.update(self.task, completed=done, pairs=pairs, rate=rate)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ------------------------------------------------------------------------------ all corpora


def prepare(
    recipe: Recipe, workers: int = 0, progress: bool = True, force: bool = False, tok: Optional[Tokenizer] = None
) -> dict[str, Any]:
    """Prepare every training corpus that is missing or stale (all with force); return per-corpus counts."""
    tok = tok or ensure_tokenizer(recipe)
    tok_hash = tokenizer_sha256(tok)
    workers = workers or os.cpu_count() or 1
    (recipe.output_dir / "prepared").mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    for name, split, _ in corpus_specs(recipe):
        if not force:
            try:
                manifest = read_manifest(corpus_dir(recipe, name))
                check_fresh(manifest, corpus_dir(recipe, name), _inputs(split), tok_hash, _filters(recipe, split))
                log.info("prepared %s: up to date, skipped", name)
                out[name] = {**manifest["counts"], "skipped": True}
                continue
            except ShardError:
                pass
        out[name] = _prepare_one(recipe, name, split, tok, tok_hash, workers, progress)
    return out


def open_training_set(
    recipe: Recipe, tok: Tokenizer, prepare_missing: bool = False, verify: bool = True
) -> tuple[TrainingSet, dict[str, Any]]:
    """Open the prepared corpora for training; ShardError when one is missing, stale or damaged.

    prepare_missing=True (a single training process): corpora never prepared are prepared first;
    stale ones are still refused, never silently rebuilt or used.

    Returns the set and a report: per-corpus pairs, weight and pairs per epoch; for data.replay
    the weight follows from its ratio: k = min(pool, round(n * ratio / (1 - ratio))) replayed
    pairs per epoch for n pairs per epoch of the other corpora (a fresh sample each epoch).
    """
    tok_hash = tokenizer_sha256(tok)
    opened, weights, manifests = [], [], {}
    specs = corpus_specs(recipe)
    if prepare_missing:
        workers = os.cpu_count() or 1
        for name, split, _ in specs:
            if not (corpus_dir(recipe, name) / "manifest.json").exists():
                _prepare_one(recipe, name, split, tok, tok_hash, workers, progress=False)
    for name, split, weight in specs:
        directory = corpus_dir(recipe, name)
        manifest = read_manifest(directory)
        check_fresh(manifest, directory, _inputs(split), tok_hash, _filters(recipe, split))
        opened.append(PreparedCorpus(directory, manifest, verify=verify))
        weights.append(weight)
        manifests[name] = manifest
    report: dict[str, Any] = {"corpora": {}}
    n_main = sum(epoch_count(len(c), w) for c, w in zip(opened, weights) if w is not None)
    if recipe.data.replay is not None:
        pool = len(opened[-1])
        ratio = recipe.data.replay.ratio
        k = min(pool, round(n_main * ratio / (1.0 - ratio)))
        weights[-1] = k / pool
        report["replay"] = {
            "in_domain_pairs": n_main,
            "replay_pairs": k,
            "replay_pool": pool,
            "replay_fraction": round(k / (n_main + k), 4),
        }
    for c, w in zip(opened, weights):
        report["corpora"][c.name] = {"pairs": len(c), "weight": round(w, 6), "per_epoch": epoch_count(len(c), w)}
    first = manifests[specs[0][0]]
    report["counts"] = {name: m["counts"] for name, m in manifests.items()}
    report["coverage_counts"] = first.get("coverage")
    return TrainingSet(opened, weights), report
