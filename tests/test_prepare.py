"""translate prepare: shards equal the in-memory encoding, filters, staleness, damage, weights, sampling."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from seq2seq_cli import prepare as prep
from seq2seq_cli.cli import app
from seq2seq_cli.data import DataError, encode_pairs, read_split, sample_pairs
from seq2seq_cli.prepare import corpus_dir, open_training_set, prepare
from seq2seq_cli.recipe import Recipe, Split, recipe_from_dict
from seq2seq_cli.shards import ShardError, StaleError
from seq2seq_cli.tokenizer import Tokenizer, train_tokenizer

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
BIBLE = REPO / "data" / "bible-en-es"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """400 Bible pairs with a blank pair, an exact duplicate, a very long pair and odd characters."""
    d = tmp_path_factory.mktemp("corpus")
    src = (BIBLE / "train.en").read_text(encoding="utf-8").splitlines()[:400]
    tgt = (BIBLE / "train.es").read_text(encoding="utf-8").splitlines()[:400]
    src[5], tgt[5] = "", "algo"  # blank on one side: skipped as a pair
    src[9], tgt[9] = src[3], tgt[3]  # exact duplicate of pair 3
    src[12], tgt[12] = " ".join(["word"] * 300), "palabra"  # too long, and beyond any length ratio
    src[20] = "\ufeffzero\u200bwidth\tand tab "  # cleaned like every other reader
    (d / "a.en").write_text("\n".join(src) + "\n", encoding="utf-8")
    (d / "a.es").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tok(corpus: Path, tmp_path_factory) -> Tokenizer:
    from seq2seq_cli.recipe import TokenizerConfig

    text = read_split(Split(src=corpus / "a.en", tgt=corpus / "a.es"))
    return train_tokenizer(
        TokenizerConfig(vocab_size=300), text.src, text.tgt, tmp_path_factory.mktemp("tok"), num_threads=1
    )


def make_recipe(out: Path, train: dict, **data) -> Recipe:
    tree = {
        "output_dir": str(out),
        "data": {"train": train, "max_len": 512, **data},
        "tokenizer": {"vocab_size": 300},
        "model": {"d_model": 32, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 1, "ff_dim": 64},
        "train": {"max_steps": 2},
    }
    return recipe_from_dict(tree, "test")


def shard_pairs(recipe: Recipe, tok: Tokenizer, name: str = "train") -> tuple[list[list[int]], list[list[int]]]:
    train, _ = open_training_set(recipe, tok)
    corpus = next(c for c in train.corpora if c.name == name)
    idx = np.arange(len(corpus))
    return [r.tolist() for r in corpus.rows("src", idx)], [r.tolist() for r in corpus.rows("tgt", idx)]


# ------------------------------------------------------------------------------ content


@pytest.mark.parametrize("layout", ["plain", "gz", "tsv"])
def test_shards_equal_the_in_memory_encoding(corpus: Path, tok: Tokenizer, tmp_path: Path, layout: str) -> None:
    """Whatever the file layout and the number of workers, the rows are what read_split + encode_pairs give."""
    split = {"src": str(corpus / "a.en"), "tgt": str(corpus / "a.es")}
    if layout == "gz":
        for side in ("en", "es"):
            (tmp_path / f"a.{side}.gz").write_bytes(gzip.compress((corpus / f"a.{side}").read_bytes()))
        split = {"src": str(tmp_path / "a.en.gz"), "tgt": str(tmp_path / "a.es.gz")}
    elif layout == "tsv":
        en = (corpus / "a.en").read_text(encoding="utf-8").splitlines()
        es = (corpus / "a.es").read_text(encoding="utf-8").splitlines()
        (tmp_path / "a.tsv").write_text("".join(f"{s.replace(chr(9), ' ')}\t{t}\n" for s, t in zip(en, es)), "utf-8")
        split = {"tsv": str(tmp_path / "a.tsv")}
    reference = encode_pairs(read_split(Split(src=corpus / "a.en", tgt=corpus / "a.es")), tok, 512, 3.0)
    got = {}
    for workers in (1, 2):
        recipe = make_recipe(tmp_path / f"run{workers}", split, max_len_ratio=3.0)
        counts = prepare(recipe, workers=workers, progress=False, tok=tok)["train"]
        assert counts["kept"] == len(reference) and counts["blank"] == 1 and counts["read"] == 400
        assert (counts["too_long"], counts["ratio"]) == (reference.dropped_too_long, reference.dropped_ratio)
        assert counts["too_long"] + counts["ratio"] >= 1
        got[workers] = shard_pairs(recipe, tok)
        assert (corpus_dir(recipe, "train") / "src.bin").read_bytes() == (
            corpus_dir(make_recipe(tmp_path / "run1", split), "train") / "src.bin"
        ).read_bytes()
    assert got[1] == got[2] == (reference.src, reference.tgt)


def test_dedup_drops_exact_duplicate_pairs(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    split = {"src": str(corpus / "a.en"), "tgt": str(corpus / "a.es")}
    plain = prepare(make_recipe(tmp_path / "a", split), workers=2, progress=False, tok=tok)["train"]
    recipe = make_recipe(tmp_path / "b", split, dedup=True)
    counts = prepare(recipe, workers=2, progress=False, tok=tok)["train"]
    assert plain["duplicates"] == 0 and counts["duplicates"] == 1 and counts["kept"] == plain["kept"] - 1
    src, tgt = shard_pairs(recipe, tok)
    assert len({(tuple(s), tuple(t)) for s, t in zip(src, tgt)}) == len(src)


def test_a_second_prepare_is_skipped_and_a_touch_does_not_make_it_stale(corpus, tok, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    for side in ("en", "es"):
        (data / f"a.{side}").write_bytes((corpus / f"a.{side}").read_bytes())
    recipe = make_recipe(tmp_path / "run", {"src": str(data / "a.en"), "tgt": str(data / "a.es")})
    prepare(recipe, workers=1, progress=False, tok=tok)
    before = (corpus_dir(recipe, "train") / "manifest.json").stat().st_mtime_ns
    os.utime(data / "a.en")  # same bytes, new mtime: still fresh (the sha256 decides)
    assert prepare(recipe, workers=1, progress=False, tok=tok)["train"]["skipped"] is True
    assert (corpus_dir(recipe, "train") / "manifest.json").stat().st_mtime_ns == before


def test_stale_shards_are_refused_with_the_reason(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    for side in ("en", "es"):
        (data / f"a.{side}").write_bytes((corpus / f"a.{side}").read_bytes())
    split = {"src": str(data / "a.en"), "tgt": str(data / "a.es")}
    recipe = make_recipe(tmp_path / "run", split)
    tok.save(tmp_path / "run" / "tokenizer")
    prepare(recipe, workers=1, progress=False, tok=tok)
    with pytest.raises(StaleError, match="other settings \\(max_len\\)"):
        open_training_set(make_recipe(tmp_path / "run", split, max_len=500), tok)
    with pytest.raises(StaleError, match="another tokenizer"):
        open_training_set(recipe, _other_tok(tmp_path))
    text = (data / "a.es").read_text(encoding="utf-8").replace("Dios", "DIOS", 1)
    (data / "a.es").write_text(text, encoding="utf-8")
    with pytest.raises(StaleError, match=r"a\.es changed since it was prepared"):
        open_training_set(recipe, tok)
    # translate train refuses it in one line; translate prepare rebuilds it
    result = runner.invoke(app, ["prepare", *_recipe_file(tmp_path, recipe), "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    open_training_set(recipe, tok)


def _other_tok(tmp_path: Path) -> Tokenizer:
    from seq2seq_cli.recipe import TokenizerConfig

    lines = (BIBLE / "dev.en").read_text(encoding="utf-8").splitlines()
    return train_tokenizer(TokenizerConfig(vocab_size=200), lines, lines, tmp_path / "other", num_threads=1)


def _recipe_file(tmp_path: Path, recipe: Recipe) -> list[str]:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")), encoding="utf-8")
    return [str(path)]


def test_train_refuses_stale_shards_in_one_line(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    for side in ("en", "es"):
        (data / f"a.{side}").write_bytes((corpus / f"a.{side}").read_bytes())
    recipe = make_recipe(tmp_path / "run", {"src": str(data / "a.en"), "tgt": str(data / "a.es")})
    tok.save(tmp_path / "run" / "tokenizer")
    prepare(recipe, workers=1, progress=False, tok=tok)
    (data / "a.en").write_text((data / "a.en").read_text(encoding="utf-8").upper(), encoding="utf-8")
    result = runner.invoke(app, ["train", *_recipe_file(tmp_path, recipe), "--no-progress"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "a.en changed since it was prepared" in line and "translate prepare" in line


# ------------------------------------------------------------------------------ damage


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_shards_are_a_one_line_error_naming_the_file(corpus, tok, tmp_path: Path, damage: str) -> None:
    recipe = make_recipe(tmp_path / "run", {"src": str(corpus / "a.en"), "tgt": str(corpus / "a.es")})
    prepare(recipe, workers=1, progress=False, tok=tok)
    d = corpus_dir(recipe, "train")
    target = {"truncate": d / "tgt.bin", "flip": d / "src.bin", "manifest": d / "manifest.json"}[damage]
    raw = bytearray(target.read_bytes())
    if damage == "truncate":
        raw = raw[:-6]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0x10
    else:
        raw = raw[: len(raw) // 2]
    target.write_bytes(bytes(raw))
    with pytest.raises(ShardError) as info:
        open_training_set(recipe, tok)
    message = str(info.value)
    assert str(target if damage != "manifest" else target) in message and "\n" not in message
    assert {"truncate": "truncated", "flip": "corrupt", "manifest": "unreadable manifest"}[damage] in message


def test_an_interrupted_prepare_leaves_the_old_shards_and_no_partial_directory(
    corpus, tok, tmp_path: Path, monkeypatch
) -> None:
    recipe = make_recipe(tmp_path / "run", {"src": str(corpus / "a.en"), "tgt": str(corpus / "a.es")})
    prepare(recipe, workers=1, progress=False, tok=tok)
    good = shard_pairs(recipe, tok)
    monkeypatch.setattr(prep, "CHUNK_PAIRS", 50)
    real, calls = prep._encode_chunk, []

    def dying(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prep, "_encode_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(recipe, workers=1, progress=False, force=True, tok=tok)
    assert sorted(p.name for p in (tmp_path / "run" / "prepared").iterdir()) == ["train"]
    assert shard_pairs(recipe, tok) == good


def test_bad_input_errors_name_file_and_line(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "b.en").write_bytes(b"good line\nbad \xff byte\nthird\n")
    (tmp_path / "b.es").write_bytes(b"buena\nmala\ntercera\n")
    (tmp_path / "short.es").write_bytes(b"una\n")
    for workers in (1, 2):
        recipe = make_recipe(tmp_path / f"r{workers}", {"src": str(tmp_path / "b.en"), "tgt": str(tmp_path / "b.es")})
        with pytest.raises(DataError, match=r"b\.en:2: invalid UTF-8 byte 0xff"):
            prepare(recipe, workers=workers, progress=False, tok=tok)
        assert not (corpus_dir(recipe, "train") / "manifest.json").exists()
    recipe = make_recipe(tmp_path / "r3", {"src": str(tmp_path / "b.en"), "tgt": str(tmp_path / "short.es")})
    with pytest.raises(DataError, match=r"short\.es: has 1 lines but .*b\.en has more"):
        prepare(recipe, workers=1, progress=False, tok=tok)
    (tmp_path / "c.gz").write_bytes(b"not gzip at all\n")
    recipe = make_recipe(tmp_path / "r4", {"src": str(tmp_path / "c.gz"), "tgt": str(tmp_path / "b.es")})
    with pytest.raises(DataError, match=r"c\.gz: cannot read it as gzip"):
        prepare(recipe, workers=1, progress=False, tok=tok)


# ------------------------------------------------------------------------------ weights


def test_weighted_corpora_per_epoch_counts(corpus: Path, tok: Tokenizer, tmp_path: Path) -> None:
    """Weight 2.5 on a 100-pair corpus: 250 per epoch (two full passes + 50 sampled, fresh each epoch)."""
    small = tmp_path / "small"
    small.mkdir()
    for side in ("en", "es"):
        lines = (BIBLE / f"dev.{side}").read_text(encoding="utf-8").splitlines()[:100]
        (small / f"s.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = make_recipe(
        tmp_path / "run",
        None,
        corpora=[
            {"name": "big", "src": str(corpus / "a.en"), "tgt": str(corpus / "a.es"), "weight": 0.5},
            {"name": "small", "src": str(small / "s.en"), "tgt": str(small / "s.es"), "weight": 2.5},
        ],
    )
    prepare(recipe, workers=2, progress=False, tok=tok)
    train, report = open_training_set(recipe, tok)
    n_big = report["corpora"]["big"]["pairs"]
    assert report["corpora"]["small"] == {"pairs": 100, "weight": 2.5, "per_epoch": 250}
    assert report["corpora"]["big"]["per_epoch"] == round(0.5 * n_big)
    e0, e0_again, e1 = train.epoch_ids(1, 0), train.epoch_ids(1, 0), train.epoch_ids(1, 1)
    assert np.array_equal(e0, e0_again) and not np.array_equal(e0, e1)
    small_ids = e0[e0 >= n_big] - n_big
    counts = np.bincount(small_ids, minlength=100)
    assert len(small_ids) == 250 and counts.min() == 2 and counts.max() == 3 and (counts == 3).sum() == 50
    big_ids = e0[e0 < n_big]
    assert len(big_ids) == len(set(big_ids.tolist())) == round(0.5 * n_big)


def test_single_corpus_recipe_and_corpora_list_are_exclusive(tmp_path: Path) -> None:
    from seq2seq_cli.recipe import RecipeError

    with pytest.raises(RecipeError, match="either 'train'"):
        make_recipe(tmp_path, {"src": "a", "tgt": "b"}, corpora=[{"name": "x", "src": "a", "tgt": "b"}])
    with pytest.raises(RecipeError, match="unique"):
        make_recipe(tmp_path, None, corpora=[{"name": "x", "src": "a", "tgt": "b"}] * 2)


# ------------------------------------------------------------------------------ tokenizer sample


def test_reservoir_sample_is_bounded_reproducible_and_uniform(corpus: Path) -> None:
    split = Split(src=corpus / "a.en", tgt=corpus / "a.es")
    full_src, _, counts = sample_pairs([split], 0, seed=1)
    assert counts.read == 400 and counts.blank == 1 and len(full_src) == 399
    assert sample_pairs([split], 10_000, seed=1)[0] == full_src  # a stream smaller than the sample: all, in order
    a, _, _ = sample_pairs([split], 100, seed=1)
    assert len(a) == 100 and a == sample_pairs([split], 100, seed=1)[0] != sample_pairs([split], 100, seed=2)[0]
    positions = [full_src.index(x) for x in a]
    assert positions == sorted(positions)  # kept in stream order
    # uniform: over 200 seeds each quarter of the stream gets about a quarter of the sample
    quarters = np.zeros(4)
    for seed in range(200):
        src, _, _ = sample_pairs([split], 40, seed=seed)
        for x in src:
            quarters[min(3, full_src.index(x) * 4 // len(full_src))] += 1
    assert np.all(np.abs(quarters / quarters.sum() - 0.25) < 0.02)


def test_run_records_per_corpus_counts_in_metrics(e2e, tmp_path: Path) -> None:
    from seq2seq_cli.pipeline import run_pipeline

    data = e2e.data
    recipe = e2e.load(
        tmp_path / "w",
        train__max_steps=3,
        train__valid_every=1000,
        data__train=None,
        data__corpora=json.dumps(
            [
                {"name": "a", "src": data["data.train.src"], "tgt": data["data.train.tgt"], "max_lines": 300},
                {"name": "b", "src": data["data.dev.src"], "tgt": data["data.dev.tgt"], "weight": 3},
            ]
        ),
    )
    out = run_pipeline(recipe, progress=False)
    assert out["prepare"]["a"]["kept"] == 300 and out["prepare"]["b"]["kept"] == 20
    records = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    [data_record] = [r for r in records if r["type"] == "data"]
    assert data_record["corpora"] == {
        "a": {"pairs": 300, "weight": 1.0, "per_epoch": 300},
        "b": {"pairs": 20, "weight": 3.0, "per_epoch": 60},
    }
