"""Label-smoothed cross entropy (Szegedy et al. 2016), a pure function.

Public names: label_smoothed_nll.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["label_smoothed_nll"]


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
