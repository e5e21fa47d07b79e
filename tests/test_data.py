"""Reading and checking parallel text; token batching, sharding and collation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq_cli.data import (
    DataError,
    EncodedCorpus,
    ParallelText,
    clean_line,
    collate,
    encode_pairs,
    length_batches,
    make_batches,
    read_lines,
    read_split,
    shard_batches,
)
from seq2seq_cli.recipe import Split

PAD, BOS, EOS = 0, 2, 3


def put(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def pair(tmp_path: Path, src: str | bytes, tgt: str | bytes, **kw) -> Split:
    return Split(src=put(tmp_path, "s.txt", src), tgt=put(tmp_path, "t.txt", tgt), **kw)


# ------------------------------------------------------------------------------ clean_line


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("\ufeffhello", "hello"),
        ("hello\r\n", "hello"),
        ("hello\r", "hello"),
        ("a\u200bb\u200cc\u200dd\u2060e", "abcde"),
        ("a\x00b\x07c\x1bd\x7fe\x85f\x9fg", "abcdefg"),
        ("a\tb\t\tc", "a b  c"),
        ("\t  padded \t", "padded"),
        ("mid\ufeffdle", "middle"),
        ("caf\u00e9 \u00a1ol\u00e9! \u4e2d\u6587", "caf\u00e9 \u00a1ol\u00e9! \u4e2d\u6587"),  # untouched
        ("", ""),
    ],
)
def test_clean_line(raw: str, clean: str) -> None:
    assert clean_line(raw) == clean


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_clean_line_properties(text: str) -> None:
    out = clean_line(text)
    assert "\t" not in out and "\r" not in out and "\ufeff" not in out and "\u200b" not in out
    assert not any(ord(c) < 32 and c != "\n" or 0x7F <= ord(c) <= 0x9F for c in out)
    assert out == out.strip()
    assert clean_line(out) == out  # idempotent


# ------------------------------------------------------------------------------ read_split


def test_read_split_basic_and_bom_crlf(tmp_path: Path) -> None:
    split = pair(tmp_path, b"\xef\xbb\xbfHello\r\nWorld\r\n", "Hola\nMundo\n")
    text = read_split(split)
    assert text.src == ["Hello", "World"] and text.tgt == ["Hola", "Mundo"]
    assert text.blank_pairs == 0 and text.replaced_lines == 0 and text.kept_index == [0, 1]


def test_no_trailing_newline(tmp_path: Path) -> None:
    text = read_split(pair(tmp_path, "a\nb", "x\ny\n"))
    assert text.src == ["a", "b"] and text.tgt == ["x", "y"]


def test_mismatched_line_counts(tmp_path: Path) -> None:
    split = pair(tmp_path, "a\nb\nc\n", "x\ny\n")
    with pytest.raises(DataError) as info:
        read_split(split)
    msg = str(info.value)
    assert str(split.src) in msg and str(split.tgt) in msg
    assert f"{split.tgt}: has 2 lines" in msg and f"{split.src} has 3" in msg


def test_empty_file(tmp_path: Path) -> None:
    split = pair(tmp_path, "", "")
    with pytest.raises(DataError) as info:
        read_split(split)
    assert str(split.src) in str(info.value) and "empty" in str(info.value)


def test_every_pair_blank(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="blank"):
        read_split(pair(tmp_path, "\n \n", "x\n\n"))


def test_missing_file(tmp_path: Path) -> None:
    split = Split(src=put(tmp_path, "s.txt", "a\n"), tgt=tmp_path / "nope.txt")
    with pytest.raises(DataError) as info:
        read_split(split)
    assert str(info.value) == f"{tmp_path / 'nope.txt'}: file not found"


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    split = Split(src=tmp_path / "d", tgt=put(tmp_path, "t.txt", "a\n"))
    with pytest.raises(DataError) as info:
        read_split(split)
    assert str(info.value).startswith(f"{tmp_path / 'd'}: ") and "directory" in str(info.value)


def test_invalid_utf8_strict(tmp_path: Path) -> None:
    split = pair(tmp_path, "one\ntwo\nthree\n", b"uno\ndos\ntr\xe9s\n")
    with pytest.raises(DataError) as info:
        read_split(split)
    msg = str(info.value)
    assert msg.startswith(f"{split.tgt}:3: ") and "0xe9" in msg and "\n" not in msg


def test_invalid_utf8_replace(tmp_path: Path) -> None:
    split = pair(tmp_path, b"one\ntw\xffo\nthree\n", b"uno\ndos\ntr\xe9s\n")
    text = read_split(split, errors="replace")
    assert text.src == ["one", "tw\ufffdo", "three"]
    assert text.tgt == ["uno", "dos", "tr\ufffds"]
    assert text.replaced_lines == 2
    counts: dict = {}
    assert read_lines(split.src, "replace", counts)[1] == "tw\ufffdo" and counts == {"replaced_lines": 1}


def test_blank_pairs_skipped_together(tmp_path: Path) -> None:
    src = "a\n\nc\n   \ne\nf\n\u200b\n"
    tgt = "A\nB\n\nD\nE\n\t\nG\n"
    text = read_split(pair(tmp_path, src, tgt))
    assert text.src == ["a", "e"] and text.tgt == ["A", "E"]
    assert text.kept_index == [0, 4]
    assert text.blank_pairs == 5
    kept = read_split(pair(tmp_path, src, tgt), keep_blank=True)
    assert kept.blank_pairs == 0 and len(kept.src) == 7 and kept.kept_index == list(range(7))


def test_refs_follow_kept_pairs(tmp_path: Path) -> None:
    r1 = put(tmp_path, "r1.txt", "R0\nR1\nR2\n")
    split = Split(src=put(tmp_path, "s.txt", "a\n\nc\n"), tgt=put(tmp_path, "t.txt", "x\ny\nz\n"), refs=[r1])
    text = read_split(split)
    assert text.refs == [["R0", "R2"]]
    bad = Split(src=split.src, tgt=split.tgt, refs=[put(tmp_path, "r2.txt", "R0\n")])
    with pytest.raises(DataError, match="r2.txt"):
        read_split(bad)


def test_tsv(tmp_path: Path) -> None:
    split = Split(tsv=put(tmp_path, "c.tsv", "a b\tx y\n\nc\t\n\td\ne\tf\r\n"))
    text = read_split(split)
    assert text.src == ["a b", "e"] and text.tgt == ["x y", "f"]
    assert text.kept_index == [0, 4] and text.blank_pairs == 3


@pytest.mark.parametrize("bad_line,tabs", [("no tab here", 0), ("a\tb\tc", 2)])
def test_tsv_wrong_tab_count(tmp_path: Path, bad_line: str, tabs: int) -> None:
    path = put(tmp_path, "c.tsv", f"a\tb\nc\td\n{bad_line}\n")
    with pytest.raises(DataError) as info:
        read_split(Split(tsv=path))
    assert str(info.value).startswith(f"{path}:3: ") and f"found {tabs} tabs" in str(info.value)


def test_max_lines(tmp_path: Path) -> None:
    split = pair(tmp_path, "a\nb\nc\nd\n", "w\nx\ny\nz\n", max_lines=2)
    text = read_split(split)
    assert text.src == ["a", "b"] and text.tgt == ["w", "x"] and text.kept_index == [0, 1]
    tsv = Split(tsv=put(tmp_path, "c.tsv", "a\tw\nb\tx\nc\ty\n"), max_lines=1)
    assert read_split(tsv).src == ["a"]


# ------------------------------------------------------------------------------ encode_pairs


def test_encode_pairs_filters() -> None:
    class FakeTok:
        eos_id = EOS

        @staticmethod
        def encode_src_batch(lines):
            return [[10 + len(w) for w in line.split()] for line in lines]

        encode_tgt_batch = encode_src_batch

    text = ParallelText(src=["a b", "a b c d e", "a", "a b c d e f"], tgt=["x y", "x", "x y z", "x"])
    out = encode_pairs(text, FakeTok(), max_len=5, max_len_ratio=2.0)
    # pair 1: src 5 pieces + EOS = 6 > 5 → too long; pair 3: 6 pieces → too long
    # pair 2: ratio 3/1 > 2 → dropped
    assert out.src == [[11, 11, EOS]] and out.tgt == [[11, 11]]
    assert out.dropped_too_long == 2 and out.dropped_ratio == 1
    assert out.n_tokens() == (3, 3)


# ------------------------------------------------------------------------------ make_batches


def random_lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    src = [rng.randint(1, 40) for _ in range(n)]
    return src, [max(1, s + rng.randint(-5, 5)) for s in src]


@pytest.mark.parametrize("batch_tokens", [16, 64, 300])
def test_make_batches_cover_and_respect_budget(batch_tokens: int) -> None:
    src, tgt = random_lengths(500, 1)
    src[7], tgt[7] = 200, 3  # longer than any budget on the source side
    tgt[9] = 400  # and on the target side
    batches = [b.tolist() for b in make_batches(src, tgt, batch_tokens, seed=3, epoch=0)]
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    for b in batches:
        assert b
        n = len(b)
        max_src = max(src[i] for i in b)
        max_tgt = max(tgt[i] + 1 for i in b)  # the model sees BOS+y / y+EOS
        if n > 1:
            assert n * max_src <= batch_tokens and n * max_tgt <= batch_tokens
    assert [7] in batches and [9] in batches


def test_make_batches_deterministic_and_epoch_dependent() -> None:
    src, tgt = random_lengths(400, 2)

    def mb(seed: int, epoch: int) -> list[list[int]]:
        return [x.tolist() for x in make_batches(src, tgt, 128, seed=seed, epoch=epoch)]

    a = mb(5, 3)
    assert a == mb(5, 3)
    b, c = mb(5, 4), mb(6, 3)
    assert a != b and a != c
    assert sorted(i for x in b for i in x) == list(range(400))


def test_make_batches_are_length_bucketed() -> None:
    src, tgt = random_lengths(300, 4)
    padded = [max(s, t + 1) for s, t in zip(src, tgt)]
    batches = make_batches(src, tgt, 200, seed=1, epoch=0)
    # sorted by padded length: the lengths of different batches do not interleave
    spans = sorted((min(padded[i] for i in b), max(padded[i] for i in b)) for b in batches)
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))


def reference_batches(src: list[int], tgt: list[int], ids: list[int], batch_tokens: int, order: list[int]) -> list:
    """The greedy rule written out pair by pair (data.length_batches) over the same sorted order."""
    padded = [max(s, t + 1) for s, t in zip(src, tgt)]
    return length_batches([ids[k] for k in order], padded, batch_tokens)


@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=80),
    st.integers(1, 120),
    st.integers(0, 3),
)
@settings(max_examples=80, deadline=None)
def test_vectorised_cut_equals_the_pair_by_pair_greedy_rule(pairs, batch_tokens, epoch) -> None:
    src, tgt = [p[0] for p in pairs], [p[1] for p in pairs]
    got = sorted(b.tolist() for b in make_batches(src, tgt, batch_tokens, seed=2, epoch=epoch))
    # the same sorted order as make_batches draws (length, then the seeded permutation)
    rng = np.random.default_rng([2, epoch])
    ids = list(range(len(pairs)))
    length = np.maximum(np.array(src), np.array(tgt) + 1)
    perm = rng.permutation(len(ids))
    order = perm[np.argsort(length[perm], kind="stable")].tolist()
    assert got == sorted(reference_batches(src, tgt, ids, batch_tokens, order))


def test_make_batches_take_repeated_ids() -> None:
    src, tgt = random_lengths(50, 5)
    ids = np.concatenate([np.arange(50), np.arange(10)])  # the first ten twice (a weight above 1)
    flat = sorted(i for b in make_batches(src, tgt, 64, seed=1, epoch=0, ids=ids) for i in b.tolist())
    assert flat == sorted(list(range(50)) + list(range(10)))


@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=60),
    st.integers(16, 120),
    st.integers(0, 5),
)
@settings(max_examples=60, deadline=None)
def test_make_batches_property(pairs, batch_tokens, epoch) -> None:
    src, tgt = [p[0] for p in pairs], [p[1] for p in pairs]
    batches = [b.tolist() for b in make_batches(src, tgt, batch_tokens, seed=0, epoch=epoch)]
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(max(src[i], tgt[i] + 1) for i in b) <= batch_tokens


# ------------------------------------------------------------------------------ shard_batches


@pytest.mark.parametrize("n,world,group", [(23, 2, 1), (23, 3, 2), (8, 4, 2), (5, 2, 1), (7, 1, 3)])
def test_shard_batches(n: int, world: int, group: int) -> None:
    batches = [[i] for i in range(n)]
    shards = [shard_batches(batches, r, world, group) for r in range(world)]
    per_step = world * group
    usable = n - n % per_step
    assert all(len(s) == usable // world for s in shards)  # equal size
    flat = [b[0] for s in shards for b in s]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == list(range(usable))  # the first usable batches
    for step in range(usable // per_step):  # each step consumes a block
        got = sorted(b[0] for s in shards for b in s[step * group : (step + 1) * group])
        assert got == list(range(step * per_step, (step + 1) * per_step))


def test_shard_single_rank_is_identity() -> None:
    batches = [[3, 4], [1], [0, 2]]
    assert shard_batches(batches, 0, 1) == batches


# ------------------------------------------------------------------------------ collate


def test_collate() -> None:
    corpus = EncodedCorpus(src=[[5, 6, EOS], [7, EOS], [9, 9, 9, 9, EOS]], tgt=[[8, 9], [10], [4, 4, 4]])
    batch = collate(corpus, [1, 0], PAD, BOS, EOS)
    assert batch.src.tolist() == [[7, EOS, PAD], [5, 6, EOS]]
    assert batch.tgt_in.tolist() == [[BOS, 10, PAD], [BOS, 8, 9]]
    assert batch.tgt_out.tolist() == [[10, EOS, PAD], [8, 9, EOS]]
    assert batch.src.dtype == torch.long and batch.tgt_in.shape == batch.tgt_out.shape == (2, 3)
    assert (batch.n_src, batch.n_tgt) == (5, 5)
    full = collate(corpus, [0, 1, 2], PAD, BOS, EOS)
    assert full.src.shape == (3, 5) and full.tgt_in.shape == (3, 4)
    # tgt_in is tgt_out shifted right by one with BOS in front, on every row
    body = full.tgt_out[:, :-1] != EOS
    assert torch.equal(full.tgt_in[:, 1:][body], full.tgt_out[:, :-1][body])
    assert full.tgt_in[:, 0].eq(BOS).all()
    assert full.n_tgt == int(full.tgt_out.ne(PAD).sum()) and full.n_src == int(full.src.ne(PAD).sum())
    moved = full.to(torch.device("cpu"))
    assert torch.equal(moved.src, full.src) and moved.n_tgt == full.n_tgt


def test_collate_empty_target() -> None:
    corpus = EncodedCorpus(src=[[5, EOS]], tgt=[[]])
    batch = collate(corpus, [0], PAD, BOS, EOS)
    assert batch.tgt_in.tolist() == [[BOS]] and batch.tgt_out.tolist() == [[EOS]]


def test_collate_rows_pads_to_a_multiple_and_keeps_the_content() -> None:
    from seq2seq_cli.data import collate_rows

    src, tgt = [[5, 6, EOS], [7, EOS]], [[8, 9, 10], [11]]
    plain = collate_rows(src, tgt, PAD, BOS, EOS)
    padded = collate_rows(src, tgt, PAD, BOS, EOS, multiple=8)
    assert tuple(plain.src.shape) == (2, 3) and tuple(padded.src.shape) == (2, 8)
    assert tuple(plain.tgt_in.shape) == (2, 4) and tuple(padded.tgt_out.shape) == (2, 8)
    for name in ("src", "tgt_in", "tgt_out"):
        a, b = getattr(plain, name), getattr(padded, name)
        assert torch.equal(b[:, : a.size(1)], a) and b[:, a.size(1) :].eq(PAD).all()
    assert (plain.n_src, plain.n_tgt) == (padded.n_src, padded.n_tgt) == (5, 6)
