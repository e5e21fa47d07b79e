"""`translate train --nproc N`: start N local training processes with torch's elastic launcher.

Equivalent to `torchrun --nproc-per-node N -m seq2seq_cli train RECIPE`; each child runs the
same recipe with RANK / WORLD_SIZE / LOCAL_RANK set by the launcher (see distributed.py).
Public names: launch_local.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["launch_local"]

log = logging.getLogger(__name__)


def _child(recipe_path: str, overrides: list[str]) -> dict:
    """One rank: load the recipe and train (the launcher sets the distributed environment).
    A user mistake ends the rank like the CLI would: one line on stderr, exit code 2."""
    import sys

    from .pipeline import run_train
    from .recipe import UserError, load_recipe

    try:
        return run_train(load_recipe(recipe_path, overrides), progress=False)
    except UserError as exc:
        import os

        if os.environ.get("RANK", "0") == "0":  # every rank sees the same recipe and data: say it once
            sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)


def launch_local(recipe_path: Path, overrides: Sequence[str], nproc: int) -> tuple[int, Optional[dict]]:
    """Run nproc ranks on this machine; returns (exit code, rank 0's result).

    The exit code is 0 when every rank succeeded, else the failing rank's own code (2 for a
    user mistake, which that rank has already reported in one line)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .checkpoint import RunDir
    from .pipeline import run_tokenizer
    from .recipe import load_recipe
    from .tokenizer import Tokenizer

    recipe = load_recipe(recipe_path, overrides)
    try:  # the tokenizer is trained once, before the ranks start
        Tokenizer.load(RunDir(recipe.output_dir).tokenizer)
    except ValueError:
        run_tokenizer(recipe)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"translate-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=1,
    )
    # torch elastic logs a child's non-zero exit with a traceback of its own machinery; the
    # failing rank has already said what went wrong, so keep only our one-line summary.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, _child)(str(recipe_path), list(overrides))
    except ChildFailedError as exc:
        first = next(iter(exc.failures.values()))
        code = first.exitcode if isinstance(first.exitcode, int) and first.exitcode > 0 else 1
        if code != 2:
            log.error("training rank %d failed (exit code %s); see its message above", first.local_rank, first.exitcode)
        return code, None
    return 0, results.get(0)
