"""End-to-end tests of `translate decode` with the session's small checkpoint: line accounting and
order, n-best, batching, stdin / streaming, interruption, broken pipes, odd input, ensembles."""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

import pytest
from conftest import interrupt_and_wait
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from seq2seq_cli.cli import app
from seq2seq_cli.data import clean_line
from seq2seq_cli.precision import native_bf16
from seq2seq_cli.translate import Translator

runner = CliRunner()
WORDS = (
    "one two three four five six seven eight nine ten red blue green black white big small old new "
    "good bad king queen house water fire earth light dark day"
).split()
LINES = [
    "one two three",
    "the king and the queen",
    "water fire earth light dark day",
    "nine",
    "big red house",
    "old king",
    "seven eight nine ten one two three four five six",
]


@pytest.fixture(scope="module")
def translator(e2e) -> Translator:
    return Translator([e2e.last], "cpu", threads=1)


def _expected(translator: Translator, lines: list[str]) -> list[str]:
    """Reference translations: each line alone, with the checkpoint's decode defaults."""
    opts = translator.options()
    out = []
    for line in lines:
        hyps = translator.translate_window([line], opts.model_copy(update={"batch_tokens": 4096}))[0]
        out.append(translator.detok(hyps[0]) if hyps else "")
    return out


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


def _decode(ckpts: list[Path] | Path, *args: str) -> "CliRunner.invoke":
    ckpts = [ckpts] if isinstance(ckpts, Path) else ckpts
    return runner.invoke(app, ["decode", *map(str, ckpts), "--threads", "1", *args])


def _out_lines(text: str) -> list[str]:
    assert text == "" or text.endswith("\n")
    return text.split("\n")[:-1]  # not splitlines(): U+2028 and friends are not line ends here


def _sub(e2e, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*e2e.cli(), "decode", str(e2e.last), "--threads", "1", *args],
        capture_output=True,
        env=e2e.env(),
        timeout=60,
        **kw,
    )


# ------------------------------------------------------------------------------------ line accounting


def test_empty_lines_stay_empty_and_order_is_kept(e2e, translator, tmp_path: Path) -> None:
    lines = ["one two three", "", "the king and the queen", "   ", "", "nine", "\t", "big red house", ""]
    src, out = _write(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    result = _decode(e2e.last, "-i", str(src), "-o", str(out))
    assert result.exit_code == 0, result.output
    got = _out_lines(out.read_text(encoding="utf-8"))
    assert len(got) == len(lines)
    assert got == _expected(translator, lines)
    assert [g for line, g in zip(lines, got) if not line.strip()] == [""] * 5
    assert len({g for g in got if g}) >= 3, "the toy model gives each sentence its own translation"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def test_n_best_tsv_sorted_by_score_and_first_equals_one_best(e2e, tmp_path: Path) -> None:
    lines = ["one two three", "", "water fire earth light dark day", "old king"]
    src = _write(tmp_path / "in.txt", lines)
    nbest = _decode(e2e.last, "-i", str(src), "--n-best", "3", "--beam", "3")
    plain = _decode(e2e.last, "-i", str(src), "--beam", "3")
    assert nbest.exit_code == 0 and plain.exit_code == 0, nbest.output + plain.output
    rows = [r.split("\t") for r in _out_lines(nbest.stdout)]
    assert all(len(r) == 3 for r in rows), rows
    by_index: dict[int, list[tuple[float, str]]] = {}
    for idx, score, text in rows:
        by_index.setdefault(int(idx), []).append((float(score), text))
    assert list(by_index) == [0, 1, 2, 3], "indices in input order"
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
    one_best = _out_lines(plain.stdout)
    for i, line in enumerate(lines):
        entries = by_index[i]
        if not line:
            assert entries == [(0.0, "")]
            continue
        assert len(entries) == 3
        scores = [s for s, _ in entries]
        assert scores == sorted(scores, reverse=True)
        assert entries[0][1] == one_best[i]


@pytest.mark.parametrize("beam", ["1", "3"])
def test_output_does_not_depend_on_batching(e2e, tmp_path: Path, beam: str) -> None:
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 9)) for i in range(40)]
    src = _write(tmp_path / "in.txt", lines)
    small = _decode(e2e.last, "-i", str(src), "--beam", beam, "--batch-tokens", "16")
    large = _decode(e2e.last, "-i", str(src), "--beam", beam, "--batch-tokens", "100000")
    assert small.exit_code == 0 and large.exit_code == 0
    assert _out_lines(small.stdout) == _out_lines(large.stdout)
    assert len(_out_lines(small.stdout)) == 40


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_output_does_not_depend_on_workers(e2e, tmp_path: Path, precision: str) -> None:
    """Batches searched in parallel threads give the same lines, in input order, as one at a time;
    bf16 checks that autocast is entered in every worker thread (else the bf16 weights would
    meet fp32 activations and fail)."""
    lines = [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(1 + i % 11)) for i in range(60)]
    src = _write(tmp_path / "in.txt", lines)
    args = ["-i", str(src), "--beam", "3", "--batch-tokens", "40", "--precision", precision, "--threads", "2"]
    one, three = _decode(e2e.last, *args, "--workers", "1"), _decode(e2e.last, *args, "--workers", "3")
    assert one.exit_code == 0 and three.exit_code == 0, three.output
    assert _out_lines(one.stdout) == _out_lines(three.stdout) and len(_out_lines(one.stdout)) == 60


