"""Recipe loading: schema errors name the key, overrides, path resolution, dump round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import pydantic
import pytest
import yaml

from seq2seq_cli.recipe import (
    DecodeConfig,
    ModelConfig,
    Recipe,
    RecipeError,
    check_data_files,
    dump_recipe,
    load_recipe,
    parse_override,
    recipe_from_dict,
)

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
BASE = {
    "output_dir": "out",
    "data": {"train": {"src": "train.en", "tgt": "train.es"}},
    "train": {"max_time": 30},
}  # a recipe needs some budget (all zero = never stops: an error)


def write(tmp_path: Path, tree_or_text, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(tree_or_text if isinstance(tree_or_text, str) else yaml.safe_dump(tree_or_text))
    return path


def error_of(tree: dict, source: str = "r.yaml") -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(tree, source)
    return str(info.value)


def with_(**sections) -> dict:
    tree = copy.deepcopy(BASE)
    if isinstance(sections.get("train"), dict):  # keep BASE's budget unless the section sets its own keys
        sections = {**sections, "train": {**BASE["train"], **sections["train"]}}
    tree.update(sections)
    return tree


# ------------------------------------------------------------------------------ shipped recipes


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"tiny.yaml", "transformer-base.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads(path: Path) -> None:
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    assert r.output_dir.is_absolute() and r.data.train is not None
    assert r.model.d_model % r.model.n_heads == 0
    assert r.decode.n_best <= r.decode.beam


def test_tiny_recipe_values() -> None:
    r = load_recipe(RECIPES[[p.name for p in RECIPES].index("tiny.yaml")])
    recipes_dir = RECIPES[0].parent
    assert r.output_dir == (recipes_dir / "../runs/tiny").resolve()
    assert r.data.train.src == (recipes_dir / "../data/bible-en-es/train.en").resolve()
    assert r.data.train.max_lines == 3000
    assert (r.model.d_model, r.model.n_heads, r.train.max_steps, r.decode.beam) == (64, 4, 150, 2)
    assert r.model.norm == "post" and r.train.betas == (0.9, 0.98)  # defaults filled in


# ------------------------------------------------------------------------------ error messages


def test_unknown_key_suggests_closest() -> None:
    msg = error_of(with_(train={"max_stesp": 3}))
    assert msg == "r.yaml: train.max_stesp: unknown key (did you mean 'max_steps'?)"


@pytest.mark.parametrize(
    "tree,path,hint",
    [
        (with_(modle={"d_model": 8}), "modle", "model"),
        (with_(decode={"n_bset": 1}), "decode.n_bset", "n_best"),
        (with_(data={"train": {"src": "a", "tgt": "b", "max_line": 3}}), "data.train.max_line", "max_lines"),
        (
            with_(data={"train": {"src": "a", "tgt": "b"}, "dev": {"src": "a", "tgt": "b", "refz": []}}),
            "data.dev.refz",
            "refs",
        ),
    ],
)
def test_unknown_key_nested(tree: dict, path: str, hint: str) -> None:
    msg = error_of(tree)
    assert f"r.yaml: {path}: unknown key" in msg
    assert f"did you mean '{hint}'" in msg


def test_unknown_key_without_close_match_has_no_hint() -> None:
    msg = error_of(with_(train={"zzzzqqq": 1}))
    assert "train.zzzzqqq: unknown key" in msg and "did you mean" not in msg


def test_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, with_(train={"max_steps": "abc"}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: train.max_steps: ")
    assert "'abc'" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "warmup_steps", 0),
        ("decode", "beam", 0),
        ("model", "dropout", 1.5),
        ("model", "dropout", -0.1),
        ("train", "label_smoothing", 1.0),
        ("tokenizer", "vocab_size", 3),
        ("decode", "top_p", 0.0),
        ("train", "batch_tokens", 1),
        ("model", "activation", "tanh"),
    ],
)
def test_out_of_range(section: str, key: str, value) -> None:
    msg = error_of(with_(**{section: {key: value}}))
    assert msg.startswith(f"r.yaml: {section}.{key}: ")
    assert repr(value) in msg


def test_heads_must_divide_width() -> None:
    msg = error_of(with_(model={"d_model": 30, "n_heads": 4}))
    assert msg.startswith("r.yaml: model: ") and "d_model (30)" in msg and "n_heads (4)" in msg
    with pytest.raises(ValueError):
        ModelConfig(d_model=30, n_heads=4)
    assert ModelConfig(d_model=32, n_heads=4).d_model == 32


def test_n_best_must_not_exceed_beam() -> None:
    msg = error_of(with_(decode={"beam": 2, "n_best": 3}))
    assert msg.startswith("r.yaml: decode: ") and "n_best (3)" in msg and "beam (2)" in msg
    assert DecodeConfig(beam=2, n_best=3, sample=True).n_best == 3  # sampling: n_best = samples
    assert DecodeConfig(beam=3, n_best=3).n_best == 3


def test_share_embeddings_needs_joint() -> None:
    msg = error_of(with_(tokenizer={"joint": False}))
    assert "share_embeddings" in msg and "joint" in msg
    ok = recipe_from_dict(with_(tokenizer={"joint": False}, model={"share_embeddings": False}))
    assert ok.tokenizer.joint is False


def test_split_layout() -> None:
    assert "give both 'src' and 'tgt'" in error_of(with_(data={"train": {"src": "a"}}))
    assert "not both" in error_of(with_(data={"train": {"src": "a", "tgt": "b", "tsv": "c"}}))
    assert recipe_from_dict(with_(data={"train": {"tsv": "c.tsv"}})).data.train.tsv == Path("c.tsv")


def test_missing_required_sections() -> None:
    msg = error_of({})
    lines = msg.splitlines()
    assert any(line.startswith("r.yaml: output_dir: ") for line in lines)
    assert any(line.startswith("r.yaml: data: ") for line in lines)


def test_all_problems_reported_at_once() -> None:
    tree = with_(train={"warmup_steps": 0, "max_stesp": 1}, decode={"beam": 0}, model={"dropout": 1.5})
    lines = error_of(tree).splitlines()
    assert len(lines) == 4
    assert all(line.startswith("r.yaml: ") for line in lines)
    joined = "\n".join(lines)
    for key in ("train.warmup_steps", "train.max_stesp", "decode.beam", "model.dropout"):
        assert sum(f"r.yaml: {key}: " in line for line in lines) == 1, joined


def test_recipe_is_frozen() -> None:
    r = recipe_from_dict(BASE)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        r.seed = 5  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        r.decode.beam = 9  # type: ignore[misc]
    assert r.seed == 1 and r.decode.beam == DecodeConfig().beam


# ------------------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    "text,keys,value",
    [
        ("train.max_steps=7", ["train", "max_steps"], 7),
        ("output_dir=/tmp/x", ["output_dir"], "/tmp/x"),
        ("model.share_embeddings=false", ["model", "share_embeddings"], False),
        ("train.betas=[0.9, 0.99]", ["train", "betas"], [0.9, 0.99]),
        ("train.device=cuda:0", ["train", "device"], "cuda:0"),
        ("decode.alpha=1e-1", ["decode", "alpha"], "1e-1"),  # YAML 1.1: no dot → a string (pydantic coerces)
        (" seed = 3", ["seed"], 3),
        ("data.src_lang=", ["data", "src_lang"], ""),
        ("a.b=x=y", ["a", "b"], "x=y"),
    ],
)
def test_parse_override(text: str, keys: list, value) -> None:
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("text", ["no_equals", "=3", " =3"])
def test_parse_override_malformed(text: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_override(text)
    assert "KEY.PATH=VALUE" in str(info.value)


def test_overrides_apply(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    r = load_recipe(
        path,
        [
            "train.max_steps=7",
            "output_dir=/tmp/x",
            "decode.beam=3",
            "decode.alpha=1e-1",
            "model.share_embeddings=false",
        ],
    )
    assert r.train.max_steps == 7
    assert r.output_dir == Path("/tmp/x").resolve()
    assert r.decode.beam == 3  # the section did not exist in the file
    assert r.decode.alpha == pytest.approx(0.1)
    assert r.model.share_embeddings is False
    assert load_recipe(path).train.max_steps == 0  # file untouched


def test_later_override_wins(tmp_path: Path) -> None:
    path = write(tmp_path, with_(train={"max_steps": 100}))
    assert load_recipe(path, ["train.max_steps=1", "train.max_steps=2"]).train.max_steps == 2


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=-1", "train.max_steps"),
        ("train.max_stesp=3", "train.max_stesp"),
        ("decode.beam=0", "decode.beam"),
    ],
)
def test_bad_override_is_validated(tmp_path: Path, override: str, key: str) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [override])
    assert f"{path}: {key}: " in str(info.value)
    if "stesp" in key:
        assert "did you mean 'max_steps'" in str(info.value)


def test_override_into_non_section(tmp_path: Path) -> None:
    path = write(tmp_path, with_(seed=4))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["seed.x=1"])
    assert "seed.x" in str(info.value) and "not a section" in str(info.value)
    # a key absent from the file becomes a section, then fails validation naming the key
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, BASE, "b.yaml"), ["seed.x=1"])
    assert ": seed: " in str(info.value)


# ------------------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_recipe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "conf" / "exp"
    sub.mkdir(parents=True)
    tree = {
        "output_dir": "../runs/a",
        "train": {"max_steps": 1, "init_from": "../p/best.pt"},
        "data": {
            "train": {"src": "d/train.en", "tgt": "/abs/train.es"},
            "replay": {"src": "old.en", "tgt": "old.es", "ratio": 0.3},
            "dev": {"tsv": "dev.tsv", "refs": ["r1.txt", "../r2.txt"]},
        },
    }
    path = write(sub, tree)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    r = load_recipe(Path("conf/exp/r.yaml"))
    assert r.output_dir == (tmp_path / "conf" / "runs" / "a").resolve()
    assert r.data.train.src == (sub / "d" / "train.en").resolve()
    assert r.data.train.tgt == Path("/abs/train.es")
    assert r.data.dev.tsv == (sub / "dev.tsv").resolve()
    assert r.train.init_from == (tmp_path / "conf" / "p" / "best.pt").resolve()
    assert (r.data.replay.src, r.data.replay.ratio) == ((sub / "old.en").resolve(), 0.3)
    assert r.data.dev.refs == [(sub / "r1.txt").resolve(), (tmp_path / "conf" / "r2.txt").resolve()]
    assert r.data.test is None
    assert path.exists()


def test_recipe_from_dict_without_base_keeps_paths() -> None:
    r = recipe_from_dict(BASE)
    assert r.output_dir == Path("out") and r.data.train.src == Path("train.en")


# ------------------------------------------------------------------------------ dump round trip


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_dump_round_trip(path: Path) -> None:
    r = load_recipe(path)
    text = dump_recipe(r)
    tree = yaml.safe_load(text)
    assert set(tree) == {"output_dir", "seed", "data", "tokenizer", "model", "train", "decode"}
    assert tree["train"]["warmup_steps"] == r.train.warmup_steps  # defaults are written out
    assert "clip_norm" in tree["train"]
    again = recipe_from_dict(tree, "dumped")
    assert again == r
    assert dump_recipe(again) == text


def test_dump_round_trip_non_default(tmp_path: Path) -> None:
    tree = with_(
        train={"betas": [0.8, 0.9], "schedule": "inverse_sqrt"},
        decode={"beam": 1, "sample": True, "n_best": 4},
        tokenizer={"user_defined_symbols": ["<x>"], "joint": False},
        model={"share_embeddings": False},
    )
    r = load_recipe(write(tmp_path, tree))
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


# ------------------------------------------------------------------------------ file problems


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "output_dir: out\nseed: 1\ndata: [1, 2\nmodel: {}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:")
    line = int(msg[len(str(path)) + 1 :].split(":")[0])
    assert 3 <= line <= 5
    assert "invalid YAML" in msg


def test_tab_indentation_yaml_error(tmp_path: Path) -> None:
    path = write(tmp_path, "output_dir: out\ndata:\n\ttrain: {}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:3: invalid YAML")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_yaml(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "mapping" in msg and kind in msg and "\n" not in msg


def test_missing_recipe_and_directory(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="directory"):
        load_recipe(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"output_dir: \xff\xfe\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: ") and "UTF-8" in str(info.value)


def test_empty_file_reports_missing_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}: output_dir: " in str(info.value) and f"{path}: data: " in str(info.value)


# ------------------------------------------------------------------------------ data files


def test_check_data_files_lists_every_missing_file(tmp_path: Path) -> None:
    (tmp_path / "train.en").write_text("a\n")
    (tmp_path / "devdir").mkdir()
    tree = {
        "output_dir": "out",
        "train": {"max_steps": 1},
        "data": {
            "train": {"src": "train.en", "tgt": "train.es"},
            "dev": {"src": "devdir", "tgt": "dev.es", "refs": ["ref1"]},
            "test": {"tsv": "test.tsv"},
        },
    }
    r = load_recipe(write(tmp_path, tree))
    with pytest.raises(RecipeError) as info:
        check_data_files(r)
    lines = str(info.value).splitlines()
    assert len(lines) == 5, lines
    expect = [
        ("train.es", "data.train.tgt", "not found"),
        ("devdir", "data.dev.src", "directory"),
        ("dev.es", "data.dev.tgt", "not found"),
        ("ref1", "data.dev.refs[0]", "not found"),
        ("test.tsv", "data.test.tsv", "not found"),
    ]
    for name, key, what in expect:
        assert any(line.startswith(str(tmp_path / name)) and key in line and what in line for line in lines), key
    assert not any("train.en" in line for line in lines)


def test_check_data_files_ok(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).write_text("x\n")
    r = load_recipe(
        write(tmp_path, {"output_dir": "o", "data": {"train": {"src": "a", "tgt": "b"}}, "train": {"max_steps": 1}})
    )
    assert check_data_files(r) is None


def test_max_len_must_fit_max_positions() -> None:
    msg = error_of(with_(data={"train": {"src": "a", "tgt": "b"}, "max_len": 2000}, model={"max_positions": 1024}))
    assert "data.max_len" in msg and "max_positions" in msg
