"""Shared test setup: one intra-op thread (the test machines are small and shared)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------- end-to-end fixtures (e2e_*)
# Used by test_checkpoint.py, test_train.py, test_cli.py and test_translate.py: one small recipe
# derived from recipes/tiny.yaml, trained once per session with `translate run` (all four stages).

import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

E2E_REPO = Path(__file__).resolve().parents[1]
E2E_RECIPE = E2E_REPO / "recipes" / "tiny.yaml"
E2E_SMALL = {"train.max_steps": 30, "train.valid_every": 15, "train.log_every": 10, "train.valid_max_sentences": 20,
             "data.train.max_lines": 600, "data.dev.max_lines": 20, "data.test.max_lines": 20,
             "tokenizer.vocab_size": 300, "model.d_model": 32, "model.ff_dim": 64, "train.threads": 1}


@dataclass
class E2E:
    """The session's small trained run and helpers to derive more runs from the same recipe."""

    recipe: Path
    run_dir: Path
    run_exit_code: int
    run_stdout: str
    run_stderr: str

    @staticmethod
    def overrides(output_dir: Path, **extra: Any) -> list[str]:
        """KEY=VALUE overrides for the small recipe (extra keys use __ for dots: train__max_steps=5)."""
        values = {"output_dir": str(output_dir), **E2E_SMALL, **{k.replace("__", "."): v for k, v in extra.items()}}
        return [f"{k}={'null' if v is None else v}" for k, v in values.items()]

    @classmethod
    def set_args(cls, output_dir: Path, **extra: Any) -> list[str]:
        return [a for o in cls.overrides(output_dir, **extra) for a in ("--set", o)]

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "checkpoints" / "best.pt"

    def copy_tokenizer(self, output_dir: Path) -> None:
        """Give a new output_dir the session's tokenizer (same recipe settings), so it is not retrained."""
        shutil.copytree(self.run_dir / "tokenizer", Path(output_dir) / "tokenizer", dirs_exist_ok=True)

    @staticmethod
    def env() -> dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "COLUMNS": "200"}

    @staticmethod
    def cli() -> list[str]:
        """The command line of `translate` in a subprocess (same interpreter as the tests)."""
        return [sys.executable, "-m", "seq2seq_cli"]


@pytest.fixture(scope="session")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> E2E:
    """`translate run` on the small recipe, once per session (tokenizer → train → decode → score)."""
    from typer.testing import CliRunner

    from seq2seq_cli.cli import app

    run_dir = tmp_path_factory.mktemp("e2e_run")
    result = CliRunner().invoke(app, ["run", str(E2E_RECIPE), *E2E.set_args(run_dir), "--no-progress"])
    torch.set_num_threads(1)
    if result.exit_code != 0:
        raise RuntimeError(f"session run failed ({result.exit_code}): {result.output}\n{result.exception!r}")
    return E2E(E2E_RECIPE, run_dir, result.exit_code, result.stdout, result.stderr)
