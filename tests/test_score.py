"""Tests for seq2seq_cli.score: agreement with sacrebleu, hand-checked cases, errors, paired bootstrap."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from sacrebleu.metrics import BLEU, CHRF, TER

from seq2seq_cli.score import (
    MetricResult,
    ScoreError,
    check_same_length,
    corpus_scores,
    paired_bootstrap,
    sentence_scores,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "bible-en-es"


def _read(name: str, n: int = 200) -> list[str]:
    with open(DATA / name, encoding="utf-8") as fh:
        return [line.rstrip("\n") for _, line in zip(range(n), fh)]


@pytest.fixture(scope="module")
def web_kjv() -> tuple[list[str], list[str]]:
    """Two real English versions of the same 200 test verses: WEB (reference) and KJV (hypothesis)."""
    return _read("test.en"), _read("test.kjv.en")


def test_identical_hypotheses_score_perfectly() -> None:
    hyps = ["the cat sat on the mat .", "a dog barked loudly"]
    bleu, chrf, ter = corpus_scores(hyps, [hyps])
    assert (bleu.name, chrf.name, ter.name) == ("BLEU", "chrF2", "TER")
    assert bleu.score == pytest.approx(100.0) and chrf.score == pytest.approx(100.0) and ter.score == 0.0
    assert bleu.text.startswith("BLEU = 100.00") and "nrefs:1" in bleu.signature and "version:" in bleu.signature


def test_hand_checked_ter() -> None:
    # one substitution (sat -> sits) in a 6-word reference: TER = 1/6
    (ter,) = corpus_scores(["the cat sits on the mat"], [["the cat sat on the mat"]], metrics=["ter"])
    assert ter.score == pytest.approx(100 / 6)


def test_matches_sacrebleu_object_api(web_kjv) -> None:
    ref, hyp = web_kjv
    results = {r.name: r for r in corpus_scores(hyp, [ref])}
    for metric in (BLEU(), CHRF(), TER()):
        expected = metric.corpus_score(hyp, [ref])
        got = results[expected.name]
        assert got.score == pytest.approx(expected.score) and got.text == str(expected)
        assert got.signature == str(metric.get_signature())
    assert 10 < results["BLEU"].score < 90  # two real translations: neither 0 nor identical


def test_multiple_references_help(web_kjv) -> None:
    ref, hyp = web_kjv
    (one,) = corpus_scores(hyp, [ref], metrics=["bleu"])
    (two,) = corpus_scores(hyp, [ref, hyp], metrics=["bleu"])
    assert two.score == pytest.approx(100.0) and one.score < 90.0
    assert "nrefs:2" in two.signature
    assert two.score == pytest.approx(BLEU().corpus_score(hyp, [ref, hyp]).score)


def test_metric_result_is_frozen() -> None:
    (r,) = corpus_scores(["a b c d"], [["a b c d"]], metrics=["chrf"])
    assert isinstance(r, MetricResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.score = 0.0  # type: ignore[misc]


def test_sentence_scores(web_kjv) -> None:
    ref, hyp = web_kjv
    scores = sentence_scores(hyp[:20], [ref[:20]], "bleu")
    assert len(scores) == 20 and all(0.0 <= s <= 100.0 for s in scores)
    expected = BLEU(effective_order=True).sentence_score(hyp[3], [ref[3]]).score
    assert scores[3] == pytest.approx(expected)
    assert sentence_scores(["same words here"], [["same words here"]], "chrf") == [pytest.approx(100.0)]
    assert sentence_scores(["x y", "a b"], [["x y", "q"], ["z", "a b"]], "ter") == [0.0, 0.0]  # best of 2 refs


def test_length_mismatch_message() -> None:
    hyps, refs = ["a"] * 1534, ["a"] * 1535
    with pytest.raises(ScoreError) as err:
        check_same_length(hyps, [refs], ["hyp.txt", "refs.txt"])
    assert str(err.value) == "refs.txt has 1535 lines but hyp.txt has 1534"
    with pytest.raises(ScoreError, match="reference 2 has 1 lines but hypotheses has 2"):
        corpus_scores(["a", "b"], [["a", "b"], ["a"]])
    with pytest.raises(ScoreError, match="unknown metric 'meteor'"):
        corpus_scores(["a"], [["a"]], metrics=["meteor"])
    with pytest.raises(ScoreError, match="empty"):
        corpus_scores([], [[]])


def test_paired_bootstrap(web_kjv) -> None:
    ref, hyp = web_kjv
    env_before = os.environ.get("SACREBLEU_SEED")
    worse = [" ".join(h.split()[: len(h.split()) // 2]) for h in hyp]  # truncated: much lower BLEU
    res = paired_bootstrap(worse, hyp, [ref], n_samples=200)
    assert 0.0 <= res["p_value"] <= 1.0 and res["significant"] and res["system"] > res["baseline"]
    lo, hi = res["system_ci95"]
    assert lo <= res["system_mean"] <= hi and "bs:200" in res["signature"] and "seed:12345" in res["signature"]
    assert paired_bootstrap(worse, hyp, [ref], n_samples=200) == res  # seeded: reproducible
    same = paired_bootstrap(hyp, list(hyp), [ref], metric="chrf", n_samples=100)
    assert same["p_value"] == 1.0 and not same["significant"] and same["metric"] == "chrF2"
    assert os.environ.get("SACREBLEU_SEED") == env_before
    with pytest.raises(ScoreError, match="reference 1 has 200 lines but system has 199"):
        paired_bootstrap(hyp, hyp[:-1], [ref])
