"""Label-smoothed cross entropy (Szegedy et al. 2016), a pure function.

Public names: label_smoothed_nll, output_layer_loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["label_smoothed_nll", "output_layer_loss"]


def label_smoothed_nll(logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor, int]:
    """Summed label-smoothed loss and summed NLL over non-pad targets.

    Target distribution (fairseq's choice): q(y) = 1 - eps for the gold token y and
    q(v) = eps / (V - 1) for every other class v, so that the mass is exactly 1 - eps on the
    gold token whatever V is. The loss per token is the cross entropy H(q, p):

        loss = (1 - eps - eps/(V-1)) * (-log p_y) + eps/(V-1) * sum_v (-log p_v)

    Positions whose target is pad are ignored. The caller divides by the number of target
    tokens (the third return value) — possibly summed over accumulated micro-batches or ranks.

    Shapes: logits (N, V) (or (..., V)), target (N,) (or (...)).
    Returns: (loss_sum, nll_sum, n_tokens).
    """
    logits, target = logits.reshape(-1, logits.size(-1)), target.reshape(-1)
    keep = target.ne(pad_id)
    if not bool(keep.all()):
        logits, target = logits[keep], target[keep]
    log_probs = logits.float().log_softmax(-1)  # (N, V)
    nll = -log_probs.gather(-1, target[:, None]).squeeze(-1)  # (N,)
    vocab = log_probs.size(-1)
    eps_i = epsilon / (vocab - 1)
    smooth = -log_probs.sum(-1)  # (N,)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    return loss.sum(), nll.sum(), int(target.numel())


def output_layer_loss(
    hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float, chunk: int = 512
) -> tuple[Tensor, Tensor, int]:
    """`label_smoothed_nll(hidden @ weight.T, target, epsilon)` without ever holding the (K, V) logits.

    The output layer and the loss are computed together over chunks of `chunk` rows, and the
    gradients are formed on the way (dL/dz = p - q for the smoothed target distribution q, which
    sums to 1), so the largest buffer is (chunk, V) instead of (K, V): with K = 4,096 target
    tokens and V = 8,000 that is 16 MiB instead of ~500 MiB of logits, log-probs and their
    gradients per update, which the allocator would otherwise map and unmap at every step.
    Same FLOPs as the plain path (three matmuls per chunk). Under autocast the matmuls run in the
    autocast dtype, the softmax in fp32, as in `label_smoothed_nll`.

    hidden (K, D) final decoder states at non-pad target positions; weight (V, D) the output
    layer (bias-free); target (K,). Returns (loss_sum, nll_sum, K); only loss_sum has a gradient.
    """
    loss, nll = _OutputLayerLoss.apply(hidden, weight, target, epsilon, chunk)
    return loss, nll, int(target.numel())


class _OutputLayerLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        epsilon: float,  # type: ignore[override]
        chunk: int,
    ) -> tuple[Tensor, Tensor]:
        vocab = weight.size(0)
        eps_i = epsilon / (vocab - 1)
        gold = 1.0 - epsilon - eps_i  # q(y) = gold + eps_i, q(v) = eps_i elsewhere
        acc = torch.promote_types(hidden.dtype, torch.float32)
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        nll_sum = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start : start + chunk], target[start : start + chunk]
            logits = h @ weight.t()  # (c, V), in the autocast dtype under autocast
            log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
            nll = -log_probs.gather(1, t[:, None]).squeeze(1)  # (c,)
            loss_sum += (gold * nll - eps_i * log_probs.sum(-1)).sum()
            nll_sum += nll.sum()
            grad = log_probs.exp_().sub_(eps_i)  # p - q, formed in place: (c, V)
            grad[torch.arange(t.numel(), device=t.device), t] -= gold
            grad_hidden[start : start + chunk] = grad @ weight
            grad_weight += (grad.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(nll_sum)
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None
