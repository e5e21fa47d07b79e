"""The model file: one self-contained checkpoint, and the only module that knows its keys.

A checkpoint file is a plain dict of tensors and primitives written by `torch.save` and read
with `torch.load(weights_only=True)`, so a forged file carrying a pickled object that would run
code is refused, never executed. Format 2 keys: format_version, content_sha256, step, recipe
(resolved, as plain data), decode (the decoding defaults: the recipe's decode section, later
`translate tune`'s winner), model (weights), tokenizer (sentencepiece model bytes: src, and tgt
or None when joint), training (position, optimizer, scheduler, scaler, rng; absent in averaged
files) and averaged_from (averaged files only). Format 1 files (no hash, training keys at the
top level) are still read; files from a newer format are refused with a one-line error.

`content_sha256` = SHA-256 over every weight (name, dtype, shape, bytes, in name order) and the
tokenizer bytes; it is checked on load, so a corrupted or hand-edited model file is refused.
Writes are atomic (`atomic.AtomicFile`): a crash or a full disk leaves the previous file intact.

Everything else in the package sees a `Checkpoint` (typed fields), never the dict.
Public names: FORMAT_VERSION, CheckpointError, Checkpoint, TrainingState, save_checkpoint,
load_checkpoint, load_model, content_hash, average_checkpoints, prune_checkpoints,
step_checkpoints, link_checkpoint, RunDir.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from pydantic import ValidationError

from .atomic import AtomicFile
from .model import Seq2SeqTransformer, build_model
from .recipe import DecodeConfig, Recipe, RecipeError, UserError, recipe_from_dict
from .tokenizer import Tokenizer

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "Checkpoint",
    "TrainingState",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "content_hash",
    "average_checkpoints",
    "prune_checkpoints",
    "RunDir",
    "link_checkpoint",
    "step_checkpoints",
]

FORMAT_VERSION = 2
_TRAINING_KEYS = ("position", "optimizer", "scheduler", "scaler", "rng")


class CheckpointError(UserError):
    """A checkpoint that cannot be written or used; the message names the file."""


@dataclass(frozen=True)
class TrainingState:
    """What a run needs to resume exactly, besides the weights."""

    position: dict[str, Any]  # step, epoch, batches_done, seconds, best_score, bad_validations
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]  # torch, python, cuda (or None)
    scaler: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class Checkpoint:
    """A model file's content: recipe, weights, tokenizer, decoding defaults (+ training state)."""

    recipe: Recipe
    weights: Mapping[str, torch.Tensor]
    tokenizer: Mapping[str, Optional[bytes]]  # Tokenizer.to_state()
    decode: DecodeConfig
    step: int = 0
    training: Optional[TrainingState] = None
    averaged_from: tuple[str, ...] = ()
    path: Optional[Path] = field(default=None, compare=False)  # where it was read from
    sha256: str = field(default="", compare=False)  # content hash of weights + tokenizer, as read (checked)

    def where(self) -> str:
        return str(self.path) if self.path is not None else "<checkpoint>"


