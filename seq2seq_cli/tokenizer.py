"""SentencePiece subword tokenizers: training from in-memory sentences, loading, encode/decode.

This module is the single source of truth for the special token ids (PAD_ID, UNK_ID, BOS_ID,
EOS_ID). A `Tokenizer` is built from serialized model protos (bytes), so a checkpoint can embed
it (`to_state` / `from_state`). On disk a joint tokenizer is `spm.model`; separate ones are
`src.model` and `tgt.model`. It knows nothing about batches or tensors.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

import sentencepiece as spm

from .atomic import atomic_write
from .recipe import TokenizerConfig, UserError

__all__ = ["PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID", "NORMALIZATION", "TokenizerError", "Tokenizer", "train_tokenizer"]

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
# nmt_nfkc (sentencepiece's default) = Unicode NFKC plus folding of odd whitespace and control
# characters. NFKC leaves every line of the bundled corpus unchanged (typographic quotes, dashes,
# precomposed accents), so decode(encode(x)) == x holds there, while user corpora with full-width
# or compatibility characters get consistently normalised input and output.
NORMALIZATION = "nmt_nfkc"
SEED = 1  # sentencepiece's global RNG, and the seed of the tokenizer's reservoir sample

Side = Literal["src", "tgt"]


class TokenizerError(UserError):
    """A user-facing tokenizer problem (missing/corrupt model file, vocabulary too small)."""


def _processor(proto: bytes, name: str) -> spm.SentencePieceProcessor:
    """Parse a model proto and check that it uses this package's fixed special ids."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=bytes(proto))
    except (RuntimeError, TypeError):
        raise TokenizerError(f"{name}: not a valid sentencepiece model (could not parse it)") from None
    if sp.get_piece_size() <= EOS_ID:
        raise TokenizerError(f"{name}: not a valid sentencepiece model (only {sp.get_piece_size()} pieces)")
    got = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
    if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise TokenizerError(
            f"{name}: special ids (pad, unk, bos, eos) are {got}, expected "
            f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain it with `translate`"
        )
    return sp


