"""label_smoothed_nll: hand-computed values, pad handling, eps=0 vs cross entropy, the gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seq2seq_cli.loss import label_smoothed_nll

PAD = 0


def smoothed_q(target: torch.Tensor, vocab: int, eps: float) -> torch.Tensor:
    """Reference target distribution: q(y) = 1 - eps, q(v) = eps / (V - 1) for v != y."""
    q = torch.full((target.numel(), vocab), eps / (vocab - 1), dtype=torch.float64)
    q[torch.arange(target.numel()), target] = 1.0 - eps
    return q


def reference_loss(logits: torch.Tensor, target: torch.Tensor, eps: float) -> float:
    """H(q, p) summed over rows, computed directly in float64."""
    logp = logits.double().log_softmax(-1)
    return float(-(smoothed_q(target, logits.size(-1), eps) * logp).sum())


def test_hand_computed_2x3() -> None:
    # Row 1: uniform p = (1/3, 1/3, 1/3), gold 0.  Row 2: p = (1/2, 1/4, 1/4), gold 1.
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25)]])
    target = torch.tensor([0, 1])
    # eps = 0.2, V = 3: q(row 1) = (0.8, 0.1, 0.1), q(row 2) = (0.1, 0.8, 0.1)
    # H1 = -(0.8 + 0.1 + 0.1) log(1/3) = log 3
    # H2 = -(0.1 log 1/2 + 0.8 log 1/4 + 0.1 log 1/4) = 0.1 log 2 + 1.8 log 2 = 1.9 log 2
    loss, nll, n = label_smoothed_nll(logits, target, 0.2, pad_id=99)
    assert n == 2
    assert loss.item() == pytest.approx(math.log(3) + 1.9 * math.log(2), abs=1e-6)
    assert nll.item() == pytest.approx(math.log(3) + math.log(4), abs=1e-6)  # -log(1/3) - log(1/4)


def test_hand_computed_2x4_against_explicit_q() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -2.0, 3.0, 1.0]])
    target = torch.tensor([1, 3])
    eps = 0.3
    q = smoothed_q(target, 4, eps)
    assert q[0].tolist() == pytest.approx([0.1, 0.7, 0.1, 0.1])
    assert q[1].tolist() == pytest.approx([0.1, 0.1, 0.1, 0.7])
    assert q.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    loss, nll, n = label_smoothed_nll(logits, target, eps, pad_id=-1)
    assert loss.item() == pytest.approx(reference_loss(logits, target, eps), abs=1e-5)
    logp = logits.double().log_softmax(-1)
    assert nll.item() == pytest.approx(float(-(logp[0, 1] + logp[1, 3])), abs=1e-5)
    assert n == 2


def test_pad_targets_ignored_and_not_counted() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    target = torch.tensor([3, 1, 4, 6, 2])
    base = label_smoothed_nll(logits, target, 0.1, PAD)
    # add three rows whose target is pad, with arbitrary (large) logits
    logits2 = torch.cat([logits, 50 * torch.randn(3, 7, generator=g)])
    target2 = torch.cat([target, torch.full((3,), PAD)])
    with_pad = label_smoothed_nll(logits2, target2, 0.1, PAD)
    assert with_pad[2] == base[2] == 5
    assert with_pad[0].item() == pytest.approx(base[0].item(), abs=1e-5)
    assert with_pad[1].item() == pytest.approx(base[1].item(), abs=1e-5)
    # pads in the middle of a (B, T, V) batch
    logits3 = logits2[torch.tensor([0, 5, 1, 2, 6, 3, 4, 7])].reshape(2, 4, 7)
    target3 = target2[torch.tensor([0, 5, 1, 2, 6, 3, 4, 7])].reshape(2, 4)
    loss3, nll3, n3 = label_smoothed_nll(logits3, target3, 0.1, PAD)
    assert n3 == 5
    assert loss3.item() == pytest.approx(base[0].item(), abs=1e-5)
    assert nll3.item() == pytest.approx(base[1].item(), abs=1e-5)


def test_all_pad_gives_zero() -> None:
    loss, nll, n = label_smoothed_nll(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), 0.1, PAD)
    assert n == 0 and loss.item() == 0.0 and nll.item() == 0.0


def test_eps_zero_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(6, 4, 11, generator=g)
    target = torch.randint(1, 11, (6, 4), generator=g)
    target[0, 2] = target[3, 0] = PAD
    loss, nll, n = label_smoothed_nll(logits, target, 0.0, PAD)
    ce = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), ignore_index=PAD, reduction="sum")
    assert n == 22
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)
    assert nll.item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_loss_matches_reference_random(eps: float) -> None:
    g = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(9, 13, generator=g)
    target = torch.randint(0, 13, (9,), generator=g)
    loss, nll, _ = label_smoothed_nll(logits, target, eps, pad_id=-1)
    assert loss.item() == pytest.approx(reference_loss(logits, target, eps), rel=1e-5)
    ce = F.cross_entropy(logits.double(), target, reduction="sum")
    assert nll.item() == pytest.approx(float(ce), rel=1e-5)


def test_gradient_is_softmax_minus_q() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64).float().requires_grad_()
    target = torch.tensor([2, 5, PAD, 1])
    eps = 0.2
    loss, _, _ = label_smoothed_nll(logits, target, eps, PAD)
    loss.backward()
    expected = logits.detach().double().softmax(-1) - smoothed_q(target.clamp(min=0), 6, eps)
    expected[2] = 0.0  # pad row: no gradient at all
    assert torch.allclose(logits.grad.double(), expected, atol=1e-6)


@pytest.mark.parametrize("epsilon,chunk", [(0.1, 8), (0.0, 5), (0.2, 1000)])
def test_output_layer_loss_equals_the_plain_path_with_its_gradients(epsilon: float, chunk: int) -> None:
    """The chunked output-layer loss gives the loss, NLL and gradients (hidden states and output
    weights) of label_smoothed_nll on the full logits, whatever the chunk size."""
    from seq2seq_cli.loss import output_layer_loss

    torch.manual_seed(0)
    k, d, v = 37, 16, 50
    hidden = torch.randn(k, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    target = torch.randint(4, v, (k,))
    ref_loss, ref_nll, n = label_smoothed_nll(hidden @ weight.t(), target, epsilon, PAD)
    ref_loss.mul(3.0).backward()  # a scaled loss, as the grad scaler / token normaliser do
    ref_gh, ref_gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss, nll, m = output_layer_loss(hidden, weight, target, epsilon, chunk)
    loss.mul(3.0).backward()
    assert m == n == k
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert nll.item() == pytest.approx(ref_nll.item(), rel=1e-6) and not nll.requires_grad
    # label_smoothed_nll computes its softmax in fp32 even for float64 logits: compare at fp32 accuracy
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, ref_gw, rtol=1e-4, atol=1e-5)
    assert ref_gh.abs().max() > 0.1  # the gradients compared are not vacuous
