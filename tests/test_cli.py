"""End-to-end tests of the `translate` command line (Typer CliRunner, subprocesses where the real
process matters: exit codes, stderr without tracebacks, `python -m`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import sacrebleu
import yaml
from typer.testing import CliRunner

from seq2seq_cli.cli import app

COMMANDS = ["tokenizer", "prepare", "train", "decode", "score", "run", "recipe", "average"]
runner = CliRunner()


def _sub(e2e, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*e2e.cli(), *args], input=input, capture_output=True, text=True, env=e2e.env(), timeout=timeout
    )


def _flat(text: str) -> str:
    """Rich wraps long log lines; join them back (drop box/wrap whitespace)."""
    return re.sub(r"\s+", " ", text)


# ------------------------------------------------------------------------------------ help


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = re.findall(r"^│ (\w+)\s", result.stdout, flags=re.M)
    assert set(COMMANDS) <= set(listed), listed


@pytest.mark.parametrize(
    "command",
    [["tokenizer"], ["train"], ["decode"], ["score"], ["run"], ["average"], ["recipe", "show"]],
    ids=lambda c: " ".join(c),
)
def test_each_command_help_has_an_example(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout
    assert re.search(r"translate " + re.escape(command[0]), result.stdout), "the example shows the command"


def test_python_dash_m_works_like_the_console_script(e2e) -> None:
    via_module = _sub(e2e, "--help")
    via_script = subprocess.run(["translate", "--help"], capture_output=True, text=True, env=e2e.env(), timeout=60)
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stderr == ""
    norm = via_module.stdout.replace("python -m seq2seq_cli", "translate")
    assert _flat(norm) == _flat(via_script.stdout)
    for name in COMMANDS:
        assert re.search(rf"│ {name}\s", via_module.stdout)


# ------------------------------------------------------------------------------------ recipes


def test_recipe_show_prints_the_resolved_recipe_with_defaults(e2e) -> None:
    result = runner.invoke(app, ["recipe", "show", str(e2e.recipe), "--set", "train.max_steps=10"])
    assert result.exit_code == 0, result.output
    tree = yaml.safe_load(result.stdout)
    assert tree["train"]["max_steps"] == 10  # the override
    assert tree["model"]["d_model"] == 64 and tree["tokenizer"]["vocab_size"] == 600  # from the file
    assert tree["train"]["optimizer"] == "adam" and tree["decode"]["n_best"] == 1  # defaults, not in the file
    assert tree["model"]["norm"] == "post" and tree["train"]["accum_steps"] == 1
    assert set(tree) == {"output_dir", "seed", "data", "tokenizer", "model", "train", "decode"}
    train_src = Path(tree["data"]["train"]["src"])
    assert train_src.is_absolute() and train_src.is_file()  # paths resolved relative to the recipe
    assert Path(tree["output_dir"]) == (e2e.recipe.parent / "../runs/tiny").resolve()


@pytest.mark.parametrize("case", ["override", "file"])
def test_misspelled_key_exits_2_naming_it_with_a_suggestion(e2e, tmp_path: Path, case: str) -> None:
    if case == "override":
        proc = _sub(e2e, "recipe", "show", str(e2e.recipe), "--set", "train.max_step=10")
        bad, good = "train.max_step", "max_steps"
    else:
        text = e2e.recipe.read_text(encoding="utf-8").replace("  d_model: 64", "  d_modle: 64")
        assert "d_modle" in text
        recipe = tmp_path / "typo.yaml"
        recipe.write_text(text.replace("../", str(e2e.recipe.parent.parent) + "/"), encoding="utf-8")
        proc = _sub(e2e, "train", str(recipe), "--set", f"output_dir={tmp_path / 'out'}")
        bad, good = "model.d_modle", "d_model"
    assert proc.returncode == 2, proc.stderr
    assert bad in proc.stderr and f"did you mean '{good}'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith("error: ")
    if case == "file":
        assert not (tmp_path / "out").exists()


def test_missing_recipe_file_exits_2(e2e, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = _sub(e2e, "run", str(missing))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ translate run


def test_run_completes_all_five_stages_and_prints_bleu_with_signature(e2e) -> None:
    assert e2e.run_exit_code == 0
    result = json.loads(e2e.run_stdout)
    assert list(result) == ["tokenizer", "prepare", "train", "decode", "score"]
    assert all(isinstance(v, dict) for v in result.values()), result
    assert result["train"]["step"] == 120
    assert result["decode"]["lines"] == 20
    bleu = result["score"]["BLEU"]
    assert 0.0 <= bleu["score"] <= 100.0 and bleu["signature"].startswith("nrefs:1|case:mixed")
    log = _flat(e2e.run_stderr)
    assert re.search(r"BLEU = \d+\.\d+ ", log), log[-2000:]
    assert "nrefs:1|case:mixed" in log
    hyp = (e2e.run_dir / "test.hyp").read_text(encoding="utf-8")
    assert hyp.count("\n") == 20
    assert json.loads((e2e.run_dir / "test.score.json").read_text())["BLEU"] == bleu


def test_second_run_skips_every_stage(e2e) -> None:
    hyp = e2e.run_dir / "test.hyp"
    mtimes = {p: p.stat().st_mtime_ns for p in (hyp, e2e.last, e2e.run_dir / "tokenizer" / "spm.model")}
    result = runner.invoke(app, ["run", str(e2e.recipe), *e2e.set_args(e2e.run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tokenizer"] == out["train"] == out["decode"] == "skipped"
    assert out["score"] == json.loads(e2e.run_stdout)["score"]  # reported from the stored scores
    assert len(re.findall(r"stage (\w+): inputs unchanged, skipped", result.stderr)) == 5
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_changing_decode_beam_reruns_only_decode_and_score(e2e, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(e2e.run_dir, copy)
    ckpt_mtime = (copy / "checkpoints" / "last.pt").stat().st_mtime_ns
    before = (copy / "test.hyp").stat().st_mtime_ns
    result = runner.invoke(
        app, ["run", str(e2e.recipe), *e2e.set_args(copy), "--set", "decode.beam=1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tokenizer"] == out["train"] == "skipped"
    assert isinstance(out["decode"], dict) and isinstance(out["score"], dict)
    assert out["decode"]["lines"] == 20
    assert (copy / "test.hyp").stat().st_mtime_ns != before
    assert (copy / "checkpoints" / "last.pt").stat().st_mtime_ns == ckpt_mtime
    again = runner.invoke(app, ["run", str(e2e.recipe), *e2e.set_args(copy), "--set", "decode.beam=1", "--no-progress"])
    assert set(json.loads(again.stdout)) == {"tokenizer", "prepare", "train", "decode", "score"}
    assert json.loads(again.stdout)["decode"] == "skipped"


def test_average_command_writes_a_decodable_mean_checkpoint(e2e, tmp_path: Path) -> None:
    import torch

    from seq2seq_cli.checkpoint import load_checkpoint, load_model

    steps = [e2e.run_dir / "checkpoints" / "step-60.pt", e2e.run_dir / "checkpoints" / "step-120.pt"]
    out = tmp_path / "avg.pt"
    result = runner.invoke(app, ["average", *map(str, steps), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    avg = load_checkpoint(out).weights
    a, b = (load_checkpoint(p).weights for p in steps)
    key = "tgt_embed.weight"
    assert not torch.equal(a[key], b[key])
    torch.testing.assert_close(avg[key], (a[key] + b[key]) / 2, rtol=0, atol=1e-6)
    load_model(load_checkpoint(out))
    bad = runner.invoke(app, ["average", str(steps[0]), str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and "missing.pt" in bad.stderr and not (tmp_path / "x.pt").exists()


# ------------------------------------------------------------------------------------ score

HYPS = ["the cat sat on the mat", "a dog barked at the moon", "it is raining today", "he reads a good book"]
REF1 = ["the cat sat on a mat", "the dog barked at the moon", "it rains today", "he is reading a book"]
REF2 = ["a cat was sitting on the mat", "a dog was barking at the moon", "today it is raining", "he reads a nice book"]


@pytest.fixture()
def score_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, lines in (
        ("hyp", HYPS),
        ("ref1", REF1),
        ("ref2", REF2),
        ("base", [h.upper() for h in HYPS]),
        ("short", REF1[:3]),
    ):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return files


@pytest.mark.parametrize("refs", [["ref1"], ["ref1", "ref2"]])
def test_score_matches_sacrebleu(score_files, refs: list[str]) -> None:
    ref_lines = [REF1, REF2][: len(refs)]
    ref_files = [str(score_files[r]) for r in refs]
    result = runner.invoke(app, ["score", str(score_files["hyp"]), *ref_files, "--json"])
    assert result.exit_code == 0, result.output
    scores = {s["name"]: s for s in json.loads(result.stdout)["scores"]}
    expected = {
        "BLEU": sacrebleu.corpus_bleu(HYPS, ref_lines),
        "chrF2": sacrebleu.corpus_chrf(HYPS, ref_lines),
        "TER": sacrebleu.corpus_ter(HYPS, ref_lines),
    }
    assert set(scores) == set(expected)
    for name, exp in expected.items():
        assert scores[name]["score"] == pytest.approx(exp.score, abs=1e-9), name
        assert scores[name]["signature"].startswith(f"nrefs:{len(refs)}|")
    assert scores["BLEU"]["signature"].startswith(f"nrefs:{len(refs)}|case:mixed")
    text = runner.invoke(app, ["score", str(score_files["hyp"]), *ref_files])
    assert text.exit_code == 0
    assert f"BLEU = {expected['BLEU'].score:.2f}" in text.stdout
    assert f"signature: nrefs:{len(refs)}|case:mixed" in text.stdout


def test_score_sentence_gives_one_row_per_line(score_files) -> None:
    result = runner.invoke(
        app, ["score", str(score_files["hyp"]), str(score_files["ref1"]), "--sentence", "--metrics", "bleu,chrf"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines.index("line\tbleu\tchrf")
    rows = lines[header + 1 :]
    assert [r.split("\t")[0] for r in rows] == ["1", "2", "3", "4"]
    expected = [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(HYPS, REF1)]
    assert [float(r.split("\t")[1]) for r in rows] == pytest.approx(expected, abs=0.006)
    as_json = json.loads(
        runner.invoke(app, ["score", str(score_files["hyp"]), str(score_files["ref1"]), "--sentence", "--json"]).stdout
    )
    assert {k: len(v) for k, v in as_json["sentences"].items()} == {"bleu": 4, "chrf": 4, "ter": 4}


def test_score_mismatched_line_counts_exit_2_with_one_line(score_files) -> None:
    result = runner.invoke(app, ["score", str(score_files["hyp"]), str(score_files["short"])])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("error: ")
    assert str(score_files["hyp"]) in message and str(score_files["short"]) in message
    assert "3" in message and "4" in message
    assert result.stdout == ""


def test_score_with_baseline_prints_a_p_value(score_files) -> None:
    result = runner.invoke(
        app,
        [
            "score",
            str(score_files["hyp"]),
            str(score_files["ref1"]),
            "--metrics",
            "bleu",
            "--baseline",
            str(score_files["base"]),
        ],
    )
    assert result.exit_code == 0, result.output
    pattern = r"bleu: baseline (\d+\.\d\d) -> system (\d+\.\d\d) .*p = (\d\.\d{4}): (not )?significant"
    match = re.search(pattern, result.stdout, flags=re.I)
    assert match, result.stdout
    assert float(match.group(2)) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REF1]).score, abs=0.006)
    assert 0.0 < float(match.group(3)) <= 1.0
