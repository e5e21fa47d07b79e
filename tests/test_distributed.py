"""Distributed training on CPU (DDP over gloo): `translate train --nproc 2` and torchrun.

Every multi-process run is a subprocess with a hard timeout (its whole process group is killed
on expiry), so a hang fails the test instead of blocking the session. All runs share one
tokenizer, trained once and copied into each output_dir (sentencepiece results can depend on
its thread count). Dropout is 0 throughout: the ranks' RNG streams differ, the math must not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from seq2seq_cli.checkpoint import load_checkpoint
from seq2seq_cli.data import make_batches, shard_batches

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable"),
    pytest.mark.slow,
]  # the tests here start several processes

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
K = 4  # steps of the base runs
HANG_GUARD_S = 300  # a subprocess still running after this is a hang
SMALL = {
    "data.train.max_lines": 400,
    "data.dev.max_lines": 10,
    "data.test.max_lines": 10,
    "tokenizer.vocab_size": 200,
    "model.d_model": 32,
    "model.ff_dim": 64,
    "model.dropout": 0,
    "model.attention_dropout": 0,
    "model.activation_dropout": 0,
    "train.max_steps": K,
    "train.valid_every": 1000,
    "train.log_every": 1,
    "train.threads": 1,
    "train.batch_tokens": 512,
    # a large enough learning rate and active clipping, so that a wrong loss normalisation
    # across ranks moves the weights far beyond the 1e-5 tolerance (checked by hand: ~5e-2)
    "train.warmup_steps": 8,
    "train.clip_norm": 0.5,
    "train.valid_max_sentences": 5,
}
DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
)


# ------------------------------------------------------------------------------------ helpers
@dataclass
class Proc:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> "Proc":
        assert self.returncode == 0, f"{self.args} exited {self.returncode}\n{self.stdout}\n{self.stderr[-4000:]}"
        return self


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200", TRANSLATE_DIST_TIMEOUT_MIN="1"
    )
    return env


def _run(args: list[str], timeout: float = HANG_GUARD_S) -> Proc:
    """Run args in a new session; on timeout kill that session's process group and fail."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"hang: {args} still running after {timeout} s\n{err[-4000:]}")
    return Proc(args, p.returncode, out, err, time.monotonic() - t0)


def _sets(output_dir: Path, **extra) -> list[str]:
    """--set options of the small recipe (extra keys use __ for dots: train__max_steps=6)."""
    values = {"output_dir": str(output_dir), **SMALL, **{k.replace("__", "."): v for k, v in extra.items()}}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _train(output_dir: Path, nproc: int = 1, **extra) -> Proc:
    cmd = [sys.executable, "-m", "seq2seq_cli", "train", str(RECIPE), *_sets(output_dir, **extra), "--no-progress"]
    return _run(cmd + (["--nproc", str(nproc)] if nproc > 1 else []))


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.exists() and shutil.which("torchrun"):
        exe = Path(shutil.which("torchrun"))  # type: ignore[arg-type]
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _torchrun_train(output_dir: Path, target: list[str], **extra) -> Proc:
    """torchrun --standalone (a free rendezvous port) --nproc-per-node 2 TARGET train RECIPE ..."""
    return _run(
        [
            *_torchrun(),
            "--standalone",
            "--nproc-per-node",
            "2",
            *target,
            "train",
            str(RECIPE),
            *_sets(output_dir, **extra),
            "--no-progress",
        ]
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]


def _train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _metrics(run_dir) if r["type"] == "train"]


def _last(run_dir: Path):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small recipe's tokenizer, trained once in-process."""
    from seq2seq_cli.pipeline import run_tokenizer
    from seq2seq_cli.recipe import load_recipe

    out = tmp_path_factory.mktemp("dist_tok")
    run_tokenizer(load_recipe(RECIPE, [s for s in _sets(out) if s != "--set"]))
    torch.set_num_threads(1)
    return out / "tokenizer"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """fresh(name) -> a new output_dir holding only the shared tokenizer."""

    def make(name: str) -> Path:
        d = tmp_path_factory.mktemp(name)
        shutil.copytree(tokenizer_dir, d / "tokenizer")
        return d

    return make


