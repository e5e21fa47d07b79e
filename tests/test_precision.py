"""`precision: auto`: every branch of the choice, the oneDNN ISA cap, and what checkpoints keep."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from seq2seq_cli import precision
from seq2seq_cli.precision import cpu_info, native_bf16, resolve_precision


@pytest.fixture(autouse=True)
def _fresh_choice():
    resolve_precision.cache_clear()
    yield
    resolve_precision.cache_clear()


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_training_on_cpu_follows_native_bf16(monkeypatch, caplog, native: bool, expected: str) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    with caplog.at_level(logging.INFO, logger="seq2seq_cli.precision"):
        assert resolve_precision("auto", "cpu", "train") == expected
        assert resolve_precision("auto", "cpu", "train") == expected  # resolved once: one log line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"precision auto -> {expected} for training: ")
    assert ("has native bf16" if native else "has no native bf16") in lines[0]


@pytest.mark.parametrize(
    "device,native,expected", [("cpu", True, "bf16-matmul"), ("cpu", False, "fp32"), ("cuda", True, "fp32")]
)
def test_auto_decoding_picks_a_batch_invariant_precision(monkeypatch, device: str, native: bool, expected: str) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert resolve_precision("auto", device, "decode", (9, 0)) == expected


def test_bf16_matmuls_is_counted_across_threads_and_restored_by_the_last() -> None:
    """The matmul setting is process-wide: it stays on while any decoding worker is inside, and
    the value from before comes back when the last one leaves (also after an error)."""
    import threading

    flags = torch.backends.mkldnn.matmul
    before = flags.fp32_precision
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with precision.bf16_matmuls():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    with pytest.raises(RuntimeError):
        with precision.bf16_matmuls():
            assert flags.fp32_precision == "bf16"
            raise RuntimeError("a failing batch")
    assert flags.fp32_precision == "bf16"  # the other worker is still inside
    release.set()
    t.join()
    assert flags.fp32_precision == before


@pytest.mark.parametrize(
    "capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp16")]
)
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected: str) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda: pytest.fail("the CPU probe is not consulted on CUDA"))
    assert resolve_precision("auto", "cuda", "train", capability) == expected


@pytest.mark.parametrize("asked", ["fp32", "bf16-matmul", "bf16", "fp16", "int8"])
def test_explicit_precisions_are_kept(monkeypatch, asked: str) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert resolve_precision(asked, "cpu", "decode") == asked


def test_explicit_bf16_without_native_support_runs_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="seq2seq_cli.precision"):
        assert resolve_precision("bf16", "cpu", "train") == "bf16"
        assert resolve_precision("bf16", "cpu", "train") == "bf16"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "emulated" in warnings[0].getMessage()


def test_native_bf16_needs_the_instructions(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    assert native_bf16() is False


def _probe(env_extra: dict[str, str]) -> list[str]:
    code = (
        "from seq2seq_cli.precision import native_bf16, resolve_precision, cpu_info; "
        "print(native_bf16(), resolve_precision('auto', 'cpu', 'train'), "
        "resolve_precision('auto', 'cpu', 'decode'), cpu_info().onednn_isa_cap or '-')"
    )
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_onednn_isa_cap_avx2_makes_auto_choose_fp32() -> None:
    """ONEDNN_MAX_CPU_ISA=AVX2 makes any CPU behave as one without native bf16: auto picks fp32."""
    assert _probe({"ONEDNN_MAX_CPU_ISA": "AVX2"}) == ["False", "fp32", "fp32", "AVX2"]
    hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    uncapped = _probe({"ONEDNN_MAX_CPU_ISA": ""})  # empty = no cap
    assert uncapped[:3] == [str(hardware), "bf16" if hardware else "fp32", "bf16-matmul" if hardware else "fp32"]


def test_without_a_cap_auto_matches_the_hardware() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    got = subprocess.run(
        [
            sys.executable,
            "-c",
            "from seq2seq_cli.precision import resolve_precision; print(resolve_precision('auto', 'cpu', 'train'))",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert got.stdout.split() == ["bf16" if hardware else "fp32"], got.stderr


def test_cpu_info_describes_the_machine() -> None:
    info = cpu_info()
    text = info.describe()
    assert info.model and info.model in text
    assert ("bf16 native" in text) == info.native_bf16 and ("bf16 not native" in text) != info.native_bf16


def test_checkpoints_keep_auto_not_the_resolved_choice(e2e, tmp_path) -> None:
    """Trained with precision auto (bf16 here or fp32, by the machine): the file still says auto, so
    the model decodes at the right precision on another machine."""
    from typer.testing import CliRunner

    from seq2seq_cli.checkpoint import load_checkpoint
    from seq2seq_cli.cli import app

    out = tmp_path / "auto"
    e2e.copy_tokenizer(out)
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(e2e.recipe),
            *e2e.set_args(
                out, train__precision="auto", decode__precision="auto", train__max_steps=2, train__valid_max_sentences=3
            ),
            "--no-progress",
        ],
    )
    torch.set_num_threads(1)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt.recipe.train.precision == "auto" and ckpt.decode.precision == "auto" and ckpt.step == 2
