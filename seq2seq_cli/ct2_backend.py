"""Decoding through CTranslate2: `translate decode --backend ctranslate2 DIR`.

DIR is a directory written by `translate export --format ctranslate2` (see export.py): a
CTranslate2 model (model.bin, config.json, vocabularies), the sentencepiece model(s) and
EXPORT_INFO (translate_export.json: decode defaults, max_positions, parity figures).

Search settings are mapped so that CTranslate2 runs the same search as `search.py`:
  * source = pieces + "</s>" (truncated to max_positions - 1 pieces first), decoding starts at <s>;
  * max_len = min(int(max_len_a * |X| + max_len_b), max_positions - 1) per sentence, |X| counting
    the source EOS; CTranslate2 takes one max_decoding_length per call, so sentences are grouped
    by their max_len and each group gets max_decoding_length = max_len: where search.py forces EOS
    after max_len tokens, CTranslate2 stops there, so the tokens are the same (such a hypothesis's
    score differs: ours includes the forced EOS, which can reorder beams that all hit max_len);
  * return_end_token=True, so CTranslate2's length |Y| counts EOS as ours does, and its power
    length penalty score / |Y|^alpha is ours exactly; <pad> and <s> are suppressed (ours bans them);
  * beam search ends a sentence once `beam` hypotheses are finished (patience 1), fairseq's rule,
    which is ours with `stop_early: true`.
What does not map exactly: the GNMT length penalty ((5+|Y|)/6)^alpha (CTranslate2 has only the
power form: the power form with the same alpha is used, with a warning; greedy output does not
depend on it), the coverage penalty (refused: CTranslate2 skips never-attended source tokens instead
of penalising them, and reads other attention heads), sampling, no_repeat_ngram, ensembles, and
`stop_early: false` (CTranslate2 always stops at `beam` finished hypotheses).

Public names: EXPORT_INFO, BackendError, CT2Translator, is_export, run_decode_ct2.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from .data import DataError, clean_line
from .recipe import UserError
from .tokenizer import Tokenizer, TokenizerError

__all__ = ["EXPORT_INFO", "BackendError", "CT2Translator", "is_export", "import_ctranslate2", "run_decode_ct2",
           "PRECISION_TO_COMPUTE"]

EXPORT_INFO = "translate_export.json"
EXPORT_FORMAT = "translate-ctranslate2"
PRECISION_TO_COMPUTE = {"fp32": "float32", "int8": "int8", "bf16": "bfloat16"}

log = logging.getLogger(__name__)


class BackendError(UserError):
    """A CTranslate2 export that cannot be used, or settings CTranslate2 cannot run; names the file."""


def import_ctranslate2() -> Any:
    """The ctranslate2 module, or a one-line user error telling how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise BackendError('ctranslate2 is not installed: pip install -e ".[export]"') from None
    return ctranslate2


def is_export(directory: Path) -> bool:
    """Whether `directory` looks like a `translate export --format ctranslate2` output."""
    directory = Path(directory)
    return (directory / EXPORT_INFO).is_file() and (directory / "model.bin").is_file()


def read_export_info(directory: Path) -> dict[str, Any]:
    """The export's JSON (format, max_positions, decode defaults, parity), checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BackendError(f"{directory}: not a directory; --backend ctranslate2 needs a directory written by "
                           "`translate export --format ctranslate2`")
    if not is_export(directory):
        raise BackendError(f"{directory}: not a CTranslate2 export (no {EXPORT_INFO} and model.bin); "
                           "write one with `translate export CKPT -o DIR`")
    try:
        info = json.loads((directory / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendError(f"{directory / EXPORT_INFO}: unreadable ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or "max_positions" not in info:
        raise BackendError(f"{directory / EXPORT_INFO}: not a translate export description")
    return info


def max_decode_len(n_src: int, max_len_a: float, max_len_b: int, max_positions: int) -> int:
    """search.py's rule: min(int(a * |X| + b), max_positions - 1); |X| = source ids including EOS."""
    return min(int(max_len_a * n_src + max_len_b), max_positions - 1)


