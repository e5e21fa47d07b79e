"""Learning-rate schedules as pure functions, wired to torch through LambdaLR.

`noam` and `inverse_sqrt` are functions of the update number. `budget` is a function of the
fraction of the training budget already spent (Li, Yumer & Ramanan, "Budgeted training", ICLR 2020:
linear decay to zero over the budget), so warm-up and decay fit inside whatever number of updates
the machine manages in `train.max_time`: on a machine 2.5x slower the same recipe still warms up
and decays completely. The fraction is max(updates / max_steps, seconds / max_time) over the
budgets that are set; the seconds are the run's agreed wall-clock time, stored in every checkpoint,
so a resumed run continues the same curve (and a step-budgeted run stays exactly reproducible).

Public names: noam_lr, inverse_sqrt_lr, budget_lr, lr_at, make_scheduler.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .recipe import TrainConfig

__all__ = ["noam_lr", "inverse_sqrt_lr", "budget_lr", "lr_at", "make_scheduler"]


def noam_lr(step: int, d_model: int, warmup: int, factor: float) -> float:
    """Vaswani et al. (2017), eq. 3:

        lr = factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)

    Linear warm-up to the peak factor * (d_model * warmup)^-0.5 at step = warmup, then decay
    as step^-0.5. Steps count from 1 (the first update); step 0 is treated as step 1.
    """
    step = max(step, 1)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def inverse_sqrt_lr(step: int, warmup: int, peak_lr: float) -> float:
    """fairseq's inverse_sqrt: lr = peak * step / warmup while step < warmup, then
    lr = peak * sqrt(warmup / step). Steps count from 1; step 0 is treated as step 1."""
    step = max(step, 1)
    return peak_lr * step / warmup if step < warmup else peak_lr * (warmup / step) ** 0.5


def budget_lr(progress: float, warmup_fraction: float, peak_lr: float) -> float:
    """Linear warm-up to the peak over the first `warmup_fraction` w of the budget, then linear
    decay to zero at its end (p = fraction of the budget spent, clipped to [0, 1]):

        lr = peak * p / w                 for p < w
        lr = peak * (1 - p) / (1 - w)     for p >= w
    """
    p = min(max(progress, 0.0), 1.0)
    return peak_lr * p / warmup_fraction if p < warmup_fraction else peak_lr * (1 - p) / (1 - warmup_fraction)


def budget_progress(step: int, seconds: float, cfg: TrainConfig) -> float:
    """The fraction of the budget spent when update `step` (1-based) starts, `seconds` into the run."""
    parts = []
    if cfg.max_steps:
        parts.append(step / cfg.max_steps)
    if cfg.max_time:
        parts.append(seconds / (cfg.max_time * 60))
    return max(parts, default=0.0)


def lr_at(step: int, cfg: TrainConfig, d_model: int, seconds: float = 0.0) -> float:
    """The learning rate of update number `step` (1-based), `seconds` into the run."""
    if cfg.schedule == "noam":
        return noam_lr(step, d_model, cfg.warmup_steps, cfg.lr_factor)
    if cfg.schedule == "budget":
        return budget_lr(budget_progress(step, seconds, cfg), cfg.warmup_fraction, cfg.peak_lr)
    return inverse_sqrt_lr(step, cfg.warmup_steps, cfg.peak_lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, d_model: int, seconds: Optional[Callable[[], float]] = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over base lr 1.0: after k scheduler steps the lr is lr_at(k + 1, seconds()).

    `seconds()` is the run's training time so far (the budget schedule reads it)."""
    for group in optimizer.param_groups:
        group["lr"] = 1.0
        group["initial_lr"] = 1.0
    clock = seconds or (lambda: 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_at(k + 1, cfg, d_model, clock()))
