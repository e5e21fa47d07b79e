"""Rich progress display for training, on stderr. Public names: TrainProgress."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .recipe import TrainConfig

__all__ = ["TrainProgress"]


class TrainProgress:
    """A live bar: step (of max_steps when set), epoch, loss, lr, tokens/s, elapsed and ETA."""

    def __init__(self, cfg: TrainConfig, enabled: bool = True, lines: bool = True) -> None:
        """enabled: draw the live bar; lines: print one line per log record where no bar is drawn."""
        self.cfg, self.enabled, self.lines = cfg, enabled, lines
        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
            transient=False,
        )
        self.info = {"loss": "-", "lr": "-", "tok/s": "-"}

    def __enter__(self) -> "TrainProgress":
        self.bar.__enter__()
        total = self.cfg.max_steps or None
        self.task = self.bar.add_task("train", total=total, info="starting")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def train_record(self, rec: dict) -> None:
        self.info = {"loss": f"{rec['loss']:.3f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
        if self.lines and (not self.enabled or not self.console.is_terminal):  # no live bar: one line per record
            self.console.print(
                f"step {rec['step']} epoch {rec['epoch']} loss {rec['loss']:.4f} ppl {rec['ppl']:.2f} "
                f"lr {rec['lr']:.3e} tok/s {rec['tokens_per_s']:.0f}"
            )

    def update(self, pos: Any) -> None:
        text = (
            f"step {pos.step} | epoch {pos.epoch + 1} | loss {self.info['loss']} | lr {self.info['lr']} | "
            f"tok/s {self.info['tok/s']} | {pos.seconds / 60:.1f} min"
        )
        if self.cfg.max_steps:
            self.bar.update(self.task, completed=pos.step, info=text)
        elif self.cfg.max_time:
            self.bar.update(self.task, total=self.cfg.max_time * 60, completed=pos.seconds, info=text)
        else:
            self.bar.update(self.task, info=text)