def test_workers_share_the_threads_and_restore_them(e2e) -> None:
    import torch

    before = torch.get_num_threads()
    tr = Translator([e2e.last], "cpu", threads=2, options={"precision": "fp32", "workers": 2})
    seen: list[tuple[int, int]] = []
    lines = [" ".join(WORDS[: 1 + i % 7]) for i in range(20)]
    hyps = tr.translate_window(lines, tr.options(beam=2, batch_tokens=24), on_batch=lambda n, t: seen.append((n, t)))
    assert len(hyps) == 20 and sum(n for n, _ in seen) == 20 and len(seen) > 2
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)


def test_ensemble_of_the_same_checkpoint_equals_the_single_checkpoint(e2e, tmp_path: Path) -> None:
    src = _write(tmp_path / "in.txt", LINES + [""])
    single = _decode(e2e.last, "-i", str(src))
    double = _decode([e2e.last, e2e.last], "-i", str(src))
    assert single.exit_code == 0 and double.exit_code == 0, double.output
    assert _out_lines(double.stdout) == _out_lines(single.stdout)
    assert len(_out_lines(single.stdout)) == len(LINES) + 1


# ------------------------------------------------------------------------------------ odd input


def test_emoji_cjk_and_control_characters_give_one_line_each(e2e, tmp_path: Path) -> None:
    lines = [
        "one 🙂 two 中文 three",
        "red\x01\x1b[31m king\x0bqueen\x0c house",
        "fire\u2028water\u2029earth\x85day",
        "\x01\x02\x7f",
        "\ufeffnine\u200b ten\r",
        "old\rking",
        "ß Ω ع עברית 🏳️‍🌈",
    ]
    src = tmp_path / "in.txt"
    src.write_bytes("".join(x + "\n" for x in lines).encode("utf-8"))
    result = _decode(e2e.last, "-i", str(src))
    assert result.exit_code == 0, result.output
    got = _out_lines(result.stdout)
    assert len(got) == len(lines)
    assert got[3] == "", "a line of control characters only is an empty line"
    piped = _sub(e2e, input=src.read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert _out_lines(piped.stdout.decode("utf-8")) == got


def test_over_long_line_is_truncated_with_a_warning(e2e, tmp_path: Path) -> None:
    long_line = " ".join(WORDS[i % len(WORDS)] for i in range(2000))
    src = _write(tmp_path / "in.txt", ["one two", long_line, "nine"])
    result = _decode(e2e.last, "-i", str(src), "--beam", "1")  # default max_len_a/b: capped by max_positions
    assert result.exit_code == 0, result.output
    got = _out_lines(result.stdout)
    assert len(got) == 3 and got[1] != ""
    assert "truncated" in result.stderr and "line 2" in result.stderr


def test_non_utf8_input_is_an_error_naming_file_and_line(e2e, tmp_path: Path) -> None:
    src = tmp_path / "latin1.txt"
    src.write_bytes("one two\nred king\n".encode() + "años niño\n".encode("latin-1") + b"nine\n")
    out = tmp_path / "out.txt"
    result = _decode(e2e.last, "-i", str(src), "-o", str(out))
    assert result.exit_code == 2
    assert f"{src}:3" in result.stderr and result.stderr.startswith("error: ")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt"]
    replaced = _decode(e2e.last, "-i", str(src), "-o", str(out), "--encoding-errors", "replace")
    assert replaced.exit_code == 0, replaced.output
    assert len(_out_lines(out.read_text(encoding="utf-8"))) == 4
    assert "replaced" in replaced.stderr


@pytest.mark.parametrize("kind", ["missing", "directory", "text"])
def test_unusable_checkpoint_is_a_one_line_error(tmp_path: Path, kind: str) -> None:
    ckpt = tmp_path / "model.pt"
    if kind == "directory":
        ckpt.mkdir()
    elif kind == "text":
        ckpt.write_text("not a model\n")
    src = _write(tmp_path / "in.txt", ["one two"])
    result = _decode(ckpt, "-i", str(src), "-o", str(tmp_path / "out.txt"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {ckpt}") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out.txt").exists()


def test_output_file_mode_follows_umask(e2e, tmp_path: Path) -> None:
    src = _write(tmp_path / "in.txt", ["one two"])
    out = tmp_path / "out.txt"
    old = os.umask(0o022)
    try:
        result = _decode(e2e.last, "-i", str(src), "-o", str(out))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o644  # what `> out.txt` or open(out, "w") would give


# ------------------------------------------------------------------------------------ property


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=20).map(lambda s: s.replace("\n", "").replace("\r", "")),
            st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join),
            st.just(""),
        ),
        max_size=6,
    )
)
def test_translate_window_gives_one_result_per_input_in_order(translator, lines: list[str]) -> None:
    opts = translator.options()
    together = translator.translate_window(lines, opts.model_copy(update={"batch_tokens": 64}))
    assert len(together) == len(lines)
    for line, hyps in zip(lines, together):
        if not clean_line(line):
            assert hyps == []
            continue
        assert hyps and all(isinstance(t, int) for t in hyps[0].tokens)
        alone = translator.translate_window([line], opts.model_copy(update={"batch_tokens": 4096}))[0]
        assert hyps[0].tokens == alone[0].tokens