def content_hash(weights: Mapping[str, torch.Tensor], tokenizer: Mapping[str, Optional[bytes]]) -> str:
    """SHA-256 of the weights (name, dtype, shape and bytes, in name order) and the tokenizer bytes."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    for side in ("src", "tgt"):
        proto = tokenizer.get(side)
        h.update(f"{side}|{-1 if proto is None else len(proto)}\n".encode())
        h.update(proto or b"")
    return h.hexdigest()


def _to_state(ckpt: Checkpoint) -> dict[str, Any]:
    state: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "content_sha256": content_hash(ckpt.weights, ckpt.tokenizer),
        "step": ckpt.step,
        "recipe": ckpt.recipe.model_dump(mode="json"),
        "decode": ckpt.decode.model_dump(mode="json"),
        "model": dict(ckpt.weights),
        "tokenizer": dict(ckpt.tokenizer),
    }
    if ckpt.training is not None:
        t = ckpt.training
        state["training"] = {
            "position": t.position,
            "optimizer": t.optimizer,
            "scheduler": t.scheduler,
            "scaler": t.scaler,
            "rng": t.rng,
        }
    if ckpt.averaged_from:
        state["averaged_from"] = list(ckpt.averaged_from)
    return state


def save_checkpoint(path: Path | str, ckpt: Checkpoint) -> None:
    """Atomically write a checkpoint file (its content hash computed here)."""
    path = Path(path)
    state = _to_state(ckpt)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = AtomicFile(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint: {exc.strerror}") from None
    try:
        torch.save(state, out.handle)
        out.commit()
    except BaseException as exc:
        out.abort()
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
        raise CheckpointError(
            f"{path}: refused: the file holds objects other than tensors and plain data "
            f"(it could run code when loaded) [{first[:120]}]"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a translate checkpoint (no format_version/model entries)")
    version = state["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: checkpoint format_version {version!r} is not valid")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version} was written by a newer translate "
            f"(this version reads up to {FORMAT_VERSION}): upgrade translate to use it"
        )
    return state


def _from_state(path: Path, state: dict[str, Any]) -> Checkpoint:
    try:
        recipe = recipe_from_dict(state["recipe"], f"{path} (stored recipe)", stored=True)
    except (RecipeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: stored recipe is invalid: {exc}") from None
    try:
        decode = DecodeConfig.model_validate(state.get("decode") or recipe.decode.model_dump())
    except ValidationError as exc:
        raise CheckpointError(
            f"{path}: stored decode settings are invalid ({exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})"
        ) from None
    weights, tokenizer = state["model"], state.get("tokenizer")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: the model entry is not a dict of tensors")
    if not isinstance(tokenizer, dict):
        raise CheckpointError(f"{path}: no tokenizer stored")
    digest = content_hash(weights, tokenizer)  # format 1 files have none stored: computed for `sha256`
    if state["format_version"] >= 2:
        stored = state.get("content_sha256")
        if not isinstance(stored, str) or stored != digest:
            raise CheckpointError(
                f"{path}: content hash mismatch: the weights or tokenizer were changed "
                "after the file was written (corrupt or hand-edited); refusing it"
            )
    training_state = (
        state.get("training")
        if state["format_version"] >= 2
        else ({k: state[k] for k in _TRAINING_KEYS if k in state} if "optimizer" in state else None)
    )
    training = None
    if training_state:
        training = TrainingState(
            training_state["position"],
            training_state["optimizer"],
            training_state["scheduler"],
            training_state["rng"],
            training_state.get("scaler"),
        )
    return Checkpoint(
        recipe,
        weights,
        tokenizer,
        decode,
        int(state.get("step", 0)),
        training,
        tuple(state.get("averaged_from", ())),
        path,
        digest,
    )


def load_checkpoint(path: Path | str, mmap: bool = False) -> Checkpoint:
    """Read and check a checkpoint file (weights_only, version, content hash, recipe, decode settings).

    mmap=True maps the tensors from the file instead of reading it whole (copy-on-write; a later
    atomic save makes a new file, so the mapping stays valid): ~30 ms less start-up for a model
    that is copied into place next anyway.
    """
    path = Path(path)
    return _from_state(path, _read(path, mmap))


def load_model(ckpt: Checkpoint, device: torch.device | str = "cpu") -> tuple[Seq2SeqTransformer, Tokenizer]:
    """Rebuild the model and tokenizer stored in a checkpoint (strict weight loading)."""
    try:
        tok = Tokenizer.from_state(dict(ckpt.tokenizer))
    except Exception as exc:  # sentencepiece raises bare RuntimeErrors on bad protos
        raise CheckpointError(f"{ckpt.where()}: stored tokenizer is unreadable ({exc})") from None
    emb = ckpt.weights.get("tgt_embed.weight")
    if emb is None or emb.size(0) != tok.tgt_vocab_size:
        got = None if emb is None else emb.size(0)
        raise CheckpointError(
            f"{ckpt.where()}: tokenizer vocabulary ({tok.tgt_vocab_size}) does not match the model's embedding ({got})"
        )
    model = build_model(
        ckpt.recipe.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, init=False
    )  # every weight is loaded next (strict)
    try:
        model.load_state_dict(dict(ckpt.weights), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{ckpt.where()}: weights do not fit the stored model shape ({str(exc).splitlines()[0][:160]})"
        ) from None
    return model.to(device).eval(), tok


def average_checkpoints(paths: Sequence[Path]) -> Checkpoint:
    """Element-wise mean of the model weights of several checkpoints of the same model.

    theta_avg = (1/n) * sum_k theta_k. The result keeps the first checkpoint's recipe, tokenizer
    and decoding defaults and has no training state (it is a model for decoding, not for resuming).
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first = load_checkpoint(Path(paths[0]))
    total = {k: v.double().clone() if v.is_floating_point() else v for k, v in first.weights.items()}
    for p in paths[1:]:
        other = load_checkpoint(Path(p)).weights
        if other.keys() != total.keys() or any(other[k].shape != total[k].shape for k in total):
            raise CheckpointError(f"{p}: cannot average: a different model shape than {paths[0]}")
        for k, v in other.items():
            if v.is_floating_point():
                total[k] += v.double()
    weights = {k: (v / len(paths)).to(first.weights[k].dtype) if v.is_floating_point() else v for k, v in total.items()}
    return Checkpoint(
        first.recipe, weights, first.tokenizer, first.decode, first.step, averaged_from=tuple(str(p) for p in paths)
    )


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
