"""`translate tune CKPT`: choose beam size, length-penalty alpha and coverage beta on the dev set.

The search is a small staged grid, every point a real decode scored with sacrebleu:
  1. every (beam, alpha) pair with beta = 0;
  2. every beta at the best (beam, alpha).
The winner (highest dev BLEU; ties go to the smaller beam, then the earlier grid point) is written
into the checkpoint's stored decode defaults, so a later `translate decode CKPT` uses it. The
dev set is the one in the checkpoint's recipe unless other files are given. Never tune on test.

Public names: tune.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import read_lines, read_split
from .score import check_same_length, dev_scores
from .translate import Translator

__all__ = ["tune"]

log = logging.getLogger(__name__)


def _dev_text(
    translator: Translator, src: Optional[Path], ref: Optional[Path], max_sentences: int
) -> tuple[list[str], list[str]]:
    if (src is None) != (ref is None):
        raise CheckpointError("give both --src and --ref, or neither (to use the recipe's dev set)")
    if src is not None and ref is not None:
        lines, refs = read_lines(src), read_lines(ref)
        check_same_length(lines, [refs], [str(src), str(ref)])
    else:
        dev = translator.recipe.data.dev
        if dev is None:
            raise CheckpointError("the checkpoint's recipe has no dev set: give --src and --ref")
        text = read_split(dev, translator.recipe.data.encoding_errors)
        lines, refs = text.src, text.tgt
    n = max_sentences or len(lines)
    return lines[:n], refs[:n]


def _bleu(translator: Translator, lines: list[str], refs: list[str], **opts: Any) -> float:
    hyps = translator.translate_window(lines, translator.options(n_best=1, sample=False, **opts))
    return dev_scores([translator.detok(h[0]) if h else "" for h in hyps], refs, ("bleu",))["bleu"]


def tune(
    path: Path,
    beams: Sequence[int],
    alphas: Sequence[float],
    betas: Sequence[float],
    src: Optional[Path] = None,
    ref: Optional[Path] = None,
    max_sentences: int = 500,
    output: Optional[Path] = None,
    device: str = "cpu",
    threads: int = 0,
) -> dict[str, Any]:
    """Grid-search decode settings on dev; write the best into the checkpoint (or `output`)."""
    translator = Translator([path], device, threads)
    lines, refs = _dev_text(translator, src, ref, max_sentences)
    trials: list[dict[str, Any]] = []

    def trial(beam: int, alpha: float, beta: float) -> None:
        with torch.inference_mode():
            score = _bleu(translator, lines, refs, beam=beam, alpha=alpha, beta=beta)
        trials.append({"beam": beam, "alpha": alpha, "beta": beta, "bleu": round(score, 2)})
        log.info("beam %d alpha %.2f beta %.2f: dev BLEU %.2f", beam, alpha, beta, score)

    for beam in beams:
        for alpha in alphas:
            trial(beam, alpha, 0.0)
    best = max(trials, key=lambda t: (t["bleu"], -t["beam"]))
    for beta in betas:
        if beta > 0:
            trial(best["beam"], best["alpha"], beta)
    best = max(trials, key=lambda t: (t["bleu"], -t["beam"]))
    ckpt = load_checkpoint(path)
    decode = ckpt.decode.model_copy(
        update={"beam": best["beam"], "alpha": best["alpha"], "beta": best["beta"], "n_best": 1, "sample": False}
    )
    target = output or path
    save_checkpoint(target, replace(ckpt, decode=decode))
    return {"best": best, "trials": trials, "dev_sentences": len(lines), "checkpoint": str(target)}
