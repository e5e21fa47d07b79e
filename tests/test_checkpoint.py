"""End-to-end tests for seq2seq_cli.checkpoint on a really trained (small) checkpoint.

Round trip, atomic writes, refusal of unknown versions / truncated / foreign / forged files,
vocabulary mismatches, averaging and pruning.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from seq2seq_cli.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    average_checkpoints,
    content_hash,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    save_checkpoint,
    step_checkpoints,
)
from seq2seq_cli.translate import Translator

SENTENCES = ["one two three", "", "the king and the queen", "water fire earth light dark day"]


def _decode(path: Path) -> list[str]:
    t = Translator([path], "cpu", threads=1)
    opts = t.options(beam=2)
    return [
        t.detok(h[0]) if h else ""
        for h in t.translate_window(SENTENCES, opts.model_copy(update={"batch_tokens": 4096}))
    ]


def _state(path: Path) -> dict:
    """The raw dict of a checkpoint file (to forge or corrupt one as an attacker or editor would)."""
    return dict(torch.load(path, weights_only=True))


def _tiny(step: int, value: float, e2e) -> Checkpoint:
    base = load_checkpoint(e2e.last)
    return replace(base, weights={"w": torch.full((3,), value)}, step=step, training=None)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_round_trip_keeps_weights_and_decodes_the_same(e2e, tmp_path: Path) -> None:
    original = load_checkpoint(e2e.last)
    copy = tmp_path / "copy.pt"
    save_checkpoint(copy, original)
    again = load_checkpoint(copy)
    assert _state(copy)["format_version"] == FORMAT_VERSION == 2
    assert again.step == original.step == 120
    assert again.recipe == original.recipe and again.decode == original.decode
    assert again.sha256 == original.sha256 == content_hash(again.weights, again.tokenizer) and len(again.sha256) == 64
    assert again.training is not None and again.training.position == original.training.position
    a, b = original.weights, again.weights
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    model_a, tok_a = load_model(original)
    model_b, tok_b = load_model(again)
    for (na, pa), (nb, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert tok_a.to_state() == tok_b.to_state()
    out_a, out_b = _decode(e2e.last), _decode(copy)
    assert out_a == out_b
    assert len(out_a) == 4 and out_a[1] == "" and out_a[0] != "" and len(set(out_a)) == 4


@pytest.mark.parametrize("failure", ["disk_full", "interrupt"])
def test_failed_save_keeps_previous_file_and_leaves_no_temp(e2e, tmp_path: Path, monkeypatch, failure: str) -> None:
    target = tmp_path / "model.pt"
    save_checkpoint(target, _tiny(1, 1.0, e2e))
    before = target.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # something reached the temp file before the failure
        if failure == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt  # Ctrl-C in the middle of `translate average ... -o model.pt`

    monkeypatch.setattr(torch, "save", broken_save)
    if failure == "disk_full":
        with pytest.raises(CheckpointError, match="disk full"):
            save_checkpoint(target, _tiny(2, 0.0, e2e))
    else:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(target, _tiny(2, 0.0, e2e))
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert torch.equal(torch.load(target, weights_only=True)["model"]["w"], torch.ones(3))
    assert _leftovers(tmp_path) == [], "a temporary file was left behind"


def test_unknown_format_version_is_refused_naming_it(e2e, tmp_path: Path) -> None:
    state = _state(e2e.last)
    state["format_version"] = 99
    path = tmp_path / "future.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"format_version 99 was written by a newer translate") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_format_1_files_are_still_read(e2e, tmp_path: Path) -> None:
    """Format 1 (before the hash; training keys at the top level) loads and resumes as before."""
    state = _state(e2e.last)
    training = state.pop("training")
    old = {**state, **training, "format_version": 1, "position": training["position"]}
    del old["content_sha256"]
    path = tmp_path / "v1.pt"
    torch.save(old, path)
    ckpt = load_checkpoint(path)
    assert ckpt.training is not None and ckpt.training.position == training["position"]
    assert _decode(path) == _decode(e2e.last)


def test_flipped_byte_in_the_weights_is_refused(e2e, tmp_path: Path) -> None:
    """One bit changed inside a weight's bytes: torch still loads the file, the hash refuses it."""
    weights = load_checkpoint(e2e.last).weights
    name = next(k for k, v in weights.items() if k.startswith("encoder.") and v.dim() == 2)
    needle = weights[name].reshape(-1)[:64].numpy().tobytes()
    data = bytearray(e2e.last.read_bytes())
    at = data.find(needle)
    assert at > 0 and data.find(needle, at + 1) == -1, "the weight's bytes must occur once in the file"
    data[at + 10] ^= 0x01
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model"]  # torch itself notices nothing
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match="content hash mismatch") as info:
            load_checkpoint(path, mmap=mmap)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    out = subprocess.run(
        [*e2e.cli(), "decode", str(path)], input="one two\n", capture_output=True, text=True, env=e2e.env(), timeout=120
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "content hash mismatch" in out.stderr


def test_hand_edited_weights_or_tokenizer_are_refused(e2e, tmp_path: Path) -> None:
    for part in ("model", "tokenizer"):
        state = _state(e2e.last)
        if part == "model":
            name = next(k for k, v in state["model"].items() if v.is_floating_point())
            state["model"] = {**state["model"], name: state["model"][name] * 1.001}
        else:
            state["tokenizer"] = {**state["tokenizer"], "src": state["tokenizer"]["src"][:-1] + b"x"}
        path = tmp_path / f"edited-{part}.pt"
        torch.save(state, path)
        with pytest.raises(CheckpointError, match="content hash mismatch"):
            load_checkpoint(path)


@pytest.mark.parametrize("mmap", [False, True])
def test_truncated_checkpoint_is_a_checkpoint_error(e2e, tmp_path: Path, mmap: bool) -> None:
    data = e2e.last.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, mmap=mmap)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("kind", ["text", "list", "dict_without_model", "empty"])
