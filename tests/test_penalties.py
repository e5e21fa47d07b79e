"""Penalty values against numbers computed by hand from the formulas in the docstrings."""

import math

import pytest
import torch

from seq2seq_cli.penalties import (
    COVERAGE_FLOOR,
    coverage_penalty,
    gnmt_length_penalty,
    length_penalty,
    power_length_penalty,
    rescore,
)


def test_gnmt_length_penalty_matches_formula():
    lp = gnmt_length_penalty(torch.tensor([1, 2, 20]), 0.2)
    expected = [(6 / 6) ** 0.2, (7 / 6) ** 0.2, (25 / 6) ** 0.2]
    assert lp.tolist() == pytest.approx(expected, rel=1e-6)
    assert gnmt_length_penalty(torch.tensor([20]), 0.6).item() == pytest.approx(2.3544, abs=1e-4)


def test_alpha_zero_is_no_normalisation():
    lengths = torch.tensor([1, 7, 50])
    assert gnmt_length_penalty(lengths, 0.0).tolist() == [1.0, 1.0, 1.0]
    assert power_length_penalty(lengths, 0.0).tolist() == [1.0, 1.0, 1.0]


def test_power_length_penalty_matches_formula():
    lp = power_length_penalty(torch.tensor([1, 4, 20]), 0.5)
    assert lp.tolist() == pytest.approx([1.0, 2.0, math.sqrt(20)], rel=1e-6)
    assert power_length_penalty(torch.tensor([20]), 0.6).item() == pytest.approx(20**0.6, rel=1e-6)


@pytest.mark.parametrize("kind", ["gnmt", "power"])
def test_length_penalty_of_a_length_has_the_same_bits_in_any_tensor(kind):
    """A length's penalty does not depend on how many other lengths are computed with it: torch's
    elementwise pow gives the SIMD body and the scalar tail of a tensor different last bits, which
    made a sentence's final score depend on how many hypotheses finished at the same step."""
    for length in (13, 25, 61):
        alone = length_penalty(torch.tensor([length]), 0.6, kind)[0]
        for n in range(2, 70):
            together = length_penalty(torch.tensor([3] * (n - 1) + [length]), 0.6, kind)
            assert torch.equal(together[-1], alone), (length, n)
            assert together[-1].item() == pytest.approx(
                ((5 + length) / 6) ** 0.6 if kind == "gnmt" else length**0.6, rel=1e-7
            )


def test_length_penalty_dispatch_and_unknown_kind():
    n = torch.tensor([3])
    assert length_penalty(n, 1.0, "gnmt").item() == pytest.approx(8 / 6)
    assert length_penalty(n, 1.0, "power").item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown length penalty"):
        length_penalty(n, 1.0, "wu")  # type: ignore[arg-type]


def test_coverage_penalty_hand_computed_with_padding():
    # row 0: 3 real tokens, 1 pad (coverage 0 there: log 0 would be -inf if it counted)
    # row 1: 2 real tokens (one over-attended, capped at 1), 2 pads
    coverage = torch.tensor([[0.5, 1.0, 0.25, 0.0], [2.0, 0.1, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    cp = coverage_penalty(coverage, mask, beta=0.2)
    expected = [0.2 * (math.log(0.5) + 0.0 + math.log(0.25)), 0.2 * (0.0 + math.log(0.1))]
    assert cp.tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(cp).all()


def test_coverage_penalty_zero_attention_on_real_token_is_finite():
    cp = coverage_penalty(torch.tensor([[0.0, 1.0]]), torch.tensor([[True, True]]), beta=1.0)
    assert cp.item() == pytest.approx(math.log(COVERAGE_FLOOR), rel=1e-5)


def test_full_coverage_costs_nothing_and_beta_zero_is_off():
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert coverage_penalty(torch.tensor([[1.0, 1.5, 3.0]]), mask, 0.7).item() == 0.0
    assert coverage_penalty(torch.tensor([[0.1, 0.2, 0.3]]), mask, 0.0).item() == 0.0


def test_rescore_combines_length_and_coverage():
    sum_lp = torch.tensor([-3.0, -6.0])
    length = torch.tensor([2, 5])
    coverage = torch.tensor([[0.5, 1.0], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    s = rescore(sum_lp, length, coverage, mask, alpha=0.6, beta=0.2, kind="gnmt")
    expected = [-3.0 / (7 / 6) ** 0.6 + 0.2 * math.log(0.5), -6.0 / (10 / 6) ** 0.6 + 0.0]
    assert s.tolist() == pytest.approx(expected, rel=1e-6)
    p = rescore(sum_lp, length, None, None, alpha=1.0, beta=0.0, kind="power")
    assert p.tolist() == pytest.approx([-1.5, -1.2], rel=1e-6)


def test_rescore_needs_coverage_when_beta_positive():
    with pytest.raises(ValueError, match="coverage"):
        rescore(torch.tensor([-1.0]), torch.tensor([2]), None, None, 0.6, 0.2)
