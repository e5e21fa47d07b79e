"""End-to-end tests for training: resume equivalence, metrics, checkpoints, signals, budgets.

Runs are small (see the `e2e` fixture in conftest.py) and reuse the session's tokenizer.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import interrupt_and_wait

from seq2seq_cli.checkpoint import load_checkpoint, load_model, step_checkpoints
from seq2seq_cli.pipeline import run_train


def _records(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in recs if kind is None or r["type"] == kind]


def _train(e2e, out: Path, **extra) -> dict:
    if not (out / "tokenizer").exists():
        e2e.copy_tokenizer(out)
    result = run_train(e2e.load(out, **extra), progress=False)
    torch.set_num_threads(1)
    return result


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).weights


# ------------------------------------------------------------------------------------ resume


def test_resumed_run_equals_uninterrupted_run(e2e, tmp_path: Path) -> None:
    """N steps, then resume to N+M == N+M steps at once (dropout on, an epoch boundary crossed)."""
    n, m = 5, 6
    common = dict(train__valid_every=1000, train__log_every=1, model__dropout=0.1)
    first = _train(e2e, tmp_path / "a", train__max_steps=n, **common)
    assert first["step"] == n and first["stop_reason"] == "max_steps"
    resumed = _train(e2e, tmp_path / "a", train__max_steps=n + m, **common)
    straight = _train(e2e, tmp_path / "b", train__max_steps=n + m, **common)
    assert resumed["step"] == straight["step"] == n + m
    assert resumed["epoch"] == straight["epoch"] >= 1, "the run should cross an epoch boundary"
    steps = [r["step"] for r in _records(tmp_path / "a", "train")]
    assert steps == list(range(1, n + m + 1)), "resume must continue the step count"
    losses_a = [r["loss"] for r in _records(tmp_path / "a", "train")]
    losses_b = [r["loss"] for r in _records(tmp_path / "b", "train")]
    assert losses_a == pytest.approx(losses_b, rel=0, abs=1e-6)
    pa = _params(tmp_path / "a" / "checkpoints" / "last.pt")
    pb = _params(tmp_path / "b" / "checkpoints" / "last.pt")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6, msg=k)
    first_w = (
        _params(tmp_path / "a" / "checkpoints" / f"step-{n}.pt")
        if (tmp_path / "a" / "checkpoints" / f"step-{n}.pt").exists()
        else None
    )
    if first_w is not None:  # the comparison is not vacuous: training moved the weights
        assert any(not torch.equal(first_w[k], pa[k]) for k in pa if pa[k].is_floating_point())


def test_resume_is_exact_with_weighted_corpora(e2e, tmp_path: Path) -> None:
    """Two prepared corpora, one with a fractional weight (a fresh sample each epoch): resuming across
    epoch boundaries gives the same losses and weights as one straight run."""
    d = e2e.data
    corpora = json.dumps(
        [
            {"name": "a", "src": d["data.train.src"], "tgt": d["data.train.tgt"], "max_lines": 150, "weight": 1.5},
            {"name": "b", "src": d["data.dev.src"], "tgt": d["data.dev.tgt"], "weight": 2},
        ]
    )
    common = dict(train__valid_every=1000, train__log_every=1, data__train=None, data__corpora=corpora)
    n, m = 4, 6
    _train(e2e, tmp_path / "a", train__max_steps=n, **common)
    resumed = _train(e2e, tmp_path / "a", train__max_steps=n + m, **common)
    straight = _train(e2e, tmp_path / "b", train__max_steps=n + m, **common)
    assert resumed["epoch"] == straight["epoch"] >= 2, "the runs should cross epoch boundaries"
    losses = [[r["loss"] for r in _records(tmp_path / x, "train")] for x in "ab"]
    assert len(losses[0]) == n + m and losses[0] == pytest.approx(losses[1], rel=0, abs=1e-6)
    pa, pb = _params(tmp_path / "a" / "checkpoints" / "last.pt"), _params(tmp_path / "b" / "checkpoints" / "last.pt")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6, msg=k)


def test_budget_schedule_resumes_exactly(e2e, tmp_path: Path, monkeypatch) -> None:
    """schedule: budget on a step budget: a run stopped after n updates and resumed equals one run
    straight through (the lr depends on the fraction of the budget spent, restored with the step)."""
    from seq2seq_cli.train import Trainer

    n, total = 4, 9
    common = dict(
        train__valid_every=1000,
        train__log_every=1,
        model__dropout=0.1,
        train__schedule="budget",
        train__peak_lr=3e-3,
        train__warmup_fraction=0.3,
        train__max_steps=total,
    )
    original = Trainer._budget_left
    monkeypatch.setattr(Trainer, "_budget_left", lambda self: "stopped" if self.pos.step >= n else original(self))
    assert _train(e2e, tmp_path / "a", **common)["step"] == n
    monkeypatch.setattr(Trainer, "_budget_left", original)
    resumed = _train(e2e, tmp_path / "a", **common)
    straight = _train(e2e, tmp_path / "b", **common)
    assert resumed["step"] == straight["step"] == total
    lrs = [r["lr"] for r in _records(tmp_path / "b", "train")]
    assert [r["lr"] for r in _records(tmp_path / "a", "train")] == pytest.approx(lrs, rel=1e-12)
    assert max(lrs) == pytest.approx(3e-3, rel=0.2) and lrs[-1] == 0.0  # warmed up, decayed to zero
    pa, pb = _params(tmp_path / "a" / "checkpoints" / "last.pt"), _params(tmp_path / "b" / "checkpoints" / "last.pt")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6, msg=k)


def test_rerun_of_a_finished_run_does_not_train_again(e2e, tmp_path: Path) -> None:
    _train(e2e, tmp_path, train__max_steps=3, train__valid_every=1000, train__log_every=1)
    n_records = len(_records(tmp_path))
    again = _train(e2e, tmp_path, train__max_steps=3, train__valid_every=1000, train__log_every=1)
    assert again["step"] == 3 and again["stop_reason"] == "max_steps"
    assert len(_records(tmp_path)) == n_records


# ------------------------------------------------------------------------------------ metrics and files


def test_metrics_jsonl_has_train_and_valid_records(e2e) -> None:
    train = _records(e2e.run_dir, "train")
    valid = _records(e2e.run_dir, "valid")
    assert [r["step"] for r in train] == [20, 40, 60, 80, 100, 120]
    for r in train:
        assert r["lr"] > 0 and math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["tokens_per_s"] > 0 and r["epoch"] >= 1
    peaks = [r["peak_rss_mib"] for r in train]  # a high-water mark: never falls, and is this process's
    assert peaks == sorted(peaks) and 50 < peaks[0] < 100_000
    assert train[-1]["loss"] < train[0]["loss"], "the loss should go down on the toy task"
    assert [r["step"] for r in valid] == [60, 120]
    for r in valid:
        assert 0.0 <= r["bleu"] <= 100.0
        chrf = [k for k in r if k.startswith("chrf")]
        assert chrf and 0.0 <= r[chrf[0]] <= 100.0
        assert math.isfinite(r["dev_nll"]) and isinstance(r["best"], bool)
    assert valid[0]["best"] is True


def test_best_and_last_checkpoints_exist_and_load(e2e) -> None:
    last, best = load_checkpoint(e2e.last), load_checkpoint(e2e.best)
    assert last.step == 120
    best_steps = [r["step"] for r in _records(e2e.run_dir, "valid") if r["best"]]
    assert best.step == best_steps[-1]
    for ckpt in (last, best):
        model, tok = load_model(ckpt)
        assert tok.tgt_vocab_size == model.state_dict()["tgt_embed.weight"].size(0)
        assert ckpt.training is not None and ckpt.training.optimizer["state"] and "torch" in ckpt.training.rng


def test_best_metric_chrf_works(e2e, tmp_path: Path) -> None:
    result = _train(
        e2e, tmp_path, train__max_steps=2, train__valid_every=2, train__valid_max_sentences=4, train__best_metric="chrf"
    )
    assert result["step"] == 2 and (tmp_path / "checkpoints" / "best.pt").exists()
    assert "chrf" in _records(tmp_path, "valid")[0]


@pytest.fixture(scope="module")
def many_checkpoints(e2e, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keep_last")
    _train(
        e2e,
        out,
        train__max_steps=8,
        train__valid_every=2,
        train__valid_max_sentences=3,
        train__keep_last=2,
        train__average_last=2,
    )
    return out


def test_keep_last_is_respected(many_checkpoints: Path) -> None:
    ckpts = many_checkpoints / "checkpoints"
    assert [p.name for p in step_checkpoints(ckpts)] == ["step-6.pt", "step-8.pt"]
    assert load_checkpoint(ckpts / "last.pt").step == 8
    assert len(_records(many_checkpoints, "valid")) == 4
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_average_last_writes_average_pt(many_checkpoints: Path) -> None:
    ckpts = many_checkpoints / "checkpoints"
    avg = load_checkpoint(ckpts / "average.pt")
    a, b = _params(ckpts / "step-6.pt"), _params(ckpts / "step-8.pt")
    assert avg.averaged_from == (str(ckpts / "step-6.pt"), str(ckpts / "step-8.pt"))
    for k, v in avg.weights.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (a[k].double() + b[k].double()).div(2).float(), rtol=0, atol=1e-6)
    load_model(avg)


# ------------------------------------------------------------------------------------ budgets


def test_early_stopping_with_patience_stops_before_max_steps(e2e, tmp_path: Path) -> None:
    # lr ~1e-13: the weights (and so the dev BLEU) cannot change, the 2nd validation is not better.
    result = _train(
        e2e,
        tmp_path,
        train__max_steps=50,
        train__valid_every=2,
        train__valid_max_sentences=5,
        train__patience=1,
        train__best_metric="bleu",
        train__lr_factor=1e-12,
    )
    assert result["stop_reason"] == "early_stopping"
    assert result["step"] == 4
    valid = _records(tmp_path, "valid")
    assert [(r["step"], r["best"]) for r in valid] == [(2, True), (4, False)]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt").step == 4
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt").step == 2


def test_max_time_budget_stops(e2e, tmp_path: Path) -> None:
    start = time.perf_counter()
    result = _train(e2e, tmp_path, train__max_steps=0, train__max_time=0.01, data__dev=None, train__log_every=1)
    elapsed = time.perf_counter() - start
    assert result["stop_reason"] == "max_time"
    assert 1 <= result["step"] < 10_000
    assert elapsed < 30
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt.step == result["step"] and ckpt.training.position["seconds"] >= 0.6


# ------------------------------------------------------------------------------------ signals


def _spawn_train(e2e, out: Path, **extra) -> subprocess.Popen:
    e2e.copy_tokenizer(out)
    cmd = [*e2e.cli(), "train", str(e2e.recipe), *e2e.set_args(out, **extra), "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e2e.env())


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited early ({proc.returncode}): {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for training to make progress")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigint_saves_exits_130_and_rerun_continues(e2e, tmp_path: Path) -> None:
    common = dict(train__log_every=1, train__valid_every=100000)
    proc = _spawn_train(e2e, tmp_path, train__max_steps=100000, **common)
    _wait_for(proc, lambda: len(_records(tmp_path, "train")) >= 2)
    err = interrupt_and_wait(proc, 60, "training")
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted" in err
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    k = saved.step
    assert k >= 2 and saved.training.position["step"] == k
    assert _records(tmp_path, "train")[-1]["step"] == k
    before = len(_records(tmp_path, "train"))
    result = _train(e2e, tmp_path, train__max_steps=k + 3, **common)
    assert result["step"] == k + 3 and result["stop_reason"] == "max_steps"
    new_steps = [r["step"] for r in _records(tmp_path, "train")[before:]]
    assert new_steps == [k + 1, k + 2, k + 3], "the rerun must continue from the saved step"


@pytest.mark.slow
def test_sigint_inside_a_slow_step_exits_within_seconds(e2e, tmp_path: Path) -> None:
    """Steps made slow for real (bf16 emulated by oneDNN under ONEDNN_MAX_CPU_ISA=AVX2, as on a CPU
    without native bf16): Ctrl-C in the middle of a step drops that step, saves the last completed
    one and exits 130 long before the step would have ended."""
    extra = dict(
        train__log_every=1,
        train__valid_every=100000,
        train__precision="bf16",
        model__d_model=256,
        model__ff_dim=1024,
        train__batch_tokens=4096,
        train__max_steps=100000,
    )
    e2e.copy_tokenizer(tmp_path)
    cmd = [*e2e.cli(), "train", str(e2e.recipe), *e2e.set_args(tmp_path, **extra), "--no-progress"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**e2e.env(), "ONEDNN_MAX_CPU_ISA": "AVX2"}
    )
    _wait_for(proc, lambda: len(_records(tmp_path, "train")) >= 1, timeout=600)
    step_seconds = _records(tmp_path, "train")[0]["minutes"] * 60
    assert step_seconds > 6, f"the step must be slow for this test to mean anything ({step_seconds:.1f} s)"
    time.sleep(1.0)  # inside step 2
    start = time.monotonic()
    err = interrupt_and_wait(proc, 120, "training")
    waited = time.monotonic() - start
    assert proc.returncode == 130, err[-2000:]
    assert waited < step_seconds / 2, f"took {waited:.1f} s to stop; a step takes {step_seconds:.1f} s"
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved.step == _records(tmp_path, "train")[-1]["step"] == saved.training.position["step"]


def test_second_sigint_exits_at_once_and_keeps_the_last_good_checkpoint(e2e, tmp_path: Path, monkeypatch) -> None:
    """The handler itself (two real signals would coalesce into one before Python sees them): the
    first sets the stop flag (and, inside a forward/backward pass, abandons it); the second leaves
    at once through os._exit(130), without writing anything."""
    import os as os_module

    from seq2seq_cli import train as train_module

    e2e.copy_tokenizer(tmp_path)
    trainer = train_module.Trainer(e2e.load(tmp_path, train__max_steps=2), progress=False)
    torch.set_num_threads(1)
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os_module, "_exit", fake_exit)
    trainer._abortable = True
    with pytest.raises(train_module._StepAborted):
        trainer._on_signal(signal.SIGINT, None)
    assert trainer.stop_signal == signal.SIGINT and exits == [] and not trainer._abortable
    with pytest.raises(SystemExit):
        trainer._on_signal(signal.SIGINT, None)
    assert exits == [130]
    assert not (tmp_path / "checkpoints").exists()  # the second signal wrote nothing


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before_first_checkpoint", "after_a_checkpoint"])
def test_sigkill_then_resume_completes(e2e, tmp_path: Path, when: str) -> None:
    valid_every = 100000 if when == "before_first_checkpoint" else 2
    common = dict(train__log_every=1, train__valid_every=valid_every, train__valid_max_sentences=2)
    proc = _spawn_train(e2e, tmp_path, train__max_steps=100000, **common)
    last = tmp_path / "checkpoints" / "last.pt"
    if when == "before_first_checkpoint":
        _wait_for(proc, lambda: len(_records(tmp_path, "train")) >= 1)
    else:
        _wait_for(proc, lambda: len(_records(tmp_path, "valid")) >= 2)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    start = 0
    if when == "after_a_checkpoint":
        assert last.exists()
    if last.exists():
        start = load_checkpoint(last).step  # a checkpoint left by a killed run is complete and loads
        assert start >= 2
    before = len(_records(tmp_path, "train"))
    result = _train(e2e, tmp_path, train__max_steps=start + 3, **common)
    assert result["step"] == start + 3
    new_steps = [r["step"] for r in _records(tmp_path, "train")[before:]]
    assert new_steps == [start + 1, start + 2, start + 3]
    assert load_checkpoint(last).step == start + 3
