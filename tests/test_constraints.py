"""Issue 18: lexically constrained beam search, forced prefixes, the repetition guard, temperature 0,
word alignments, and their command-line options."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
from test_search import EOS, LOOP, SRC3, A, B, C, FakeModel, assert_same, batch, opts, real_opts, tokens_of, transformer  # noqa: F401  # noqa: F401  (fixtures)

from seq2seq_cli.constraints import ConstraintSet
from seq2seq_cli.search import REPEAT_GUARD_MAX_N, beam_search, greedy_search, sample, search


def contains(tokens: list[int], phrase: list[int]) -> bool:
    n = len(phrase)
    return any(tokens[i : i + n] == phrase for i in range(len(tokens) - n + 1))


# ------------------------------------------------------------------------------ state tracking


def test_constraint_state_tracks_overlaps_exactly():
    cs = ConstraintSet(((A, A, B), (C,)))
    state = cs.start
    banks = []
    for tok in (A, A, A, B):  # "a a a b": a KMP fallback, not a reset, keeps "a a" after the third a
        state = cs.advance(state, tok)
        banks.append(cs.bank(state))
    assert state[0] == (True, False) and banks == [1, 2, 2, 3]
    assert cs.next_tokens(state) == {C} and cs.unmet(state) == 1
    state = cs.advance(state, C)
    assert cs.unmet(state) == 0 and cs.bank(state) == 4 and cs.next_tokens(state) == set()


def test_constraint_progress_resets_on_a_wrong_token():
    cs = ConstraintSet(((A, B, C),))
    state = cs.advance(cs.advance(cs.start, A), B)
    assert cs.bank(state) == 2
    assert cs.bank(cs.advance(state, A)) == 1  # "a b a": only the last "a" can start it again
    assert cs.bank(cs.advance(state, B)) == 0


# ------------------------------------------------------------------------------ fake model


def test_constraint_the_model_would_never_produce_appears():
    # B and C have probability 1e-6 everywhere (a real softmax never gives exactly 0)
    model = FakeModel({(): {A: 0.9, EOS: 0.1, B: 1e-6, C: 1e-6}}, default={EOS: 0.99, A: 0.01, B: 1e-6, C: 1e-6})
    plain = beam_search(model, SRC3, opts(beam=3))[0][0]
    assert C not in plain.tokens
    for phrase in ([C], [C, B, C], [B, A, C, C]):
        hyp = beam_search(model, SRC3, opts(beam=3), constraints=[[phrase]])[0][0]
        assert contains(hyp.tokens, phrase) and hyp.unmet == 0


def test_several_constraints_and_beam_one():
    model = FakeModel({}, default={A: 0.7, B: 0.2, EOS: 0.0999, C: 0.0001})
    for beam in (1, 2, 5):
        hyp = search(model, SRC3, opts(beam=beam, max_len_b=12), constraints=[[[C, C], [B], [A, C]]])[0][0]
        assert all(contains(hyp.tokens, p) for p in ([C, C], [B], [A, C])) and hyp.unmet == 0


def test_no_eos_before_constraints_are_met_and_scores_are_model_log_probs():
    model = FakeModel({})  # EOS 0.97 everywhere: without constraints the output is empty
    assert beam_search(model, SRC3, opts())[0][0].tokens == []
    hyp = beam_search(model, SRC3, opts(), constraints=[[[B, C]]])[0][0]
    assert hyp.tokens == [B, C]
    assert hyp.log_prob == pytest.approx(2 * math.log(0.01) + math.log(0.97), abs=1e-5)


def test_a_completed_constraint_is_not_continued_into_a_longer_word():
    # after B the model wants C (think "Cristo" + "s"); C is marked as a word-continuation piece
    model = FakeModel(
        {(): {B: 0.1, A: 0.8, EOS: 0.1}, (B,): {C: 0.9, EOS: 0.05, A: 0.05}, (A, B): {C: 0.9, EOS: 0.05, A: 0.05}},
        default={EOS: 0.9, A: 0.05, B: 0.05},
    )
    free = beam_search(model, SRC3, opts(), constraints=[[[B]]])[0][0]
    assert contains(free.tokens, [B, C])
    continuation = torch.zeros(6, dtype=torch.bool)
    continuation[C] = True
    for beam in (1, 2, 4):
        hyp = search(model, SRC3, opts(beam=beam), constraints=[[[B]]], word_continuations=continuation)[0][0]
        assert contains(hyp.tokens, [B]) and not contains(hyp.tokens, [B, C]), hyp.tokens


def test_unmeetable_constraints_return_the_hypothesis_that_met_most():
    model = FakeModel({}, default={A: 0.7, B: 0.2, EOS: 0.0999, C: 0.0001})
    # max_len = 3: [A] fits, [B, C, A, B] never can
    hyps = beam_search(model, SRC3, opts(beam=3, n_best=3, max_len_b=3), constraints=[[[A], [B, C, A, B]]])[0]
    assert hyps[0].unmet == 1 and contains(hyps[0].tokens, [A]) and len(hyps[0].tokens) == 3
    assert [h.unmet for h in hyps] == sorted(h.unmet for h in hyps)


# ------------------------------------------------------------------------------ real Transformer


def _rare_tokens(model, src, k: int) -> list[int]:
    """Tokens the unconstrained search never produces."""
    used = {t for hyps in beam_search(model, src, real_opts(n_best=4)) for h in hyps for t in h.tokens}
    return [t for t in range(4, 40) if t not in used][:k]


@pytest.mark.parametrize("beam", [1, 4])
def test_every_constraint_appears_on_transformer(transformer, batch, beam):  # noqa: F811
    src, lengths = batch
    g = torch.Generator().manual_seed(7)
    rare = _rare_tokens(transformer, src, 6)
    constraints = []
    for i in range(src.size(0)):
        n = 1 + i % 3
        phrases = [[int(t) for t in torch.randint(4, 40, (1 + (i + j) % 3,), generator=g)] for j in range(n)]
        phrases[0] = rare[i % len(rare) : i % len(rare) + 2]  # multi-piece, never produced unconstrained
        constraints.append(phrases)
    o = real_opts(beam=beam, max_len_b=15)
    results = search(transformer, src, o, constraints=constraints)
    for hyps, phrases in zip(results, constraints):
        assert hyps[0].unmet == 0
        assert all(contains(hyps[0].tokens, p) for p in phrases), (hyps[0].tokens, phrases)


def test_without_constraints_output_is_unchanged(transformer, batch):  # noqa: F811
    src, _ = batch
    o = real_opts(n_best=2, beta=0.2)
    plain = beam_search(transformer, src, o)
    assert_same(beam_search(transformer, src, o, constraints=[[] for _ in range(src.size(0))]), plain)
    # a batch where only sentence 0 has a constraint: the others go through the allocation code
    # with a single bank and must come out exactly as without it
    mixed = beam_search(transformer, src, o, constraints=[[[5, 6]]] + [[] for _ in range(src.size(0) - 1)])
    assert_same(mixed[1:], plain[1:])
    assert contains(mixed[0][0].tokens, [5, 6])


def test_constraints_are_batch_invariant(transformer, batch):  # noqa: F811
    src, lengths = batch
    constraints = [[[5, 6]], [[7]], [], [[9, 9], [11]], [[13]]]
    o = real_opts(max_len_b=10)
    together = beam_search(transformer, src, o, constraints=constraints)
    alone = [
        beam_search(transformer, src[i : i + 1, :n], o, constraints=[constraints[i]])[0] for i, n in enumerate(lengths)
    ]
    assert_same(together, alone)


def test_sampling_with_constraints_is_refused(transformer, batch):  # noqa: F811
    src, _ = batch
    with pytest.raises(ValueError, match="beam search"):
        search(transformer, src, real_opts(sample=True), constraints=[[[5]]] * src.size(0))


# ------------------------------------------------------------------------------ prefixes


def test_prefix_is_forced_and_its_log_probs_count():
    model = FakeModel({(): {A: 0.6, B: 0.4}, (A,): {EOS: 1.0}, (B,): {C: 0.6, EOS: 0.3, B: 0.1}, (B, C): {EOS: 1.0}})
    for search_fn in (greedy_search, beam_search):
        assert search_fn(model, SRC3, opts())[0][0].tokens == [A]
        hyp = search_fn(model, SRC3, opts(), prefixes=[[B]])[0][0]
        assert hyp.tokens == [B, C] and hyp.log_prob == pytest.approx(math.log(0.4 * 0.6), abs=1e-6)
        # the prefix overrides min_len/no_repeat_ngram-style bans, and EOS cannot cut it short
        hyp = search_fn(model, SRC3, opts(no_repeat_ngram=1), prefixes=[[B, B, B]])[0][0]
        assert hyp.tokens[:3] == [B, B, B]


def test_prefix_on_transformer(transformer, batch):  # noqa: F811
    src, _ = batch
    for o in (real_opts(beam=1, alpha=0.0), real_opts(beam=4)):
        plain = search(transformer, src, o)
        # a prefix equal to the first tokens of the unconstrained output leaves it unchanged
        prefixes = [h[0].tokens[:2] for h in plain]
        assert_same(search(transformer, src, o, prefixes=prefixes), plain)
        # an arbitrary prefix starts the output, and the search continues after it
        forced = search(transformer, src, o, prefixes=[[30, 31, 32]] * src.size(0))
        assert all(h[0].tokens[:3] == [30, 31, 32] for h in forced)
    # a prefix longer than max_len is still produced in full, then EOS
    long = greedy_search(transformer, src[:1], real_opts(max_len_a=0.0, max_len_b=2), prefixes=[[30, 31, 32, 33]])
    assert long[0][0].tokens == [30, 31, 32, 33]
    # sampling keeps the prefix too
    sampled = sample(transformer, src, real_opts(sample=True, temperature=1.5), prefixes=[[30]] * src.size(0))
    assert all(h[0].tokens[:1] == [30] for h in sampled)


# ------------------------------------------------------------------------------ repetition guard


def _longest_tandem(tokens: list[int]) -> int:
    """The largest k such that some n-gram (n <= REPEAT_GUARD_MAX_N) occurs k times in a row."""
    best = 1 if tokens else 0
    for n in range(1, REPEAT_GUARD_MAX_N + 1):
        for i in range(len(tokens)):
            k = 1
            while tokens[i + k * n : i + (k + 1) * n] == tokens[i : i + n] and len(tokens[i : i + n]) == n:
                k += 1
            best = max(best, k)
    return best


@pytest.mark.parametrize("k", [2, 3])
def test_repeat_guard_stops_loops(k):
    model = FakeModel({}, default=LOOP)  # A forever
    looping = greedy_search(model, SRC3, opts(max_len_b=30))[0][0].tokens
    assert _longest_tandem(looping) == 30
    for result in (
        greedy_search(model, SRC3, opts(max_len_b=30, repeat_guard=k)),
        beam_search(model, SRC3, opts(beam=3, n_best=3, max_len_b=30, repeat_guard=k)),
    ):
        for h in result[0]:
            assert _longest_tandem(h.tokens) < k, h.tokens
    assert greedy_search(model, SRC3, opts(max_len_b=30, repeat_guard=3))[0][0].tokens[:3] == [A, A, B]


def test_repeat_guard_off_is_unchanged(transformer, batch):  # noqa: F811
    src, _ = batch
    assert_same(beam_search(transformer, src, real_opts(repeat_guard=0)), beam_search(transformer, src, real_opts()))


# ------------------------------------------------------------------------------ temperature 0


def test_temperature_zero_is_greedy(transformer, batch):  # noqa: F811
    src, _ = batch
    o = real_opts(beam=1, sample=True, temperature=0.0, n_best=2)
    result = sample(transformer, src, o)
    greedy = greedy_search(transformer, src, real_opts(beam=1))
    assert tokens_of([[h[0]] for h in result]) == tokens_of(greedy)
    assert all(len(h) == 2 and h[0].tokens == h[1].tokens for h in result)


# ------------------------------------------------------------------------------ alignments


def test_word_grouping_and_pharaoh():
    from seq2seq_cli.align import hard_alignment, pharaoh, word_attention, word_starts

    assert word_starts(["\u2581the", "\u2581ho", "use", "\u2581", "."]) == [0, 1, 1, 2, 2]
    assert word_starts(["ab", "\u2581c"]) == [0, 1]
    attn = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # 3 target x 3 source pieces
    m = word_attention(attn, [0, 1, 1], [0, 0, 1])  # target word 0 = pieces 0,1; source word 1 = pieces 1,2
    assert torch.allclose(m, torch.tensor([[0.4, 0.6], [0.1, 0.9]]))
    assert pharaoh(hard_alignment(m)) == "1-0 1-1"


# ------------------------------------------------------------------------------ command line


def _decode(e2e, tmp_path: Path, lines: list[str], *args: str) -> subprocess.CompletedProcess:
    src = tmp_path / "in.txt"
    src.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return subprocess.run(
        [*e2e.cli(), "decode", str(e2e.best), "-i", str(src), "--threads", "1", *args],
        capture_output=True,
        text=True,
        env=e2e.env(),
        timeout=300,
    )


LINES = ["one two three", "red house", "", "the king and the queen", "big water"]


@pytest.fixture(scope="module")
def plain_output(e2e, tmp_path_factory) -> str:
    res = _decode(e2e, tmp_path_factory.mktemp("plain"), LINES, "--beam", "4")
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_cli_constraints_all_appear_and_empty_ones_change_nothing(e2e, tmp_path, plain_output):
    cons = tmp_path / "cons.txt"
    wanted = [["fuego", "luz"], [], [], ["agua"], ["rey reina", "oscuro"]]
    cons.write_text("".join("\t".join(c) + "\n" for c in wanted), encoding="utf-8")
    res = _decode(e2e, tmp_path, LINES, "--beam", "4", "--constraints", str(cons))
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert len(out) == len(LINES) and out[2] == ""
    for line, phrases in zip(out, wanted):
        for p in phrases:
            assert p in line.split() or f" {p} " in f" {line} ", (line, p)
    assert out[1] == plain_output.splitlines()[1]  # no constraint on this line: the plain output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n" * len(LINES), encoding="utf-8")
    res = _decode(e2e, tmp_path, LINES, "--beam", "4", "--constraints", str(empty))
    assert res.returncode == 0 and res.stdout == plain_output  # byte for byte


def test_cli_glossary(e2e, tmp_path, plain_output):
    gloss = tmp_path / "terms.tsv"
    gloss.write_text("King\tfuego\nred house\tluz oscuro\nqueen\tagua\nkin\tblanco\n", encoding="utf-8")
    res = _decode(e2e, tmp_path, LINES, "--beam", "4", "--glossary", str(gloss))
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert "luz oscuro" in out[1] and "fuego" in out[3] and "agua" in out[3]
    assert out[0] == plain_output.splitlines()[0] and out[4] == plain_output.splitlines()[4]


def test_glossary_matching_is_case_insensitive_and_word_bounded(tmp_path):
    from seq2seq_cli.translate import glossary_constraints, read_glossary

    path = tmp_path / "terms.tsv"
    path.write_text("King\trey\nkin\tpariente\nNew  York\tNueva York\n\nC++\tC++\n", encoding="utf-8")
    g = read_glossary(path)
    assert glossary_constraints(g, "the KING's men") == ["rey"]
    assert glossary_constraints(g, "kinship, kingdom") == []
    assert glossary_constraints(g, "kin of the king") == ["rey", "pariente"]
    assert glossary_constraints(g, "from new york, and C++ code") == ["Nueva York", "C++"]
    assert glossary_constraints(g, "newyork") == []


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("cons.txt", "a\n\n\n", "cons.txt: has 3 lines but "),
        ("cons.txt", "a\n\n\n\n\n\n", "cons.txt: has 6 lines but "),
        ("cons.txt", "a\n\nb\t\tc\n\n\n", "cons.txt: line 3: empty constraint"),
        ("terms.tsv", "king\trey\nqueen reina\n", "terms.tsv: line 2: expected 'source term<TAB>target term'"),
    ],
)
def test_cli_bad_document_inputs(e2e, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    flag = "--glossary" if name.endswith(".tsv") else "--constraints"
    res = _decode(e2e, tmp_path, LINES, flag, str(path), "-o", str(tmp_path / "out.txt"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out.txt").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("a\n\n", "cons.txt: has 2 lines but the input has more (line 3 is missing)"),
        ("a\n\n\n\n\n\n", "cons.txt: has 6 lines but the input has 5"),
    ],
)
def test_cli_constraint_line_count_on_stdin(e2e, tmp_path, content, message):
    path = tmp_path / "cons.txt"
    path.write_text(content, encoding="utf-8")
    res = subprocess.run(
        [*e2e.cli(), "decode", str(e2e.best), "--threads", "1", "--constraints", str(path)],
        input="".join(x + "\n" for x in LINES),
        capture_output=True,
        text=True,
        env=e2e.env(),
        timeout=300,
    )
    assert res.returncode == 2 and message in res.stderr.strip().splitlines()[-1], res.stderr


def test_cli_prefix(e2e, tmp_path):
    greedy = _decode(e2e, tmp_path, LINES, "--beam", "1").stdout.splitlines()
    prefix = tmp_path / "prefix.txt"
    rows = ["rey", "", "", greedy[3].split()[0], "azul verde"]
    prefix.write_text("".join(x + "\n" for x in rows), encoding="utf-8")
    res = _decode(e2e, tmp_path, LINES, "--beam", "1", "--prefix", str(prefix))
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    for line, p in zip(out, rows):
        assert line.startswith(p)
    assert out[1] == greedy[1]
    assert out[3] == greedy[3]  # greedy: a prefix equal to the output's first word changes nothing


def test_cli_search_options_and_temperature_zero(e2e, tmp_path):
    res = _decode(e2e, tmp_path, LINES, "--sample", "--temperature", "0")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    greedy = _decode(e2e, tmp_path, LINES, "--beam", "1")
    assert res.stdout == greedy.stdout
    res = _decode(e2e, tmp_path, LINES, "--min-len", "6", "--no-repeat-ngram", "1", "--repeat-guard", "2")
    assert res.returncode == 0, res.stderr
    for line, src in zip(res.stdout.splitlines(), LINES):
        words = line.split()
        assert not src or len(words) == len(set(words))  # no repeated piece => no repeated word


def test_cli_align_format(e2e, tmp_path):
    res = _decode(e2e, tmp_path, LINES, "--beam", "2", "--align")
    assert res.returncode == 0, res.stderr
    for line, src in zip(res.stdout.splitlines(), LINES):
        text, links = line.split("\t")
        assert bool(src) == bool(text)
        pairs = [tuple(map(int, x.split("-"))) for x in links.split()]
        assert [t for _, t in pairs] == list(range(len(text.split())))  # one link per target word
        assert all(0 <= s < len(src.split()) for s, _ in pairs)
    res = _decode(e2e, tmp_path, LINES, "--beam", "2", "--n-best", "2", "--align")
    rows = [r.split("\t") for r in res.stdout.splitlines()]
    assert res.returncode == 0 and all(len(r) == 4 for r in rows) and len(rows) == 2 * 4 + 1  # empty: 1 row


@pytest.fixture(scope="module")
def copy_model():
    """A small Transformer trained here to copy its input (monotone), ~15 s on one thread."""
    from seq2seq_cli.model import build_model
    from seq2seq_cli.recipe import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, ff_dim=128, dropout=0.0)
    model = build_model(cfg, 24, 24, 0, 2, 3)
    adam = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(500):
        body = torch.randint(4, 24, (32, 6 + step % 5), generator=g)  # 6..10 tokens
        src = torch.cat([body, torch.full((32, 1), 3)], 1)
        tgt_in = torch.cat([torch.full((32, 1), 2), body], 1)
        loss = torch.nn.functional.cross_entropy(model(src, tgt_in).reshape(-1, 24), src.reshape(-1))
        adam.zero_grad()
        loss.backward()
        adam.step()
    return model.eval()


def test_alignment_of_a_copy_model_is_diagonal(copy_model):
    from types import SimpleNamespace

    from seq2seq_cli.align import align_batch

    g = torch.Generator().manual_seed(5)
    srcs = [(torch.randperm(20, generator=g)[:n] + 4).tolist() for n in (3, 6, 8, 10)]
    outs = greedy_search(copy_model, torch.tensor([srcs[-1] + [3]]), real_opts(beam=1))[0][0].tokens
    assert outs == srcs[-1]  # it learnt to copy
    one_piece_words = SimpleNamespace(eos_id=3, id_to_piece=lambda i, side: "\u2581w")
    links = align_batch(copy_model, one_piece_words, [s + [3] for s in srcs], srcs, torch.device("cpu"))
    assert links == [" ".join(f"{i}-{i}" for i in range(len(s))) for s in srcs]
    # pieces 4..11 continue a word: word-level links must still be diagonal
    multi = SimpleNamespace(eos_id=3, id_to_piece=lambda i, side: "w" if i < 12 else "\u2581w")
    srcs = [[12 + (i + j // 2) % 12 if j % 2 == 0 else 4 + (i + j) % 8 for j in range(8)] for i in range(4)]
    links = align_batch(copy_model, multi, [s + [3] for s in srcs], srcs, torch.device("cpu"))
    assert links == ["0-0 1-1 2-2 3-3"] * 4


def test_cli_unmet_constraints_are_counted_and_warned(e2e, tmp_path):
    cons = tmp_path / "cons.txt"
    cons.write_text("uno dos tres cuatro cinco seis\n" + "\n" * (len(LINES) - 1), encoding="utf-8")
    res = _decode(e2e, tmp_path, LINES, "--constraints", str(cons), "--max-len-a", "0", "--max-len-b", "3")
    assert res.returncode == 0, res.stderr
    assert "line 1: 1 of its 1 constraints not met" in res.stderr
    assert "1 lines did not meet all their constraints" in res.stderr
    assert len(res.stdout.splitlines()) == len(LINES)
