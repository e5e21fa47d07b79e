"""Issue 18 pictures: `translate attention` (terminal + PNG) and `translate plot` (learning curves)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seq2seq_cli.cli import app

PNG = b"\x89PNG\r\n\x1a\n"


def _metrics(path: Path, scale: float) -> Path:
    path.mkdir(parents=True)
    rows = [
        {"type": "train", "step": s, "minutes": s / 100, "loss": scale * 8 / (1 + s / 100)} for s in range(50, 501, 50)
    ]
    rows += [
        {
            "type": "valid",
            "step": s,
            "minutes": s / 100 + 0.1,
            "dev_nll": scale * 6 / (1 + s / 100),
            "bleu": 20 * s / 500 / scale,
        }
        for s in (100, 300, 500)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plot_draws_several_runs(tmp_path):
    runs = [_metrics(tmp_path / "a", 1.0), _metrics(tmp_path / "b", 1.3)]
    out = tmp_path / "curves.png"
    res = CliRunner().invoke(app, ["plot", *map(str, runs), str(runs[0] / "metrics.jsonl"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert [r["run"] for r in summary["runs"]] == ["a", "b", "a"] and summary["runs"][0]["last_step"] == 500
    assert summary["runs"][0]["best_bleu"] == pytest.approx(20.0)
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 20_000


def test_plot_errors_are_one_line(tmp_path, monkeypatch):
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "no metrics.jsonl" in res.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    res = CliRunner().invoke(app, ["plot", str(_metrics(tmp_path / "a", 1.0)), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2
    assert res.stderr.strip() == 'error: drawing pictures needs matplotlib: pip install -e ".[plot]"'


def test_attention_terminal_and_png(e2e, tmp_path):
    out = tmp_path / "attn.png"
    res = CliRunner().invoke(app, ["attention", str(e2e.best), "one two three red", "-o", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    rows = [x for x in lines if x.rstrip().endswith("|") and "+--" not in x]
    assert rows and all(x.count("|") == 2 for x in rows)
    source_pieces = lines[-2].split()  # "0:▁one 1:▁two ... N:</s>"
    assert source_pieces[-1].endswith("</s>")
    assert all(len(r.split("|")[1]) == 3 * len(source_pieces) for r in rows)
    assert out.read_bytes()[:8] == PNG
    res = CliRunner().invoke(app, ["attention", str(e2e.best), "one two", "--layer", "-1", "--head", "0"])
    assert res.exit_code == 0 and "layer -1, head 0" in res.stdout
    res = CliRunner().invoke(app, ["attention", str(e2e.best), "one two", "--layer", "7"])
    assert res.exit_code == 2 and "layer 7 does not exist" in res.stderr
