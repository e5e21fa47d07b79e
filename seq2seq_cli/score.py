"""Translation quality metrics through sacrebleu: BLEU, chrF, TER, with reproducibility signatures.

Functions take lists of strings (reading files is data.py's job). `refs` is always a list of
reference streams: refs[k][i] is the k-th reference for hypothesis i. Lengths are checked first;
a mismatch is a `ScoreError` whose one-line message names the inputs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric
from sacrebleu.significance import PairedTest

from .recipe import UserError

__all__ = [
    "METRICS",
    "MetricResult",
    "ScoreError",
    "check_same_length",
    "corpus_scores",
    "dev_scores",
    "sentence_scores",
    "paired_bootstrap",
]

METRICS = ("bleu", "chrf", "ter")


class ScoreError(UserError):
    """A user-facing scoring problem (mismatched line counts, unknown metric); ready to print."""


@dataclass(frozen=True)
class MetricResult:
    """One corpus-level score. `signature` is sacrebleu's (e.g. 'nrefs:1|case:mixed|...|version:2.6.0');
    `text` is sacrebleu's formatted score (e.g. 'BLEU = 31.20 62.1/37.0/24.6/16.8 (BP = ...)')."""

    name: str
    score: float
    signature: str
    text: str


def _metric(name: str, sentence_level: bool = False) -> Metric:
    """A fresh sacrebleu metric with default settings (BLEU: 13a tokenizer, exp smoothing; chrF2; TER)."""
    key = name.lower()
    if key == "bleu":
        return BLEU(effective_order=sentence_level)  # effective order: sacrebleu's advice per sentence
    if key == "chrf":
        return CHRF()
    if key == "ter":
        return TER()
    raise ScoreError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")


def check_same_length(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], names: Optional[Sequence[str]] = None
) -> None:
    """Raise ScoreError unless every reference stream has as many lines as hyps.

    names[0] names the hypotheses, names[1 + k] the k-th reference stream (e.g. file names);
    the message reads like 'refs.txt has 1535 lines but hyp.txt has 1534'.
    """
    default = ["hypotheses"] + [f"reference {k + 1}" for k in range(len(refs))]
    names = list(names or []) + default[len(names or []) :]
    if not refs:
        raise ScoreError("no reference given")
    if not hyps:
        raise ScoreError(f"{names[0]} is empty: nothing to score")
    for k, stream in enumerate(refs):
        if len(stream) != len(hyps):
            raise ScoreError(f"{names[k + 1]} has {len(stream)} lines but {names[0]} has {len(hyps)}")


def corpus_scores(hyps: list[str], refs: list[list[str]], metrics: Sequence[str] = METRICS) -> list[MetricResult]:
    """Corpus-level scores, in the order of `metrics` (each one of 'bleu', 'chrf', 'ter')."""
    check_same_length(hyps, refs)
    results = []
    for name in metrics:
        metric = _metric(name)
        score = metric.corpus_score(list(hyps), [list(r) for r in refs])
        results.append(MetricResult(score.name, float(score.score), str(metric.get_signature()), str(score)))
    return results


def dev_scores(
    system: Sequence[str], refs: Sequence[str], metrics: Sequence[str] = ("bleu", "chrf")
) -> dict[str, float]:
    """{metric: corpus score} of one system output against one reference stream (validation, tuning)."""
    return {name: r.score for name, r in zip(metrics, corpus_scores(list(system), [list(refs)], metrics))}


def sentence_scores(hyps: list[str], refs: list[list[str]], metric: str = "bleu") -> list[float]:
    """One score per hypothesis against its references (BLEU uses effective order)."""
    check_same_length(hyps, refs)
    scorer = _metric(metric, sentence_level=True)
    return [float(scorer.sentence_score(h, [r[i] for r in refs]).score) for i, h in enumerate(hyps)]


@contextlib.contextmanager
def _sacrebleu_seed(seed: int) -> Iterator[None]:
    """sacrebleu's paired test reads its RNG seed from $SACREBLEU_SEED; set it for the duration."""
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = old


def paired_bootstrap(
    baseline_hyps: list[str],
    system_hyps: list[str],
    refs: list[list[str]],
    metric: str = "bleu",
    n_samples: int = 1000,
    seed: int = 12345,
) -> dict:
    """Paired bootstrap resampling (Koehn 2004) via sacrebleu's PairedTest(test_type='bs').

    Resample the test set n_samples times (same indices for both systems); with
    d = |score(sys) - score(base)| and d_s the same on sample s,
    p = (1 + #{s : d_s - mean(d) > d}) / (n_samples + 1), and p = 1 when d = 0. The 95% interval
    is sacrebleu's: mean ± half-width of the 2.5%..97.5% bootstrap percentiles. Keys: metric, baseline,
    baseline_ci95, system, system_mean, system_ci95, p_value, significant (p < 0.05),
    n_samples, seed, signature.
    """
    check_same_length(baseline_hyps, refs, ["baseline"])
    check_same_length(system_hyps, refs, ["system"])
    if seed < 1 or n_samples < 1:
        raise ScoreError(f"paired bootstrap needs seed >= 1 and n_samples >= 1 (got {seed}, {n_samples})")
    scorer = _metric(metric)
    with _sacrebleu_seed(seed):
        test = PairedTest(
            [("baseline", list(baseline_hyps)), ("system", list(system_hyps))],
            {metric: scorer},
            [list(r) for r in refs],
            test_type="bs",
            n_samples=n_samples,
        )
        signatures, table = test()
    ((name, (base, system)),) = ((k, v) for k, v in table.items() if k != "System")

    # sacrebleu counts resamples with centred |diff| strictly above the observed one, so two systems
    # with equal scores get p = 1 / (n + 1) ("significant"); no observed difference means p = 1.
    p_value = 1.0 if system.score == base.score else float(system.p_value)

    def interval(r) -> tuple[float, float]:
        return (float(r.mean - r.ci), float(r.mean + r.ci))

    return {
        "metric": name,
        "baseline": float(base.score),
        "baseline_ci95": interval(base),
        "system": float(system.score),
        "system_mean": float(system.mean),
        "system_ci95": interval(system),
        "p_value": p_value,
        "significant": p_value < 0.05,
        "n_samples": n_samples,
        "seed": seed,
        "signature": str(signatures[name]),
    }
