"""Learning-rate schedules as pure functions, wired to torch through LambdaLR.

Public names: noam_lr, inverse_sqrt_lr, lr_at, make_scheduler.
"""

from __future__ import annotations

import torch

from .recipe import TrainConfig

__all__ = ["noam_lr", "inverse_sqrt_lr", "lr_at", "make_scheduler"]


def noam_lr(step: int, d_model: int, warmup: int, factor: float) -> float:
    """Vaswani et al. (2017), eq. 3:

        lr = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

    Linear warm-up to the peak factor * (d_model * warmup)^-0.5 at step = warmup, then decay
    as step^-0.5. Steps count from 1 (the first update); step 0 is treated as step 1.
    """
    step = max(step, 1)
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def inverse_sqrt_lr(step: int, warmup: int, peak_lr: float) -> float:
    """fairseq's inverse_sqrt: lr = peak * step / warmup while step < warmup, then
    lr = peak * sqrt(warmup / step). Steps count from 1; step 0 is treated as step 1."""
    step = max(step, 1)
    return peak_lr * step / warmup if step < warmup else peak_lr * (warmup / step) ** 0.5


def lr_at(step: int, cfg: TrainConfig, d_model: int) -> float:
    """The learning rate of update number `step` (1-based) under the recipe's schedule."""
    if cfg.schedule == "noam":
        return noam_lr(step, d_model, cfg.warmup_steps, cfg.lr_factor)
    return inverse_sqrt_lr(step, cfg.warmup_steps, cfg.peak_lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, d_model: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over base lr 1.0: after k scheduler steps the lr is lr_at(k + 1)."""
    for group in optimizer.param_groups:
        group["lr"] = 1.0
        group["initial_lr"] = 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_at(k + 1, cfg, d_model))