# ------------------------------------------------------------------------------------ stdin and pipes


def test_stdin_pipe(e2e, translator) -> None:
    script = f"printf 'one two three\\n\\nold king\\n' | {' '.join(e2e.cli())} decode '{e2e.last}' --threads 1"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=e2e.env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _out_lines(proc.stdout) == _expected(translator, ["one two three", "", "old king"])


@pytest.mark.slow
def test_quick_exit_keeps_the_output_whole_and_the_exit_status(e2e, translator, tmp_path: Path) -> None:
    """`main` leaves through os._exit (no interpreter teardown): stdout to a pipe, block-buffered
    (no PYTHONUNBUFFERED), must still arrive whole, and a user error must still exit 2."""
    env = {k: v for k, v in e2e.env().items() if k != "PYTHONUNBUFFERED"}
    lines = [f"{w} {v}" for w in WORDS[:12] for v in WORDS[:25]]  # 300 lines, ~4 KiB of output or more
    proc = subprocess.run(
        [*e2e.cli(), "decode", str(e2e.last), "--threads", "1", "--beam", "1"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = _out_lines(proc.stdout)
    assert len(got) == len(lines)
    opts = translator.options(beam=1)
    for line, out in zip(lines[-3:], got[-3:]):
        assert out == translator.detok(translator.translate_window([line], opts)[0][0])
    bad = subprocess.run(
        [*e2e.cli(), "decode", str(tmp_path / "missing.pt")],
        input="x\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer line within {timeout}s (got {buf!r})")
        if select.select([fd], [], [], left)[0]:
            byte = os.read(fd, 1)
            if not byte:
                raise EOFError(f"stdout closed (got {buf!r}); stderr: {proc.stderr.read()[-2000:]!r}")
            buf += byte
    return buf.decode("utf-8").rstrip("\n")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_interactive_stdin_gets_each_answer_before_stdin_closes(e2e, translator, stream: bool) -> None:
    cmd = [*e2e.cli(), "decode", str(e2e.last), "--threads", "1"] + (["--stream"] if stream else [])
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e2e.env(), bufsize=0
    )
    try:
        expected = _expected(translator, ["one two three", "water fire earth"])
        proc.stdin.write(b"one two three\n")
        assert _read_line(proc, 60) == expected[0]
        proc.stdin.write(b"water fire earth\n")
        assert _read_line(proc, 20) == expected[1]
        proc.stdin.close()
        assert proc.wait(timeout=20) == 0
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broken_pipe_exits_quietly(e2e, tmp_path: Path) -> None:
    err, rc = tmp_path / "err.txt", tmp_path / "rc.txt"
    script = (
        f"set +o pipefail; yes 'one two three' | head -n 400 | {' '.join(e2e.cli())} "
        f"decode '{e2e.last}' --threads 1 --stream --beam 1 2>'{err}' | head -n 1; "
        f"echo ${{PIPESTATUS[2]}} > '{rc}'"
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=e2e.env(), timeout=90)
    assert proc.returncode == 0
    assert len(_out_lines(proc.stdout)) == 1
    stderr = err.read_text()
    for noise in ("BrokenPipe", "Traceback", "Exception ignored"):
        assert noise not in stderr, stderr
    assert rc.read_text().strip() == "0", stderr


@pytest.mark.slow
def test_sigint_during_decode_leaves_no_output_file(e2e, tmp_path: Path) -> None:
    lines = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(25)) for i in range(30000)]  # minutes of work
    src = _write(tmp_path / "in.txt", lines)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.txt"
    cmd = [*e2e.cli(), "decode", str(e2e.last), "--threads", "1", "-i", str(src), "-o", str(out), "--beam", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e2e.env(), text=True)
    deadline = time.monotonic() + 60
    while not list(out_dir.iterdir()):  # the temporary output exists once decoding has started
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "decode did not start"
        time.sleep(0.02)
    time.sleep(0.5)
    assert proc.poll() is None, "decode finished before it could be interrupted"
    stderr = interrupt_and_wait(proc, 30, "decode")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert list(out_dir.iterdir()) == [], "a partial output file was left behind"