def test_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path, kind: str, mmap: bool) -> None:
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("In the beginning God created the heavens and the earth.\n", encoding="utf-8")
    elif kind == "list":
        torch.save([1, 2, torch.ones(2)], path)
    elif kind == "dict_without_model":
        torch.save({"weights": torch.ones(2)}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, mmap=mmap)
    assert str(path) in str(info.value)


class _Payload:
    """Unpickling this runs a shell command (the classic malicious-pickle trick)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("where", ["top", "inside_a_real_checkpoint"])
def test_forged_checkpoint_is_refused_without_running_code(e2e, tmp_path: Path, where: str) -> None:
    marker = tmp_path / "MARKER"
    if where == "top":
        forged = _Payload(marker)
    else:
        forged = _state(e2e.last)
        forged["tokenizer"] = {"src": _Payload(marker), "tgt": None}
    path = tmp_path / "forged.pt"
    torch.save(forged, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        Translator([path], "cpu", threads=1)
    assert not marker.exists(), "loading the forged checkpoint ran its payload"


def test_tokenizer_and_model_vocabulary_mismatch(e2e, tmp_path: Path) -> None:
    ckpt = load_checkpoint(e2e.last)
    emb = ckpt.weights["tgt_embed.weight"]
    path = tmp_path / "mismatch.pt"
    save_checkpoint(
        path, replace(ckpt, weights={**ckpt.weights, "tgt_embed.weight": torch.zeros(emb.size(0) + 7, emb.size(1))})
    )
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=rf"\({emb.size(0)}\).*\({emb.size(0) + 7}\)") as info:
        load_model(ckpt)
    assert str(path) in str(info.value)


def test_average_of_two_checkpoints_is_the_elementwise_mean(e2e, tmp_path: Path) -> None:
    steps = step_checkpoints(e2e.run_dir / "checkpoints")
    assert [p.name for p in steps] == ["step-60.pt", "step-120.pt"]
    a, b = (load_checkpoint(p).weights for p in steps)
    avg = average_checkpoints(steps)
    assert avg.training is None and avg.averaged_from == tuple(str(p) for p in steps)
    n_float = 0
    for k, va in a.items():
        got = avg.weights[k]
        assert got.dtype == va.dtype and got.shape == va.shape
        if va.is_floating_point():
            n_float += 1
            mean = (va.double() + b[k].double()).div(2).to(va.dtype)
            torch.testing.assert_close(got, mean, rtol=0, atol=1e-6)
            if not torch.equal(va, b[k]):
                assert not torch.equal(got, va)
        else:
            assert torch.equal(got, va)
    assert n_float > 10
    out = tmp_path / "avg.pt"
    save_checkpoint(out, avg)
    assert len(_decode(out)) == 4  # the averaged file is a usable decoding checkpoint


def test_average_refuses_different_shapes(e2e, tmp_path: Path) -> None:
    ckpt = load_checkpoint(e2e.last)
    other = {
        k: (torch.zeros(v.size(0) + 1, *v.shape[1:]) if k == "tgt_embed.weight" else v) for k, v in ckpt.weights.items()
    }
    path = tmp_path / "other.pt"
    save_checkpoint(path, replace(ckpt, weights=other))
    with pytest.raises(CheckpointError, match="cannot average"):
        average_checkpoints([e2e.last, path])


def test_prune_keeps_the_newest_n_by_step_number(tmp_path: Path) -> None:
    for step in (1, 2, 9, 10, 100):
        (tmp_path / f"step-{step}.pt").write_bytes(b"x")
    for name in ("last.pt", "best.pt", "step-final.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"y")
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["step-10.pt", "step-100.pt", "last.pt", "best.pt", "step-final.pt", "notes.txt"]
    )
    prune_checkpoints(tmp_path, 1)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-100.pt"]
