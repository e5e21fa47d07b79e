"""Shared test setup: one intra-op thread (the test machines are small and shared)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------- end-to-end fixtures (e2e_*)
# Used by test_checkpoint.py, test_train.py, test_cli.py and test_translate.py: one small recipe
# derived from recipes/tiny.yaml, trained once per session with `translate run` (all five stages).

import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

E2E_REPO = Path(__file__).resolve().parents[1]
E2E_RECIPE = E2E_REPO / "recipes" / "tiny.yaml"
E2E_SMALL = {
    "train.max_steps": 120,
    "train.valid_every": 60,
    "train.log_every": 20,
    "train.valid_max_sentences": 20,
    "train.lr_factor": 0.5,
    "train.warmup_steps": 30,
    "train.batch_tokens": 1024,
    "data.train.max_lines": 1000,
    "data.dev.max_lines": 20,
    "data.test.max_lines": 20,
    "tokenizer.vocab_size": 100,
    "model.d_model": 32,
    "model.ff_dim": 64,
    "train.threads": 1,
}
# A word-for-word "translation" task that the small model learns within ~100 updates, so that
# translations depend on the input (the Bible slice would need far more steps than a test can pay).
E2E_EN = (
    "one two three four five six seven eight nine ten red blue green black white big small old new "
    "good bad king queen house water fire earth light dark day"
).split()
E2E_ES = (
    "uno dos tres cuatro cinco seis siete ocho nueve diez rojo azul verde negro blanco grande chico "
    "viejo nuevo bueno malo rey reina casa agua fuego tierra luz oscuro dia"
).split()


def e2e_write_corpus(directory: Path) -> dict[str, str]:
    """Write train/dev/test .en/.es files of the word-mapping task; return the data.* overrides."""
    import random

    rng, mapping = random.Random(0), dict(zip(E2E_EN, E2E_ES))
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 1000), ("dev", 20), ("test", 20)):
        src = [" ".join(rng.choice(E2E_EN) for _ in range(rng.randint(2, 7))) for _ in range(n)]
        (directory / f"{name}.en").write_text("".join(x + "\n" for x in src), encoding="utf-8")
        tgt = [" ".join(mapping[w] for w in x.split()) for x in src]
        (directory / f"{name}.es").write_text("".join(x + "\n" for x in tgt), encoding="utf-8")
    return {
        f"data.{name}.{side}": str(directory / f"{name}.{ext}")
        for name in ("train", "dev", "test")
        for side, ext in (("src", "en"), ("tgt", "es"))
    }


@dataclass
class E2E:
    """The session's small trained run and helpers to derive more runs from the same recipe."""

    recipe: Path
    run_dir: Path
    data: dict[str, str]
    run_exit_code: int
    run_stdout: str
    run_stderr: str

    def overrides(self, output_dir: Path, **extra: Any) -> list[str]:
        """KEY=VALUE overrides for the small recipe (extra keys use __ for dots: train__max_steps=5)."""
        values = {
            "output_dir": str(output_dir),
            **E2E_SMALL,
            **self.data,
            **{k.replace("__", "."): v for k, v in extra.items()},
        }
        return [f"{k}={'null' if v is None else v}" for k, v in values.items()]

    def set_args(self, output_dir: Path, **extra: Any) -> list[str]:
        return [a for o in self.overrides(output_dir, **extra) for a in ("--set", o)]

    def load(self, output_dir: Path, **extra: Any):
        """The validated Recipe for output_dir (seq2seq_cli.recipe.load_recipe)."""
        from seq2seq_cli.recipe import load_recipe

        return load_recipe(self.recipe, self.overrides(output_dir, **extra))

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
        return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}

    @staticmethod
    def cli() -> list[str]:
        """The command line of `translate` in a subprocess (same interpreter as the tests)."""
        return [sys.executable, "-m", "seq2seq_cli"]


@pytest.fixture(scope="session")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> E2E:
    """`translate run` on the small recipe, once per session (tokenizer → train → decode → score)."""
    from typer.testing import CliRunner

    from seq2seq_cli.cli import app

    data = e2e_write_corpus(tmp_path_factory.mktemp("e2e_data"))
    run_dir = tmp_path_factory.mktemp("e2e_run")
    e = E2E(E2E_RECIPE, run_dir, data, -1, "", "")
    result = CliRunner().invoke(app, ["run", str(E2E_RECIPE), *e.set_args(run_dir), "--no-progress"])
    torch.set_num_threads(1)
    if result.exit_code != 0:
        raise RuntimeError(f"session run failed ({result.exit_code}): {result.output}\n{result.exception!r}")
    e.run_exit_code, e.run_stdout, e.run_stderr = result.exit_code, result.stdout, result.stderr
    return e


def interrupt_and_wait(proc, timeout: float, what: str) -> str:
    """Send SIGINT to a subprocess started with text pipes; return its stderr (fail on a hang)."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what} did not stop after SIGINT")
    return err