class CT2Translator:
    """A CTranslate2 export + its tokenizer, translating raw lines like `translate.Translator`."""

    def __init__(self, directory: Path | str, device: str = "cpu", threads: int = 0,
                 compute_type: str = "default") -> None:
        self.directory = Path(directory)
        self.info = read_export_info(self.directory)
        ct2 = import_ctranslate2()
        try:
            self.tokenizer = Tokenizer.load(self.directory)
        except TokenizerError as exc:
            raise BackendError(str(exc)) from None
        try:
            self.translator = ct2.Translator(str(self.directory), device=device, compute_type=compute_type,
                                             intra_threads=threads)
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"{self.directory}: CTranslate2 cannot load it ({str(exc).splitlines()[0]})") from None
        self.max_positions = int(self.info["max_positions"])
        self.decode_defaults: dict[str, Any] = dict(self.info.get("decode") or {})
        self.target_tokens = 0
        n_tgt = self.tokenizer.tgt_vocab_size
        self._tgt_ids = {self.tokenizer.id_to_piece(i, "tgt"): i for i in range(n_tgt)}

    def _src_pieces(self, line: str) -> list[str]:
        ids = self.tokenizer.encode_src(line)[: self.max_positions - 1]
        sp = self.tokenizer.id_to_piece
        return [sp(i, "src") for i in ids] + ["</s>"]

    def translate_pieces(self, lines: Sequence[str], beam: int = 5, n_best: int = 1, alpha: float = 0.6,
                         max_len_a: float = 1.5, max_len_b: int = 10, min_len: int = 0,
                         batch_tokens: int = 4096) -> list[list[tuple[list[int], float]]]:
        """(target ids without EOS, score) for the n_best hypotheses of each line, best first; [] for
        an empty line. The power length penalty |Y|^alpha (|Y| with EOS) ranks finished hypotheses."""
        cleaned = [clean_line(x) for x in lines]
        out: list[list[tuple[list[int], float]]] = [[] for _ in lines]
        groups: dict[int, list[tuple[int, list[str]]]] = defaultdict(list)
        for i, text in enumerate(cleaned):
            if text:
                pieces = self._src_pieces(text)
                groups[max_decode_len(len(pieces), max_len_a, max_len_b, self.max_positions)].append((i, pieces))
        unk = self.tokenizer.unk_id
        for max_len, items in sorted(groups.items()):
            if max_len <= 0:  # search.py forces EOS at once: an empty translation
                for i, _ in items:
                    out[i] = [([], 0.0)]
                continue
            results = self.translator.translate_batch(
                [p for _, p in items], beam_size=beam, num_hypotheses=n_best, length_penalty=alpha,
                patience=1.0, max_decoding_length=max_len, min_decoding_length=min_len,
                return_end_token=True, return_scores=True, max_input_length=0,
                suppress_sequences=[["<pad>"], ["<s>"]], max_batch_size=max(1, batch_tokens // beam),
                batch_type="tokens")
            for (i, _), res in zip(items, results):
                hyps = []
                for pieces, score in zip(res.hypotheses, res.scores):
                    if pieces and pieces[-1] == "</s>":
                        pieces = pieces[:-1]
                    hyps.append(([self._tgt_ids.get(p, unk) for p in pieces], float(score)))
                out[i] = hyps
                self.target_tokens += len(hyps[0][0]) if hyps else 0
        return out

    def translate_lines(self, lines: Sequence[str], beam: int = 5, n_best: int = 1, alpha: float = 0.6,
                        max_len_a: float = 1.5, max_len_b: int = 10, min_len: int = 0,
                        batch_tokens: int = 4096) -> list[list[tuple[str, float]]]:
        """(detokenised text, score) for the n_best hypotheses of each line; [] for an empty line."""
        hyps = self.translate_pieces(lines, beam, n_best, alpha, max_len_a, max_len_b, min_len, batch_tokens)
        return [[(self.tokenizer.decode_tgt(ids), score) for ids, score in h] for h in hyps]

    def options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Search settings: the export's decode defaults, then non-None overrides; refuse what does
        not map (sampling, coverage penalty) and warn where GNMT is replaced by the power form."""
        o = {**self.decode_defaults, **{k: v for k, v in overrides.items() if v is not None}}
        if o.get("sample"):
            raise BackendError(f"{self.directory}: --sample is not supported with --backend ctranslate2")
        if float(o.get("beta", 0.0)) > 0:
            raise BackendError(f"{self.directory}: the coverage penalty (beta={o['beta']}) has no exact CTranslate2 "
                               "equivalent; use --beta 0 or --backend torch")
        beam, n_best = int(o.get("beam", 5)), int(o.get("n_best", 1))
        if n_best > beam:
            raise DataError(f"--n-best ({n_best}) must not exceed --beam ({beam})")
        alpha = float(o.get("alpha", 0.6))
        if o.get("length_penalty", "gnmt") == "gnmt" and alpha != 0 and beam > 1:
            log.warning(gnmt_warning(alpha))
        if o.get("no_repeat_ngram", 0):
            raise BackendError(f"{self.directory}: no_repeat_ngram is not mapped for --backend ctranslate2")
        return {"beam": beam, "n_best": n_best, "alpha": alpha, "max_len_a": float(o.get("max_len_a", 1.5)),
                "max_len_b": int(o.get("max_len_b", 10)), "min_len": int(o.get("min_len", 0))}


def gnmt_warning(alpha: float) -> str:
    return (f"CTranslate2 has no GNMT length penalty: ranking finished hypotheses by score / |Y|^{alpha} "
            f"(power form, same alpha) instead of ((5+|Y|)/6)^{alpha}; use --length-penalty power for "
            "identical beam results")


def run_decode_ct2(directory: Path, input: str, output: str, overrides: dict[str, Any],
                   batch_tokens: Optional[int], stream: bool, device: str, threads: int, encoding_errors: str,
                   precision: Optional[str] = None) -> int:
    """`translate decode --backend ctranslate2 DIR`: read lines, translate in order, write atomically.

    Same contract as translate.run_decode: one output line per input line (n-best: TSV rows
    index<TAB>score<TAB>text), empty lines stay empty, stdin is translated as it arrives.
    Returns the number of lines translated.
    """
    import sys

    from .textio import AtomicOutput, file_chunks, stdin_chunks

    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"--encoding-errors must be strict or replace, not {encoding_errors!r}")
    if overrides.get("length_penalty") not in (None, "gnmt", "power"):
        raise DataError(f"--length-penalty must be gnmt or power, not {overrides['length_penalty']!r}")
    if precision is not None and precision not in PRECISION_TO_COMPUTE:
        raise DataError(f"--precision must be one of {', '.join(PRECISION_TO_COMPUTE)}, not {precision!r}")
    compute = PRECISION_TO_COMPUTE[precision] if precision else "default"
    ct2_device = "cpu" if device in ("auto", "cpu") else device.split(":")[0]
    translator = CT2Translator(directory, ct2_device, threads, compute)
    opts = translator.options(overrides)
    budget = batch_tokens or int(translator.decode_defaults.get("batch_tokens", 4096))
    counts: dict = {}
    from_stdin = input == "-"
    chunks = (stdin_chunks(1 if stream else 2000, encoding_errors, counts) if from_stdin
              else file_chunks(Path(input), 2000, encoding_errors, counts))
    out = AtomicOutput(output)
    index = 0
    try:
        for chunk in chunks:
            hyps = translator.translate_lines(chunk, batch_tokens=budget, **opts)
            rows = [r for i, h in enumerate(hyps) for r in format_rows(h, index + i, opts["n_best"])]
            out.write_lines(rows, flush=from_stdin or output == "-")
            index += len(chunk)
        out.commit()
    except BaseException:
        out.abort()
        raise
    if counts.get("replaced_lines"):
        sys.stderr.write(f"{counts['replaced_lines']} lines with invalid UTF-8 replaced\n")
    return index


def format_rows(hyps: list[tuple[str, float]], index: int, n_best: int) -> list[str]:
    """1-best: the text (empty for an empty line); n-best: 'index<TAB>score<TAB>text' rows (as translate.py)."""
    if n_best <= 1:
        return [hyps[0][0] if hyps else ""]
    if not hyps:
        return [f"{index}\t0.0\t"]
    return [f"{index}\t{score:.4f}\t{text}" for text, score in hyps[:n_best]]