class Tokenizer:
    """One joint or two separate (source, target) sentencepiece models.

    Encoding returns piece ids only; callers add BOS/EOS. `tgt_proto=None` means joint.
    """

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, src_proto: bytes, tgt_proto: Optional[bytes] = None, num_threads: Optional[int] = None) -> None:
        self._protos = (bytes(src_proto), None if tgt_proto is None else bytes(tgt_proto))
        self._src = _processor(src_proto, "spm.model" if tgt_proto is None else "src.model")
        self._tgt = self._src if tgt_proto is None else _processor(tgt_proto, "tgt.model")
        self._threads = num_threads or os.cpu_count() or 1

    # ------------------------------------------------------------------------- properties
    @property
    def joint(self) -> bool:
        return self._protos[1] is None

    @property
    def src_vocab_size(self) -> int:
        return self._src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self._tgt.get_piece_size()

    def _sp(self, side: Side) -> spm.SentencePieceProcessor:
        if side not in ("src", "tgt"):
            raise ValueError(f"side must be 'src' or 'tgt', got {side!r}")
        return self._src if side == "src" else self._tgt

    def id_to_piece(self, idx: int, side: Side = "tgt") -> str:
        return self._sp(side).id_to_piece(idx)

    # --------------------------------------------------------------------- encode / decode
    def encode_src(self, text: str) -> list[int]:
        return self._src.encode(text, out_type=int)

    def encode_tgt(self, text: str) -> list[int]:
        return self._tgt.encode(text, out_type=int)

    def encode_src_batch(self, lines: Sequence[str]) -> list[list[int]]:
        """Encode many lines at once (sentencepiece's multi-threaded batch encoder)."""
        return self._src.encode(list(lines), out_type=int, num_threads=self._threads)

    def encode_tgt_batch(self, lines: Sequence[str]) -> list[list[int]]:
        return self._tgt.encode(list(lines), out_type=int, num_threads=self._threads)

    def _decode(self, sp: spm.SentencePieceProcessor, ids: Sequence[int]) -> str:
        # PAD/BOS/EOS are dropped; UNK decodes as sentencepiece's " ⁇ " so the gap stays visible.
        return sp.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])

    def decode_src(self, ids: Sequence[int]) -> str:
        return self._decode(self._src, ids)

    def decode_tgt(self, ids: Sequence[int]) -> str:
        return self._decode(self._tgt, ids)

    def pieces_per_sentence(self, lines: Sequence[str], side: Side) -> float:
        """Mean number of pieces per line on one side (0.0 for no lines)."""
        if not lines:
            return 0.0
        encoded = self._sp(side).encode(list(lines), out_type=int, num_threads=self._threads)
        return sum(map(len, encoded)) / len(encoded)

    def coverage(self, lines: Sequence[str], side: Side) -> tuple[float, float]:
        """How well this vocabulary covers some text: (unknown-piece rate, pieces per line).

        unknown-piece rate = (pieces that are UNK) / (all pieces), over all lines; (0.0, 0.0) for no lines.
        """
        if not lines:
            return 0.0, 0.0
        encoded = self._sp(side).encode(list(lines), out_type=int, num_threads=self._threads)
        pieces = sum(map(len, encoded))
        unknown = sum(ids.count(UNK_ID) for ids in encoded)
        return unknown / max(1, pieces), pieces / len(encoded)

    # ------------------------------------------------------------------- state and files
    def to_state(self) -> dict[str, Optional[bytes]]:
        """Plain dict for a checkpoint: {"src": bytes, "tgt": bytes | None (joint)}."""
        return {"src": self._protos[0], "tgt": self._protos[1]}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("src"), (bytes, bytearray))
            or not isinstance(state.get("tgt"), (bytes, bytearray, type(None)))
        ):
            raise TokenizerError("checkpoint tokenizer state must be {'src': bytes, 'tgt': bytes or None}")
        return cls(state["src"], state["tgt"])

    def save(self, out_dir: Path) -> None:
        """Write spm.model (joint) or src.model + tgt.model, plus readable .vocab files, atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = ("spm",) if self.joint else ("src", "tgt")
        stale = ("src", "tgt") if self.joint else ("spm",)
        for name, sp, proto in zip(names, (self._src, self._tgt), self._protos):
            atomic_write(out_dir / f"{name}.model", proto)
            vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
            atomic_write(out_dir / f"{name}.vocab", vocab.encode("utf-8"))
        for name in stale:  # never leave both layouts in one directory
            for suffix in (".model", ".vocab"):
                (out_dir / f"{name}{suffix}").unlink(missing_ok=True)

    @classmethod
    def load(cls, out_dir: Path) -> "Tokenizer":
        """Read spm.model, or src.model + tgt.model, from out_dir."""
        out_dir = Path(out_dir)
        if (out_dir / "spm.model").is_file():
            return cls(_read(out_dir / "spm.model"), None)
        src, tgt = out_dir / "src.model", out_dir / "tgt.model"
        if src.is_file() or tgt.is_file():
            return cls(_read(src), _read(tgt))
        raise TokenizerError(f"{out_dir / 'spm.model'}: tokenizer model not found (nor src.model + tgt.model)")


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer model not found")
    data = path.read_bytes()
    _processor(data, str(path))  # validate here so the message names the full path
    return data


# ---------------------------------------------------------------------------------- training


def _train_one(cfg: TokenizerConfig, lines: Iterable[str], what: str, num_threads: int) -> bytes:
    """Train one sentencepiece model from non-empty lines; return its serialized proto."""
    sentences = [line for line in lines if line.strip()]
    if not sentences:
        raise TokenizerError(f"cannot train the {what} tokenizer: no non-empty lines")
    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=cfg.type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            input_sentence_size=0,  # every line given: the caller samples (pipeline.run_tokenizer)
            shuffle_input_sentence=False,
            byte_fallback=cfg.byte_fallback,
            user_defined_symbols=list(cfg.user_defined_symbols),
            normalization_rule_name=NORMALIZATION,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=SPECIAL_PIECES[PAD_ID],
            unk_piece=SPECIAL_PIECES[UNK_ID],
            bos_piece=SPECIAL_PIECES[BOS_ID],
            eos_piece=SPECIAL_PIECES[EOS_ID],
            hard_vocab_limit=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc)
        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if small:
            raise TokenizerError(
                f"tokenizer.vocab_size {small[1]} is too small for the {what} corpus: its characters and "
                f"special pieces need {small[2]} (raise vocab_size or lower character_coverage)"
            ) from None
        last = msg.strip().splitlines()[-1] if msg.strip() else type(exc).__name__
        raise TokenizerError(f"training the {what} tokenizer failed: {last}") from None
    return model.getvalue()


def train_tokenizer(
    cfg: TokenizerConfig,
    src_lines: Sequence[str],
    tgt_lines: Sequence[str],
    out_dir: Path,
    num_threads: Optional[int] = None,
) -> Tokenizer:
    """Train joint (spm.model on src+tgt) or separate (src.model, tgt.model) models and save them.

    Empty lines are skipped. The result depends only on the lines, cfg and num_threads
    (default os.cpu_count(); sentencepiece's models differ slightly between thread counts).
    `hard_vocab_limit=False`: a vocab_size larger than the corpus supports yields a smaller vocab.
    """
    threads = num_threads or os.cpu_count() or 1
    if cfg.joint:
        protos = (_train_one(cfg, itertools.chain(src_lines, tgt_lines), "joint", threads), None)
    else:
        protos = (_train_one(cfg, src_lines, "source", threads), _train_one(cfg, tgt_lines, "target", threads))
    tok = Tokenizer(*protos, num_threads=threads)
    tok.save(Path(out_dir))
    log.info(
        "tokenizer (%s, %s): vocab src %d tgt %d -> %s",
        cfg.type,
        "joint" if cfg.joint else "separate",
        tok.src_vocab_size,
        tok.tgt_vocab_size,
        out_dir,
    )
    return tok
