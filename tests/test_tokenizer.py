"""Tests for seq2seq_cli.tokenizer: special ids, round trips on the bundled corpus, state, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm

from seq2seq_cli.recipe import TokenizerConfig
from seq2seq_cli.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, TokenizerError, train_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "bible-en-es"
N_LINES = 2000
VOCAB = 2000


def _read(name: str, n: int = N_LINES) -> list[str]:
    with open(DATA / name, encoding="utf-8") as fh:
        return [line.rstrip("\n") for _, line in zip(range(n), fh)]


@pytest.fixture(scope="session")
def corpus() -> tuple[list[str], list[str]]:
    return _read("train.en"), _read("train.es")


KINDS = [("unigram", True), ("bpe", True), ("unigram", False), ("bpe", False)]


@pytest.fixture(scope="session")
def tokenizers(corpus, tmp_path_factory) -> dict[tuple[str, bool], Tokenizer]:
    """One trained tokenizer per (type, joint), shared by the whole session (about 2 s)."""
    en, es = corpus
    out = {}
    for kind, joint in KINDS:
        cfg = TokenizerConfig(type=kind, joint=joint, vocab_size=VOCAB)
        out[kind, joint] = train_tokenizer(cfg, en, es, tmp_path_factory.mktemp(f"{kind}-{joint}"))
    return out


@pytest.fixture(params=KINDS, ids=lambda k: f"{k[0]}-{'joint' if k[1] else 'separate'}")
def tok(request, tokenizers) -> Tokenizer:
    return tokenizers[request.param]


def test_special_ids_are_fixed(tok: Tokenizer) -> None:
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    for side in ("src", "tgt"):
        assert [tok.id_to_piece(i, side) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


def test_round_trip_on_corpus(tok: Tokenizer, corpus) -> None:
    en, es = corpus
    assert all(tok.decode_src(tok.encode_src(x)) == x for x in en)
    assert all(tok.decode_tgt(tok.encode_tgt(x)) == x for x in es)
    # held-out dev lines too, where every character was seen in training (so no <unk>)
    seen_en = set("".join(en + es if tok.joint else en))
    seen_es = set("".join(en + es if tok.joint else es))
    dev_en = [x for x in _read("dev.en", 300) if set(x) <= seen_en]
    dev_es = [x for x in _read("dev.es", 300) if set(x) <= seen_es]
    assert len(dev_en) > 250 and len(dev_es) > 250
    assert all(tok.decode_src(tok.encode_src(x)) == x for x in dev_en)
    assert all(tok.decode_tgt(tok.encode_tgt(x)) == x for x in dev_es)


def test_vocab_sizes_and_joint_flag(tok: Tokenizer, tokenizers) -> None:
    assert tok.src_vocab_size == tok.tgt_vocab_size == VOCAB
    assert tokenizers["unigram", True].joint and not tokenizers["unigram", False].joint
    sep = tokenizers["unigram", False]
    assert sep.encode_src("Dios") != sep.encode_tgt("Dios")  # two different vocabularies


def test_encode_adds_no_bos_eos_and_decode_skips_specials(tok: Tokenizer) -> None:
    ids = tok.encode_tgt("In the beginning")
    assert ids and not {PAD_ID, BOS_ID, EOS_ID} & set(ids)
    assert tok.decode_tgt([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == "In the beginning"


def test_batch_encoding_matches_single(tok: Tokenizer, corpus) -> None:
    lines = corpus[0][:50] + [""]
    assert tok.encode_src_batch(lines) == [tok.encode_src(x) for x in lines]
    assert tok.encode_tgt_batch(lines) == [tok.encode_tgt(x) for x in lines]


def test_pieces_per_sentence(tok: Tokenizer, corpus) -> None:
    lines = corpus[1][:20]
    expected = sum(len(tok.encode_tgt(x)) for x in lines) / len(lines)
    assert tok.pieces_per_sentence(lines, "tgt") == pytest.approx(expected)
    assert expected > 1.0
    assert tok.pieces_per_sentence([], "src") == 0.0


def test_state_round_trip(tok: Tokenizer, corpus) -> None:
    state = tok.to_state()
    assert set(state) == {"src", "tgt"} and isinstance(state["src"], bytes)
    assert (state["tgt"] is None) == tok.joint
    again = Tokenizer.from_state(state)
    lines = corpus[0][:100] + corpus[1][:100]
    assert again.encode_src_batch(lines) == tok.encode_src_batch(lines)
    assert again.encode_tgt_batch(lines) == tok.encode_tgt_batch(lines)


def test_save_load_and_files(tokenizers, tmp_path: Path) -> None:
    joint, sep = tokenizers["bpe", True], tokenizers["bpe", False]
    sep.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"src.model", "src.vocab", "tgt.model", "tgt.vocab"}
    assert Tokenizer.load(tmp_path).to_state() == sep.to_state()
    joint.save(tmp_path)  # replaces the separate layout, so load() is never ambiguous
    assert {p.name for p in tmp_path.iterdir()} == {"spm.model", "spm.vocab"}
    assert Tokenizer.load(tmp_path).to_state() == joint.to_state()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_user_defined_symbols_are_single_pieces(corpus, tmp_path: Path) -> None:
    cfg = TokenizerConfig(vocab_size=500, user_defined_symbols=["<2es>", "<2en>", "@@"])
    tok = train_tokenizer(cfg, corpus[0][:300], corpus[1][:300], tmp_path)
    for sym in cfg.user_defined_symbols:
        ids = tok.encode_src(f"{sym} the earth")
        assert any(tok.id_to_piece(i) == sym for i in ids), (sym, ids)
    assert [tok.id_to_piece(i) for i in range(4, 7)] == ["<2es>", "<2en>", "@@"]


def test_training_is_deterministic_and_skips_blank_lines(corpus, tmp_path: Path) -> None:
    en, es = corpus[0][:400], corpus[1][:400]
    cfg = TokenizerConfig(vocab_size=300, input_sentence_size=300)  # sampling path included
    a = train_tokenizer(cfg, en, es, tmp_path / "a")
    b = train_tokenizer(cfg, en, es, tmp_path / "b")
    c = train_tokenizer(cfg, ["", *en, "  "], [*es, ""], tmp_path / "c")
    assert a.to_state() == b.to_state() == c.to_state()


def test_vocab_size_too_large_is_not_an_error(corpus, tmp_path: Path) -> None:
    tok = train_tokenizer(TokenizerConfig(vocab_size=50_000), corpus[0][:50], [], tmp_path)
    assert 4 < tok.src_vocab_size < 50_000
    assert tok.decode_src(tok.encode_src(corpus[0][0])) == corpus[0][0]


def test_vocab_size_too_small_is_a_clear_error(corpus, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"vocab_size 16 is too small .* need \d+"):
        train_tokenizer(TokenizerConfig(vocab_size=16), corpus[0][:50], corpus[1][:50], tmp_path)
    with pytest.raises(TokenizerError, match="no non-empty lines"):
        train_tokenizer(TokenizerConfig(joint=False), ["", " "], ["x"], tmp_path)


def test_missing_or_corrupt_model_files(tokenizers, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError) as err:
        Tokenizer.load(tmp_path)
    assert "spm.model" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "src.model").write_bytes(tokenizers["unigram", False].to_state()["src"])
    with pytest.raises(TokenizerError, match=r"tgt\.model: tokenizer model not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tgt.model").write_bytes(b"this is not a model")
    with pytest.raises(TokenizerError, match=r"tgt\.model: not a valid sentencepiece model"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="state"):
        Tokenizer.from_state({"src": "text, not bytes", "tgt": None})


def test_foreign_model_with_other_special_ids_is_rejected(corpus, tmp_path: Path) -> None:
    # sentencepiece's defaults: unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus[0][:200]),
        model_prefix=str(tmp_path / "spm"),
        vocab_size=200,
        minloglevel=2,
        num_threads=1,
    )
    with pytest.raises(TokenizerError, match=r"spm\.model: special ids .* are \(-1, 0, 1, 2\)"):
        Tokenizer.load(tmp_path)


def test_byte_fallback_encodes_unseen_characters_without_unk(corpus, tmp_path: Path) -> None:
    """Characters the corpus never had (digits, symbols, emoji) become byte pieces and decode back."""
    src, tgt = corpus
    text = "Press Ctrl+F5 = 100% «OK» ▸ 🙂"
    plain = train_tokenizer(TokenizerConfig(vocab_size=700), src, tgt, tmp_path / "a", num_threads=1)
    assert UNK_ID in plain.encode_src(text)  # the Bible has none of these characters
    tok = train_tokenizer(TokenizerConfig(vocab_size=700, byte_fallback=True), src, tgt, tmp_path / "b", num_threads=1)
    ids = tok.encode_src(text)
    assert UNK_ID not in ids and tok.decode_src(ids) == text and tok.decode_tgt(tok.encode_tgt(text)) == text
    assert tok.coverage([text], "src")[0] == 0.0
    assert tok.id_to_piece(ids[-1]).startswith("<0x")  # the emoji's last UTF-8 byte
