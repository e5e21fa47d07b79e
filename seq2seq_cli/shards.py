"""Prepared training data on disk: token-id shards, their index and manifest, read without loading them.

One directory per corpus (OUTPUT_DIR/prepared/NAME/), the layout of fairseq's MMapIndexedDataset
reduced to what training needs:

    src.bin, tgt.bin   every pair's token ids, one flat little-endian array per side
                       (uint16 when the vocabulary has at most 65,536 pieces, else uint32);
                       source rows end with EOS, target rows have neither BOS nor EOS
    lengths.npy        (n, 2) source and target row lengths (uint16, or uint32 beyond 65,535)
    manifest.json      format version, inputs (path, size, mtime, sha256), tokenizer hash,
                       filter settings, counts, and each file's size and sha256; written last

A directory is written under a temporary name and renamed into place when complete, so a
crash never leaves a half-written corpus that looks finished. Reading keeps only the lengths
and the row offsets in memory (6 to 10 bytes per pair and side); rows are read with `os.pread`, so
neither the resident memory nor the start-up time grows with the corpus (the page cache does
the caching). Every file's size and sha256 are checked when a corpus is opened.

Public names: FORMAT_VERSION, ShardError, StaleError, ShardWriter, PreparedCorpus, TrainingSet,
read_manifest, check_fresh, file_sha256, input_record, install, epoch_count.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .atomic import atomic_write
from .recipe import UserError

__all__ = [
    "FORMAT_VERSION",
    "ShardError",
    "StaleError",
    "ShardWriter",
    "PreparedCorpus",
    "TrainingSet",
    "read_manifest",
    "check_fresh",
    "file_sha256",
    "input_record",
    "install",
    "epoch_count",
]

FORMAT_VERSION = 1
SIDES = ("src", "tgt")


class ShardError(UserError):
    """A prepared corpus that is missing, truncated, corrupt or of an unknown format."""


class StaleError(ShardError):
    """A prepared corpus whose inputs, tokenizer or filter settings changed since it was written."""


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in blocks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def input_record(path: Path) -> dict[str, Any]:
    """What the manifest keeps about an input file: path, size, mtime (ns), sha256."""
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends encoded chunks to a temporary corpus directory; `finish` writes the index and manifest."""

    def __init__(self, directory: Path, vocab_size: int, max_len: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = id_dtype(vocab_size)
        self.len_dtype = np.dtype("<u2") if max_len < 1 << 16 else np.dtype("<u4")
        self._files = {side: open(self.dir / f"{side}.bin", "wb") for side in SIDES}
        self._hash = {side: hashlib.sha256() for side in SIDES}
        self._lengths: list[np.ndarray] = []
        self.pairs = 0
        self.tokens = {side: 0 for side in SIDES}

    def append(self, src_ids: np.ndarray, src_lens: np.ndarray, tgt_ids: np.ndarray, tgt_lens: np.ndarray) -> None:
        """Add len(src_lens) pairs: flat ids per side and each row's length."""
        for side, ids in (("src", src_ids), ("tgt", tgt_ids)):
            data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
            self._files[side].write(data)
            self._hash[side].update(data)
            self.tokens[side] += len(ids)
        self._lengths.append(np.stack([src_lens, tgt_lens], axis=1).astype(self.len_dtype))
        self.pairs += len(src_lens)

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Close the id files, write lengths.npy and manifest.json (last); return the manifest."""
        files: dict[str, Any] = {}
        for side in SIDES:
            f = self._files[side]
            f.flush()
            os.fsync(f.fileno())
            f.close()
            files[f"{side}.bin"] = {
                "size": (self.dir / f"{side}.bin").stat().st_size,
                "sha256": self._hash[side].hexdigest(),
            }
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros((0, 2), self.len_dtype)
        with open(self.dir / "lengths.npy", "wb") as f:
            np.save(f, lengths)
        files["lengths.npy"] = {
            "size": (self.dir / "lengths.npy").stat().st_size,
            "sha256": file_sha256(self.dir / "lengths.npy"),
        }
        manifest = {
            "format": FORMAT_VERSION,
            **manifest,
            "dtype": self.dtype.str,
            "pairs": self.pairs,
            "tokens": dict(self.tokens),
            "files": files,
        }
        atomic_write(self.dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        return manifest

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def install(tmp: Path, final: Path) -> None:
    """Move a finished temporary corpus directory into place, replacing an older one."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The corpus's manifest; ShardError when it is missing, unreadable or of another format."""
    path = directory / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{directory}: not prepared (no manifest.json); run `translate prepare RECIPE`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version = manifest["format"]
    except (ValueError, KeyError, TypeError):
        raise ShardError(f"{path}: unreadable manifest; run `translate prepare RECIPE` again") from None
    if version != FORMAT_VERSION:
        raise ShardError(f"{path}: format {version}, this version reads format {FORMAT_VERSION}; prepare it again")
    return manifest


def check_fresh(
    manifest: dict[str, Any], where: Path, inputs: list[Path], tokenizer_sha256: str, filters: dict[str, Any]
) -> None:
    """Raise StaleError (naming what changed) unless the manifest was made from these inputs and settings.

    An input counts as unchanged when its size and mtime are as recorded, or, if only the mtime
    moved (a `touch`, a copy), when its sha256 still matches.
    """
    if manifest.get("tokenizer_sha256") != tokenizer_sha256:
        raise StaleError(f"{where}: prepared with another tokenizer; run `translate prepare RECIPE` again")
    if manifest.get("filters") != filters:
        changed = sorted(
            k
            for k in set(filters) | set(manifest.get("filters", {}))
            if manifest.get("filters", {}).get(k) != filters.get(k)
        )
        raise StaleError(
            f"{where}: prepared with other settings ({', '.join(changed)}); run `translate prepare RECIPE` again"
        )
    recorded = manifest.get("inputs", [])
    if [r.get("path") for r in recorded] != [str(p) for p in inputs]:
        raise StaleError(f"{where}: prepared from other files; run `translate prepare RECIPE` again")
    for rec, path in zip(recorded, inputs):
        try:
            st = path.stat()
        except OSError:
            raise StaleError(f"{path}: input file not found") from None
        if st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]:
            continue
        if st.st_size != rec["size"] or file_sha256(path) != rec["sha256"]:
            raise StaleError(f"{where}: {path} changed since it was prepared; run `translate prepare RECIPE` again")


