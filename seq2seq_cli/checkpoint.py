"""THE checkpoint format: one self-contained file per checkpoint.

A checkpoint is a plain dict of tensors and primitives, loaded with
`torch.load(weights_only=True)`, so a forged file carrying a pickled object that would run
code is refused, never executed. Keys (only this module knows them): format_version, step,
epoch, batch_in_epoch, recipe (resolved, as plain data), model, optimizer, scheduler, scaler,
rng, tokenizer (sentencepiece model bytes), best_score, validations, metrics.

Writes are atomic: temp file in the same directory, fsync, os.replace, fsync of the directory;
a crash or a full disk during a save leaves the previous file intact.

Public names: FORMAT_VERSION, CheckpointError, Checkpoint, save_checkpoint, load_checkpoint,
load_model, average_checkpoints, prune_checkpoints.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .model import Seq2SeqTransformer, build_model
from .recipe import Recipe, RecipeError, UserError, recipe_from_dict
from .tokenizer import Tokenizer, set_default_mode

__all__ = ["FORMAT_VERSION", "CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint",
           "load_model", "average_checkpoints", "prune_checkpoints", "RunDir", "link_checkpoint",
           "step_checkpoints"]

FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be written or used; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the validated recipe and the raw state for training to resume."""

    path: Path
    recipe: Recipe
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write `state` (format_version added) to path."""
    path = Path(path)
    state = {"format_version": FORMAT_VERSION, **state}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        set_default_mode(fd)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(exc, (OSError, RuntimeError)):
            raise
        reason = "disk full" if getattr(exc, "errno", None) == errno.ENOSPC or "No space" in str(exc) else str(exc)
        raise CheckpointError(f"{path}: cannot write checkpoint ({reason}); the previous file is kept") from None


def _read(path: Path, mmap: bool = False) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        raise CheckpointError(f"{path}: refused: the file holds objects other than tensors and plain data "
                              f"(it could run code when loaded) [{first[:120]}]") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    if not isinstance(state, dict) or "format_version" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a translate checkpoint (no format_version/model entries)")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {state['format_version']!r} is not supported "
                              f"(this version of translate reads {FORMAT_VERSION})")
    return state


def load_checkpoint(path: Path | str, mmap: bool = False) -> Checkpoint:
    """Read and check a checkpoint file (weights_only), returning its recipe and state.

    mmap=True maps the tensors from the file instead of reading it whole (copy-on-write; a later
    atomic save makes a new file, so the mapping stays valid): ~30 ms less start-up for a model
    that is copied into place next anyway.
    """
    path = Path(path)
    state = _read(path, mmap)
    try:
        recipe = recipe_from_dict(state["recipe"], f"{path} (stored recipe)")
    except (RecipeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: stored recipe is invalid: {exc}") from None
    return Checkpoint(path, recipe, state)


def load_model(ckpt: Checkpoint, device: torch.device | str = "cpu") -> tuple[Seq2SeqTransformer, Tokenizer]:
    """Rebuild the model and tokenizer stored in a checkpoint (strict weight loading)."""
    try:
        tok = Tokenizer.from_state(ckpt.state["tokenizer"])
    except Exception as exc:  # sentencepiece raises bare RuntimeErrors on bad protos
        raise CheckpointError(f"{ckpt.path}: stored tokenizer is unreadable ({exc})") from None
    weights = ckpt.state["model"]
    emb = weights.get("tgt_embed.weight")
    if emb is None or emb.size(0) != tok.tgt_vocab_size:
        got = None if emb is None else emb.size(0)
        raise CheckpointError(f"{ckpt.path}: tokenizer vocabulary ({tok.tgt_vocab_size}) does not match "
                              f"the model's embedding ({got})")
    model = build_model(ckpt.recipe.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id, tok.bos_id,
                        tok.eos_id, init=False)  # every weight is loaded next (strict)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path}: weights do not fit the stored model shape "
                              f"({str(exc).splitlines()[0][:160]})") from None
    return model.to(device).eval(), tok


def average_checkpoints(paths: Sequence[Path]) -> dict[str, Any]:
    """Element-wise mean of the model weights of several checkpoints of the same model.

    theta_avg = (1/n) * sum_k theta_k. The result keeps the first checkpoint's recipe and
    tokenizer and drops optimizer state (it is a model for decoding, not for resuming).
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first = _read(Path(paths[0]))
    total = {k: v.double().clone() if v.is_floating_point() else v for k, v in first["model"].items()}
    for p in paths[1:]:
        other = _read(Path(p))["model"]
        if other.keys() != total.keys() or any(other[k].shape != total[k].shape for k in total):
            raise CheckpointError(f"{p}: cannot average: a different model shape than {paths[0]}")
        for k, v in other.items():
            if v.is_floating_point():
                total[k] += v.double()
    model = {k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v
             for k, v in total.items()}
    keep = ("recipe", "tokenizer", "step", "epoch", "best_score", "decode")
    return {**{k: first[k] for k in keep if k in first}, "model": model, "averaged_from": [str(p) for p in paths]}


_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def step_checkpoints(directory: Path) -> list[Path]:
    """The `step-N.pt` files of a directory, oldest first."""
    found = [(int(m.group(1)), p) for p in directory.glob("step-*.pt") if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step-N.pt files."""
    for p in step_checkpoints(directory)[:-keep_last]:
        p.unlink(missing_ok=True)




@dataclass(frozen=True)
class RunDir:
    """The layout of a recipe's output directory (the one place that names these files)."""

    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def average(self) -> Path:
        return self.checkpoints / "average.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def step_file(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}.pt"


def link_checkpoint(src: Path, dst: Path) -> None:
    """Atomically make dst a copy of the finished file src (a hard link where possible)."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