# ------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_decoding_stays_close_to_fp32(e2e, translator, tmp_path: Path, precision: str) -> None:
    """The bf16/int8 model's next-token distribution stays close to fp32's, and decoding through
    the CLI still gives one line per input line."""
    import torch

    low = Translator([e2e.last], "cpu", threads=1, options={"precision": precision})
    if precision == "int8":
        assert any("quantized" in type(m).__module__ for m in low.model.modules())
    ids = [translator.encode(clean_line(x), 1) for x in LINES[:3]]
    width = max(map(len, ids))
    src = torch.tensor([x + [translator.tokenizer.pad_id] * (width - len(x)) for x in ids])
    tokens = torch.tensor([translator.tokenizer.bos_id] * 3)
    with torch.inference_mode():
        ref_state, low_state = translator.model.start(src), None
        for _ in range(4):  # a few steps, so the cached keys/values are read back too
            lp_ref, _ = translator.model.step(tokens, ref_state)
            with low.autocast():
                low_state = low_state or low.model.start(src)
                lp_low, _ = low.model.step(tokens, low_state)
            assert (lp_low.exp() - lp_ref.exp()).abs().sum(-1).max().item() < 0.1  # total variation < 0.05
            tokens = lp_ref.argmax(-1)
    stored = torch.bfloat16 if precision == "bf16" or native_bf16() else torch.float32
    assert {t.dtype for kv in low_state.cross_kv + low_state.self_kv for t in kv} == {stored}
    out = _decode(e2e.last, "--precision", precision, "-i", str(_write(tmp_path / "in.txt", LINES)))
    assert out.exit_code == 0 and len(_out_lines(out.stdout)) == len(LINES)


def test_unknown_precision_is_a_one_line_error(e2e, tmp_path: Path) -> None:
    out = _decode(e2e.last, "--precision", "fp8", "-i", str(_write(tmp_path / "in.txt", ["one two"])))
    assert out.exit_code == 2
    expected = "--precision: Input should be 'auto', 'fp32', 'bf16-matmul', 'bf16', 'fp16' or 'int8' (got 'fp8')"
    assert expected in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------ batch invariance


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_each_line_alone_equals_the_line_in_a_mixed_batch(e2e, precision: str) -> None:
    """The precisions `auto` decodes with (fp32; bf16-matmul where bf16 is native and its products
    are row-invariant for the model's shapes, else fp32) are batch-invariant: a line's translation
    does not depend on the other lines of its batch (lengths, padding, beam rows of other
    sentences). bf16 is not (the fused attention kernel and lone-row products leave last-bit
    differences that its roundings make visible), nor is int8 (next test). test_search checks
    bf16-matmul bitwise on the default recipe's widths."""
    tr = Translator([e2e.last], "cpu", threads=1, options={"precision": precision, "workers": 1, "beam": 3})
    lines = LINES + [" ".join(WORDS[i : i + 1 + i % 9]) for i in range(0, 24, 3)]
    mixed = tr.translate_window(lines, tr.options(batch_tokens=100000))  # one batch with every line
    assert len({len(x.split()) for x in lines}) > 4  # really mixed lengths
    for line, together in zip(lines, mixed):
        alone = tr.translate_window([line])[0]
        assert [h.tokens for h in alone] == [h.tokens for h in together], line
        assert alone[0].score == pytest.approx(together[0].score, abs=1e-5)