class PreparedCorpus:
    """One prepared corpus, opened read-only: lengths in memory, rows read on demand."""

    def __init__(self, directory: Path, manifest: dict[str, Any], verify: bool = True) -> None:
        self.dir, self.manifest = directory, manifest
        self.name: str = manifest["name"]
        files = manifest["files"]
        for fname, rec in files.items():
            path = directory / fname
            size = path.stat().st_size if path.is_file() else -1
            if size != rec["size"]:
                what = "missing" if size < 0 else f"truncated or grown ({size:,} bytes, expected {rec['size']:,})"
                raise ShardError(f"{path}: {what}; run `translate prepare RECIPE --force`")
            if verify and file_sha256(path) != rec["sha256"]:
                raise ShardError(
                    f"{path}: corrupt (its sha256 differs from manifest.json); run `translate prepare RECIPE --force`"
                )
        try:
            lengths = np.load(directory / "lengths.npy")
        except (ValueError, OSError) as exc:
            raise ShardError(f"{directory / 'lengths.npy'}: unreadable ({exc})") from None
        if lengths.ndim != 2 or lengths.shape != (manifest["pairs"], 2):
            raise ShardError(f"{directory / 'lengths.npy'}: shape {lengths.shape}, expected ({manifest['pairs']}, 2)")
        self.src_lens, self.tgt_lens = lengths[:, 0], lengths[:, 1]
        self.dtype = np.dtype(manifest["dtype"])
        self._offsets = {}
        for side, lens in (("src", self.src_lens), ("tgt", self.tgt_lens)):
            total = int(lens.sum(dtype=np.int64))
            off = np.zeros(len(lens) + 1, dtype=np.uint32 if total < 1 << 32 else np.int64)  # 4 bytes a row if it fits
            np.cumsum(lens, out=off[1:], dtype=off.dtype)
            if off[-1] * self.dtype.itemsize != files[f"{side}.bin"]["size"]:
                raise ShardError(f"{directory / f'{side}.bin'}: does not match lengths.npy; prepare it again")
            self._offsets[side] = off
        self._fds = {side: os.open(directory / f"{side}.bin", os.O_RDONLY) for side in SIDES}

    def __len__(self) -> int:
        return len(self.src_lens)

    def rows(self, side: str, index: np.ndarray) -> list[np.ndarray]:
        """The token-id rows `index` of one side (int64 arrays), read with pread."""
        off, fd, item = self._offsets[side], self._fds[side], self.dtype.itemsize
        out = []
        for i in index.tolist():
            start, end = int(off[i]), int(off[i + 1])
            raw = os.pread(fd, (end - start) * item, start * item)
            out.append(np.frombuffer(raw, dtype=self.dtype).astype(np.int64))
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@dataclass
class TrainingSet:
    """Several prepared corpora with their weights, seen as one index space.

    Corpus c holds global ids base_c .. base_c + n_c - 1. An epoch takes from each corpus
    floor(w_c) full passes plus round(frac(w_c) * n_c) pairs sampled without replacement, with a
    generator seeded by (seed, epoch, c): `epoch_ids`.
    """

    corpora: list[PreparedCorpus]
    weights: list[float]

    def __post_init__(self) -> None:
        sizes = [len(c) for c in self.corpora]
        self.base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.src_lens = np.concatenate([c.src_lens for c in self.corpora]).astype(np.int32)
        self.tgt_lens = np.concatenate([c.tgt_lens for c in self.corpora]).astype(np.int32)

    def __len__(self) -> int:
        return int(self.base[-1])

    def per_epoch(self) -> dict[str, int]:
        """Pairs each corpus contributes to one epoch."""
        return {c.name: epoch_count(len(c), w) for c, w in zip(self.corpora, self.weights)}

    def epoch_ids(self, seed: int, epoch: int) -> np.ndarray:
        """The global ids of one epoch's pairs (repeats for weights above 1), in corpus order."""
        parts = []
        for c, (corpus, w) in enumerate(zip(self.corpora, self.weights)):
            n, full = len(corpus), int(w)
            local = [np.tile(np.arange(n, dtype=np.int64), full)] if full else []
            extra = epoch_count(n, w) - full * n
            if extra:
                rng = np.random.default_rng([seed, epoch, 1 + c])
                local.append(np.sort(rng.choice(n, extra, replace=False)))
            parts.extend(p + self.base[c] for p in local)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def rows(self, ids: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(source rows, target rows) of the global ids, in the order given."""
        src: list[Optional[np.ndarray]] = [None] * len(ids)
        tgt: list[Optional[np.ndarray]] = [None] * len(ids)
        which = np.searchsorted(self.base, ids, side="right") - 1
        for c in np.unique(which).tolist():
            pos = np.nonzero(which == c)[0]
            local = ids[pos] - self.base[c]
            for p, s, t in zip(pos.tolist(), self.corpora[c].rows("src", local), self.corpora[c].rows("tgt", local)):
                src[p], tgt[p] = s, t
        return src, tgt  # type: ignore[return-value]


def epoch_count(n: int, weight: float) -> int:
    """Pairs of an n-pair corpus in one epoch at this weight: floor(w) * n + round(frac(w) * n), at most n extra."""
    full = int(weight)
    return full * n + min(n, round((weight - full) * n))