@pytest.fixture(scope="module")
def two_proc(fresh) -> tuple[Path, Proc]:
    """`translate train --nproc 2` for K steps, accum_steps=1."""
    d = fresh("two_proc")
    return d, _train(d, nproc=2).check()


@pytest.fixture(scope="module")
def one_proc_accum2(fresh) -> tuple[Path, Proc]:
    """One process, accum_steps=2, K steps: the same global batches as two_proc."""
    d = fresh("one_proc_accum2")
    return d, _train(d, train__accum_steps=2).check()


# ------------------------------------------------------------------------------------ sharding (no processes)
@pytest.mark.parametrize("world,accum", [(1, 2), (2, 1), (2, 2), (3, 2)])
def test_shard_batches_give_each_update_consecutive_global_batches(world: int, accum: int) -> None:
    lens = [(i * 7) % 23 + 1 for i in range(300)]
    batches = make_batches(lens, lens[::-1], 64, seed=3, epoch=1)
    per_step = world * accum
    shards = [shard_batches(batches, r, world, accum) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every rank must run the same number of updates"
    steps = len(shards[0]) // accum
    assert steps == len(batches) // per_step
    for s in range(steps):  # update s consumes global batches [s*per_step, (s+1)*per_step), rank-major
        got = [b for r in range(world) for b in shards[r][s * accum : (s + 1) * accum]]
        assert got == batches[s * per_step : (s + 1) * per_step]


# ------------------------------------------------------------------------------------ 1. equivalence
def test_two_processes_equal_one_process_with_accumulation(two_proc, one_proc_accum2) -> None:
    (d2, _), (d1, _) = two_proc, one_proc_accum2
    c2, c1 = _last(d2), _last(d1)
    assert c1.step == c2.step == K
    assert c1.training.position["batches_done"] == c2.training.position["batches_done"] == 2 * K
    assert _max_diff(c1.weights, c2.weights) <= 1e-5
    assert _max_diff(c1.training.optimizer["state"][0], c2.training.optimizer["state"][0]) <= 1e-5

    # the comparison means something: the weights moved well beyond the tolerance from the init
    from seq2seq_cli.model import build_model
    from seq2seq_cli.tokenizer import Tokenizer

    tok = Tokenizer.load(d1 / "tokenizer")
    torch.manual_seed(c1.recipe.seed)
    init = build_model(
        c1.recipe.model, tok.src_vocab_size, tok.tgt_vocab_size, tok.pad_id, tok.bos_id, tok.eos_id
    ).state_dict()
    assert _max_diff(init, c1.weights) > 1e-3

    # the logged training loss is normalised by the global batch's target tokens too
    t1 = [r for r in _metrics(d1) if r["type"] == "train"]
    t2 = [r for r in _metrics(d2) if r["type"] == "train"]
    assert [r["step"] for r in t1] == [r["step"] for r in t2] == list(range(1, K + 1))
    for a, b in zip(t1, t2):
        assert a["tgt_tokens"] == b["tgt_tokens"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)


# ------------------------------------------------------------------------------------ 2. rank 0 writes
def test_only_rank0_writes_files(two_proc) -> None:
    d, _ = two_proc
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files == [
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        f"checkpoints/step-{K}.pt",
        "metrics.jsonl",
        "prepared/train/lengths.npy",
        "prepared/train/manifest.json",
        "prepared/train/src.bin",
        "prepared/train/tgt.bin",
        "tokenizer/spm.model",
        "tokenizer/spm.vocab",
    ]
    records = _metrics(d)
    assert _train_steps(d) == list(range(1, K + 1)), "one train record per step, written once"
    assert [r["step"] for r in records if r["type"] == "valid"] == [K]
    assert [r["type"] for r in records].count("data") == 1  # the corpora's counts, once
    assert len(records) == K + 2


def test_nproc_prints_the_result_json_once(two_proc) -> None:
    d, proc = two_proc
    lines = _json_lines(proc.stdout)
    assert len(lines) == 1, proc.stdout
    assert lines[0]["step"] == K and lines[0]["last_path"] == str(d / "checkpoints" / "last.pt")


# ------------------------------------------------------------------------------------ 3. resume across world sizes
@pytest.fixture(scope="module")
def resumed_in_two(fresh, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1-process run for K steps, continued to K+2 by (a) 2 processes (b) 1 process with accum 2."""
    a = fresh("resume_world")
    _train(a).check()
    assert _last(a).step == K and _last(a).training.position["batches_done"] == K
    b = tmp_path_factory.mktemp("resume_accum") / "run"
    shutil.copytree(a, b)
    _train(a, nproc=2, train__max_steps=K + 2).check()
    _train(b, train__max_steps=K + 2, train__accum_steps=2).check()
    return a, b


def test_one_process_checkpoint_continues_in_two(resumed_in_two) -> None:
    a, b = resumed_in_two
    ca = _last(a)
    assert ca.step == K + 2
    assert ca.training.position["batches_done"] == K + 2 * 2  # K single batches, then 2 updates x 2 ranks
    assert _train_steps(a) == list(range(1, K + 3))
    assert [r["step"] for r in _metrics(a) if r["type"] == "valid"] == [K, K + 2]
    # the continuation consumed the same global batches as a 1-process accum-2 continuation would
    assert _max_diff(ca.weights, _last(b).weights) <= 1e-5


def test_two_process_checkpoint_continues_in_one(resumed_in_two) -> None:
    a, _ = resumed_in_two
    _train(a, train__max_steps=K + 4).check()
    ca = _last(a)
    assert ca.step == K + 4
    assert ca.training.position["batches_done"] == K + 4 + 2
    assert _train_steps(a) == list(range(1, K + 5))


# ------------------------------------------------------------------------------------ 4. torchrun
def test_torchrun_module_entry_point(fresh) -> None:
    d = fresh("torchrun")
    proc = _torchrun_train(d, ["-m", "seq2seq_cli"]).check()
    assert _last(d).step == K
    lines = _json_lines(proc.stdout)
    assert len(lines) == 1 and lines[0]["step"] == K, proc.stdout  # printed by rank 0 only
    assert _train_steps(d) == list(range(1, K + 1))
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["best.pt", "last.pt", f"step-{K}.pt"]


# ------------------------------------------------------------------------------------ 5. failures
FAIL_RANK1 = """\
import os, sys
if os.environ.get("RANK") == "1":  # rank 1 dies in its second update; rank 0 waits in a collective
    import seq2seq_cli.train as t
    _update = t.Trainer._update
    def boom(self, group):
        if self.pos.step >= 1:
            raise RuntimeError("injected failure on rank 1")
        return _update(self, group)
    t.Trainer._update = boom
from seq2seq_cli.cli import main
sys.argv = ["translate", *sys.argv[1:]]
main()
"""


def test_a_failing_rank_brings_the_group_down(fresh, tmp_path: Path) -> None:
    d = fresh("fail_rank1")
    script = tmp_path / "fail_rank1.py"
    script.write_text(FAIL_RANK1, encoding="utf-8")
    proc = _torchrun_train(d, [str(script)], train__max_steps=50)
    assert proc.returncode != 0
    assert proc.seconds < 60, f"took {proc.seconds:.0f} s to come down"
    assert "injected failure on rank 1" in proc.stderr
    assert not any(p.name.endswith(".tmp") for p in d.rglob("*")), "a save was left half-written"


@pytest.fixture(scope="module")
def unfeedable(fresh) -> Proc:
    """--nproc 2 with one batch per epoch: every rank raises DataError (it cannot feed 2 ranks)."""
    return _train(fresh("unfeedable"), nproc=2, train__batch_tokens=100000)


def test_rank_user_error_under_nproc_exits_quickly(unfeedable: Proc) -> None:
    assert unfeedable.returncode != 0
    assert unfeedable.seconds < 60, f"took {unfeedable.seconds:.0f} s"
    assert "cannot feed 2 ranks x 1 accumulation steps" in unfeedable.stderr
    assert not _json_lines(unfeedable.stdout)


def test_rank_user_error_under_nproc_is_one_line_exit_2(unfeedable: Proc) -> None:
    assert unfeedable.returncode == 2
    errors = [x for x in unfeedable.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "cannot feed 2 ranks" in errors[0], unfeedable.stderr
    assert "Traceback" not in unfeedable.stderr
