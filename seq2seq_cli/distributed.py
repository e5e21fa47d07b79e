"""torch.distributed plumbing for training under torchrun (or `translate train --nproc N`).

Reads RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from the environment that torchrun
sets; NCCL on GPUs, gloo on CPU; collectives carry a timeout so a dead rank brings the group
down with an error instead of a hang. With WORLD_SIZE unset or 1 every function is a cheap no-op.

Public names: DistContext, init_from_env, wrap, maybe_no_sync, all_reduce_sum, all_reduce_list,
max_across, broadcast_flag, barrier, shutdown, pick_device.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

__all__ = [
    "DistContext",
    "init_from_env",
    "wrap",
    "maybe_no_sync",
    "all_reduce_sum",
    "all_reduce_list",
    "max_across",
    "broadcast_flag",
    "barrier",
    "shutdown",
    "pick_device",
]

TIMEOUT_MINUTES = float(os.environ.get("TRANSLATE_DIST_TIMEOUT_MIN", "30"))


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env() -> DistContext:
    """Join the process group described by torchrun's environment variables (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(
        int(os.environ["RANK"]),
        world,
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=TIMEOUT_MINUTES))
    return ctx


def wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DistributedDataParallel around model when world > 1 (rank 0's weights are broadcast)."""
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def maybe_no_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on inner accumulation micro-batches."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def all_reduce_list(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def all_reduce_sum(value: int, ctx: DistContext, device: torch.device) -> int:
    return int(round(all_reduce_list([float(value)], ctx, device)[0]))


def max_across(value: float, ctx: DistContext, device: torch.device) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def broadcast_flag(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Rank 0's decision, seen by every rank."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    tdist.broadcast(t, src=0)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        tdist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and tdist.is_initialized():
        tdist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda:LOCAL_RANK when CUDA is present, else cpu."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)