@pytest.mark.parametrize("asked,expected", [("auto", "fp32"), ("bf16-matmul", "bf16-matmul")])
def test_bf16_matmul_is_checked_for_the_model_and_auto_falls_back(e2e, monkeypatch, caplog, asked, expected) -> None:
    """Where the probe finds a bf16 product that depends on the other rows (a shape oneDNN computes
    differently), `auto` decodes in fp32 instead, with one warning; an explicit bf16-matmul runs as
    asked, with a warning that it is not batch-invariant here."""
    import logging

    import seq2seq_cli.translate as translate_module

    monkeypatch.setattr(translate_module, "resolve_precision", lambda *a, **k: "bf16-matmul")
    monkeypatch.setattr(
        translate_module,
        "plan_bf16_matmul",
        lambda model, beam: translate_module.Bf16Plan(problem="a 64 -> 32 product differs"),
    )
    with caplog.at_level(logging.WARNING, logger="seq2seq_cli.translate"):
        tr = Translator([e2e.last], "cpu", threads=1, options={"precision": asked, "workers": 1})
    assert tr.precision == expected
    assert [r.getMessage() for r in caplog.records if "64 -> 32" in r.getMessage()]


def test_bf16_plan_finds_a_row_dependent_shape_and_picks_bf16_layers_per_shape() -> None:
    """The plan itself, on a CPU with AMX bf16 (measured there): at the default recipe's widths the
    256-input layers run as bf16 layers, the 1024 -> 256 one too but with its products of 33-255
    rows padded to 256 (in that range it sums in another order than for fewer or more rows), the
    output layer always fp32; a 64 -> 40 output layer fails (a row's bits depend on its neighbours)."""
    import torch

    from seq2seq_cli.model import build_model
    from seq2seq_cli.recipe import ModelConfig
    from seq2seq_cli.translate import plan_bf16_matmul, set_precision

    if not (native_bf16() and torch.cpu._is_amx_tile_supported()):
        pytest.skip("measured on AMX; other bf16 CPUs may differ either way")
    small = ModelConfig(d_model=64, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, ff_dim=128, dropout=0.0)
    assert "a 64 -> 40 product depends on the other rows" in (
        plan_bf16_matmul(build_model(small, 40, 40, 0, 2, 3)).problem or ""
    )
    wide = ModelConfig(d_model=256, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, ff_dim=1024, dropout=0.0)
    model = build_model(wide, 8000, 8000, 0, 2, 3)
    plan = plan_bf16_matmul(model)
    assert plan.problem is None
    assert plan.bf16_layers == {(256, 256, True): 0, (256, 512, True): 0, (256, 1024, True): 0, (1024, 256, True): 256}
    set_precision(model, "bf16-matmul", torch.device("cpu"), plan.bf16_layers)
    layer = model.decoder[0]
    assert layer.ffn.fc1.weight.dtype == layer.ffn.fc2.weight.dtype == torch.bfloat16
    assert (layer.ffn.fc1.row_floor, layer.ffn.fc2.row_floor) == (0, 256)
    assert model.output.weight.dtype == torch.float32


def test_int8_quantises_activations_per_batch_so_auto_never_picks_it() -> None:
    """Dynamic int8 takes one activation scale per tensor (the batch's largest magnitude): the same
    row gives a different result beside a large-magnitude row. Hence int8 is not batch-invariant
    and `precision: auto` never chooses it."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(0)
    layer = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(64, 64)), {torch.nn.Linear}, dtype=torch.qint8)
    row = torch.randn(1, 64)
    rows, large = row.repeat(4, 1), 50 * torch.randn(4, 64)
    with torch.no_grad():
        change = (layer(rows) - layer(torch.cat([rows, large]))[:4]).abs().max().item()
        fp32 = torch.nn.Linear(64, 64)
        fp32_change = (fp32(rows) - fp32(torch.cat([rows, large]))[:4]).abs().max().item()
    assert change > 0.1 and fp32_change < 1e-5  # int8's rounding grid moved with the batch; fp32's did not
