"""Fine-tuning: train.init_from, train.freeze, data.replay, and the all-zero-budget recipe error.

The parent is the session's small trained run (the `e2e` fixture in conftest.py); fine-tuning runs
are a few updates on the same small recipe, in their own output directories.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from seq2seq_cli.checkpoint import load_checkpoint
from seq2seq_cli.cli import app
from seq2seq_cli.pipeline import run_pipeline, run_train
from seq2seq_cli.prepare import prepare
from seq2seq_cli.recipe import RecipeError, check_data_files, load_recipe, recipe_from_dict
from seq2seq_cli.tokenizer import Tokenizer
from seq2seq_cli.train import Trainer, load_corpora

runner = CliRunner()
QUIET = dict(train__valid_every=1000, train__log_every=1)


def _records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _finetune(e2e, out: Path, parent: Path, **extra) -> dict:
    """run_train on the small recipe with train.init_from = parent (no tokenizer is copied)."""
    result = run_train(e2e.load(out, train__init_from=parent, **extra), progress=False)
    torch.set_num_threads(1)
    return result


# ------------------------------------------------------------------------------ init_from


def test_init_from_takes_parent_weights_shape_and_tokenizer(e2e, tmp_path: Path) -> None:
    """Before the first update the model is exactly the parent's; the shape comes from the parent when
    the recipe gives no model/tokenizer section; optimizer, schedule and step start fresh."""
    parent = load_checkpoint(e2e.last)
    tree = e2e.load(tmp_path / "ft", train__init_from=e2e.last, train__max_steps=2, **QUIET).model_dump(mode="json")
    del tree["model"], tree["tokenizer"]  # -> defaults (d_model 512, vocab 8000) unless taken from the parent
    recipe = recipe_from_dict(tree, "ft")
    assert recipe.model.d_model != parent.recipe.model.d_model
    trainer = Trainer(recipe, progress=False)
    torch.set_num_threads(1)
    assert trainer.recipe.model == parent.recipe.model and trainer.recipe.tokenizer == parent.recipe.tokenizer
    state = trainer.model.state_dict()
    assert state.keys() == parent.weights.keys()
    for k, v in parent.weights.items():
        assert torch.equal(state[k], v), k
    assert trainer.pos.step == 0 and trainer.optimizer.state_dict()["state"] == {}
    assert trainer.scheduler.last_epoch == 0
    assert Tokenizer.load(tmp_path / "ft" / "tokenizer").to_state() == dict(parent.tokenizer)
    # the run then trains from there and stores the parent's tokenizer and shape in its checkpoints
    result = trainer.run()
    torch.set_num_threads(1)
    assert result.step == 2
    ckpt = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt")
    assert ckpt.tokenizer == parent.tokenizer and ckpt.recipe.model == parent.recipe.model
    assert any(not torch.equal(ckpt.weights[k], v) for k, v in parent.weights.items() if v.is_floating_point())


def test_coverage_is_reported(e2e, tmp_path: Path) -> None:
    """The parent tokenizer's unknown-piece rate and pieces per sentence on the new training text:
    in the return value and in a metrics.jsonl record; unknown characters raise the rate above 0."""
    data = tmp_path / "new"
    data.mkdir()
    (data / "t.en").write_text("one two\nred ωψ blue\n", encoding="utf-8")
    (data / "t.es").write_text("uno dos\nrojo ωψ azul\n", encoding="utf-8")
    new = {"data__train__src": data / "t.en", "data__train__tgt": data / "t.es"}
    result = _finetune(e2e, tmp_path / "ft", e2e.last, train__max_steps=1, **new, **QUIET)
    cov = result["coverage"]
    tok = Tokenizer.from_state(dict(load_checkpoint(e2e.last).tokenizer))
    src = [tok.encode_src(x) for x in ("one two", "red ωψ blue")]
    assert cov["src_unk_rate"] == pytest.approx(sum(s.count(1) for s in src) / sum(map(len, src)), abs=1e-6)
    assert cov["src_unk_rate"] > 0 and cov["tgt_unk_rate"] > 0
    assert cov["src_pieces_per_sentence"] == pytest.approx(sum(map(len, src)) / 2, abs=0.01)
    [record] = _records(tmp_path / "ft", "data")
    assert record["coverage"] == cov and record["init_from"] == str(e2e.last)
    # on the parent's own training text nothing is unknown
    same = _finetune(e2e, tmp_path / "ft2", e2e.last, train__max_steps=1, **QUIET)["coverage"]
    assert same["src_unk_rate"] == same["tgt_unk_rate"] == 0.0


@pytest.mark.parametrize(
    "override, key, theirs, mine",
    [
        ("model.d_model=64", "model.d_model", "32", "64"),
        ("model.n_encoder_layers=3", "model.n_encoder_layers", "2", "3"),
        ("tokenizer.vocab_size=200", "tokenizer.vocab_size", "100", "200"),
    ],
)
def test_contradicting_the_parent_is_a_one_line_error(
    e2e, tmp_path: Path, override: str, key: str, theirs: str, mine: str
) -> None:
    args = [
        "train",
        str(e2e.recipe),
        *e2e.set_args(tmp_path / "ft", train__init_from=e2e.last),
        "--set",
        override,
        "--no-progress",
    ]
    result = runner.invoke(app, args)
    torch.set_num_threads(1)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: train.init_from: parent has {key} {theirs}, this recipe says {mine}")
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_dropout_may_differ_from_the_parent(e2e, tmp_path: Path) -> None:
    recipe = e2e.load(tmp_path / "ft", train__init_from=e2e.last, model__dropout=0.3)
    trainer = Trainer(recipe, progress=False)
    torch.set_num_threads(1)
    assert trainer.recipe.model.dropout == 0.3 and trainer.model.drop.p == 0.3


@pytest.mark.parametrize("content, words", [(None, "checkpoint not found"), (b"not a checkpoint", "not a readable")])
def test_missing_or_corrupt_parent_is_a_one_line_error(e2e, tmp_path: Path, content, words: str) -> None:
    parent = tmp_path / "parent.pt"
    if content is not None:
        parent.write_bytes(content)
    args = ["train", str(e2e.recipe), *e2e.set_args(tmp_path / "ft", train__init_from=parent), "--no-progress"]
    result = runner.invoke(app, args)
    torch.set_num_threads(1)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: train.init_from: {parent}: ") and words in lines[0]


def test_run_skips_the_tokenizer_stage(e2e, tmp_path: Path, monkeypatch) -> None:
    """`translate run` trains no tokenizer: the parent's is written into the run's tokenizer/ dir."""
    import seq2seq_cli.pipeline as pipeline

    def no_training(*_args, **_kwargs):
        raise AssertionError("the tokenizer must not be trained when fine-tuning")

    monkeypatch.setattr(pipeline, "train_tokenizer", no_training)
    recipe = e2e.load(tmp_path / "ft", train__init_from=e2e.last, train__max_steps=2, **QUIET)
    results = run_pipeline(recipe, progress=False)
    torch.set_num_threads(1)
    assert results["tokenizer"].startswith("skipped") and results["train"]["step"] == 2
    assert results["train"]["coverage"]["src_pieces_per_sentence"] > 0
    assert "bleu" in {k.lower() for k in results["score"]}
    parent_tok = dict(load_checkpoint(e2e.last).tokenizer)
    assert (tmp_path / "ft" / "tokenizer" / "spm.model").read_bytes() == parent_tok["src"]
    assert load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt").tokenizer == parent_tok
    again = run_pipeline(recipe, progress=False)
    assert again["train"] == "skipped" and again["tokenizer"].startswith("skipped")
    with pytest.raises(RecipeError, match="train.init_from"):
        pipeline.run_tokenizer(recipe)


def test_finetuning_resumes_exactly_from_its_own_last_checkpoint(e2e, tmp_path: Path) -> None:
    """N steps + resume to N+M == N+M straight; the resumed run reads its last.pt, not init_from
    (the parent file is deleted before resuming)."""
    n, m = 3, 4
    parent = tmp_path / "parent.pt"
    shutil.copyfile(e2e.last, parent)
    common = dict(model__dropout=0.1, **QUIET)
    assert _finetune(e2e, tmp_path / "a", parent, train__max_steps=n, **common)["step"] == n
    parent.unlink()
    resumed = _finetune(e2e, tmp_path / "a", parent, train__max_steps=n + m, **common)
    straight = _finetune(e2e, tmp_path / "b", e2e.last, train__max_steps=n + m, **common)
    assert resumed["step"] == straight["step"] == n + m
    assert [r["step"] for r in _records(tmp_path / "a", "train")] == list(range(1, n + m + 1))
    losses_a = [r["loss"] for r in _records(tmp_path / "a", "train")]
    losses_b = [r["loss"] for r in _records(tmp_path / "b", "train")]
    assert losses_a == pytest.approx(losses_b, rel=0, abs=1e-6)
    assert len(_records(tmp_path / "a", "data")) == 1  # the init record is written once, not on resume
    pa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt").weights
    pb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt").weights
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6, msg=k)
    first = load_checkpoint(tmp_path / "a" / "checkpoints" / f"step-{n}.pt")
    assert first.training is not None and first.training.position["step"] == n
    assert any(not torch.equal(first.weights[k], pa[k]) for k in pa if pa[k].is_floating_point())


# ------------------------------------------------------------------------------ freeze


def test_freeze_keeps_frozen_weights(e2e, tmp_path: Path) -> None:
    """freeze [embeddings, encoder]: those weights (and the tied output layer) stay the parent's;
    the decoder trains."""
    parent = load_checkpoint(e2e.last).weights
    _finetune(e2e, tmp_path / "ft", e2e.last, train__max_steps=3, train__freeze="[embeddings,encoder]", **QUIET)
    after = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.pt").weights
    frozen = [k for k in parent if k.split(".")[0] in ("src_embed", "tgt_embed", "output", "encoder", "enc_norm")]
    trained = [k for k in parent if k.startswith("decoder.") and parent[k].is_floating_point()]
    assert "output.weight" in frozen and any(k.startswith("encoder.") for k in frozen) and trained
    for k in frozen:
        assert torch.equal(after[k], parent[k]), k
    assert all(not torch.equal(after[k], parent[k]) for k in trained if k.endswith("weight"))


def test_freezing_everything_is_a_recipe_error(e2e, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="train.freeze: .* nothing to train"):
        e2e.load(tmp_path, train__freeze="[embeddings,encoder,decoder]")


# ------------------------------------------------------------------------------ replay


def test_replay_is_counted_and_logged(e2e, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    src = [f"{a} {b}" for a in ("one", "two", "three", "four") for b in ("red", "blue", "green", "black", "white")]
    tgt = [
        " ".join(
            {
                "one": "uno",
                "two": "dos",
                "three": "tres",
                "four": "cuatro",
                "red": "rojo",
                "blue": "azul",
                "green": "verde",
                "black": "negro",
                "white": "blanco",
            }[w]
            for w in x.split()
        )
        for x in src
    ]
    (pool / "p.en").write_text("\n".join(src * 10) + "\n", encoding="utf-8")
    (pool / "p.es").write_text("\n".join(tgt * 10) + "\n", encoding="utf-8")
    extra = dict(
        data__replay=f"{{src: {pool / 'p.en'}, tgt: {pool / 'p.es'}, ratio: 0.2}}",
        data__train__max_lines=600,
        train__max_steps=1,
        **QUIET,
    )
    recipe = e2e.load(tmp_path / "ft", train__init_from=e2e.last, **extra)
    tok = Tokenizer.from_state(dict(load_checkpoint(e2e.last).tokenizer))
    prepare(recipe, workers=1, progress=False, tok=tok)
    corpora = load_corpora(recipe, tok, report=False)
    assert corpora.replay == {"in_domain_pairs": 600, "replay_pairs": 150, "replay_pool": 200, "replay_fraction": 0.2}
    assert len(corpora.train) == 800  # 600 in-domain pairs + the pool of 200
    epochs = [corpora.train.epoch_ids(recipe.seed, e) for e in (0, 1)]
    for ids in epochs:  # each epoch: all 600 in-domain pairs once, 150 distinct replayed pairs
        assert len(ids) == 750 and sorted(ids[:600].tolist()) == list(range(600))
        assert len(set(ids[600:].tolist())) == 150 and ids[600:].min() >= 600
        src_rows, _ = corpora.train.rows(ids[600:605])
        assert [tok.decode_src(r[:-1]) for r in src_rows] == [src[(i - 600) % 20] for i in ids[600:605].tolist()]
    assert epochs[0][600:].tolist() != epochs[1][600:].tolist()  # a fresh sample each epoch
    result = _finetune(e2e, tmp_path / "ft", e2e.last, **extra)
    assert result["replay"] == corpora.replay
    [record] = _records(tmp_path / "ft", "data")
    assert record["replay"] == corpora.replay


def test_all_zero_budgets_are_a_recipe_error(tmp_path: Path) -> None:
    tree = {
        "output_dir": "o",
        "data": {"train": {"src": "a", "tgt": "b"}},
        "train": {"max_steps": 0, "max_epochs": 0, "max_time": 0},
    }
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(tree, "r.yaml")
    assert str(info.value) == (
        "r.yaml: (top level): train.max_steps, train.max_epochs and train.max_time are all "
        "0: training would never stop; set at least one of them"
    )
    for key, value in (("max_steps", 5), ("max_epochs", 1), ("max_time", 0.5)):
        assert recipe_from_dict({**tree, "train": {key: value}}, "r.yaml").train.model_dump()[key] == value
    assert recipe_from_dict(tree, "stored", stored=True).train.max_steps == 0  # old checkpoints stay readable
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    result = runner.invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 2 and "train.max_steps, train.max_epochs and train.max_time" in result.stderr


def test_missing_replay_file_is_listed(tmp_path: Path) -> None:
    for name in ("a", "b", "old.en"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    tree = {
        "output_dir": "o",
        "train": {"max_steps": 1},
        "data": {"train": {"src": "a", "tgt": "b"}, "replay": {"src": "old.en", "tgt": "old.es"}},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        check_data_files(load_recipe(path))
    assert str(info.value) == f"{tmp_path / 'old.es'}: file not found (data.replay.tgt)"
