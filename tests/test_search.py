"""Search on a hand-built fake model (fixed probability tables) and on a small random Transformer."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import pydantic
import pytest
import torch

from seq2seq_cli.model import build_model
from seq2seq_cli.penalties import COVERAGE_FLOOR, length_penalty, rescore
from seq2seq_cli.recipe import DecodeConfig, ModelConfig, RecipeError, resolve_decode
from seq2seq_cli.search import Ensemble, Hypothesis, beam_search, greedy_search, sample, search, top_k_top_p_filter

PAD, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5
VOCAB = 6


# ------------------------------------------------------------------------------ the fake model


class FakeState:
    """One generated prefix per row; `select` copies rows like DecoderState.select."""

    def __init__(self, prefixes: list[tuple[int, ...]], src_mask: torch.Tensor, step: int = 0) -> None:
        self.prefixes, self.src_mask, self.step = prefixes, src_mask, step

    def select(self, index: torch.Tensor) -> "FakeState":
        return FakeState([self.prefixes[i] for i in index.tolist()], self.src_mask[index], self.step)


class FakeModel:
    """p(y | prefix) = table[prefix] (a {token: prob} dict, other tokens 0), else `default`.

    Attention at step j is one-hot on source position min(j, |X| - 1), so a hypothesis with |Y|
    tokens (EOS included) covers the first |Y| source tokens once each.
    """

    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(
        self,
        table: dict[tuple[int, ...], dict[int, float]],
        default: Optional[dict[int, float]] = None,
        max_positions: int = 64,
    ) -> None:
        self.table, self.default = table, default or {EOS: 0.97, A: 0.01, B: 0.01, C: 0.01}
        self.cfg = SimpleNamespace(max_positions=max_positions)
        self.calls = 0

    def start(self, src: torch.Tensor) -> FakeState:
        return FakeState([()] * src.size(0), src.ne(PAD))

    def _row(self, prefix: tuple[int, ...]) -> list[float]:
        probs = self.table.get(prefix, self.default)
        return [probs.get(tok, 0.0) for tok in range(VOCAB)]

    def step(self, tokens: torch.Tensor, state: FakeState, need_attention: bool = False):
        self.calls += 1
        if state.step > 0:
            state.prefixes = [p + (t,) for p, t in zip(state.prefixes, tokens.tolist())]
        log_probs = torch.tensor([self._row(p) for p in state.prefixes]).log()  # (N, V)
        attn = None
        if need_attention:
            pos = (state.src_mask.sum(1) - 1).clamp(max=state.step)  # (N,)
            attn = torch.nn.functional.one_hot(pos, state.src_mask.size(1)).float()  # (N, S)
        state.step += 1
        return log_probs, attn


# greedy takes A (0.6) then A (0.4) then EOS: 0.6*0.4*0.97 = 0.2328; but B EOS has 0.4*0.9 = 0.36
GREEDY_TRAP = {(): {A: 0.6, B: 0.4}, (A,): {A: 0.4, B: 0.3, EOS: 0.3}, (B,): {EOS: 0.9, A: 0.05, B: 0.05}}
# short [] has p = 0.55; long [A, A] has p = 0.44 * 0.9 * 0.92 = 0.36432
SHORT_OR_LONG = {
    (): {EOS: 0.55, A: 0.44, B: 0.01},
    (A,): {A: 0.9, EOS: 0.06, B: 0.04},
    (A, A): {EOS: 0.92, A: 0.04, B: 0.04},
}
# EOS ranks second at step 0: beam 1 must not keep it (greedy gives A B = 0.6 * 0.5 * 0.9 = 0.27 < 0.4)
EOS_SECOND = {(): {A: 0.6, EOS: 0.4}, (A,): {B: 0.5, EOS: 0.3, A: 0.2}, (A, B): {EOS: 0.9, A: 0.1}}
LOOP = {A: 0.7, B: 0.2, EOS: 0.1}  # as a default: A forever unless stopped
SRC3 = torch.tensor([[7, 7, 7]])


def opts(**kw) -> DecodeConfig:
    """Exact stopping unless a test asks otherwise: the fake-model tests check search optimality."""
    base = dict(beam=2, alpha=0.0, beta=0.0, max_len_a=0.0, max_len_b=10, stop_early=False)
    if kw.get("n_best", 1) > kw.get("beam", base["beam"]):  # beyond the user-facing bound: every finished one
        return DecodeConfig.model_construct(**{**DecodeConfig().model_dump(), **base, **kw})
    return DecodeConfig(**{**base, **kw})


def tokens_of(result: list[list[Hypothesis]]) -> list[list[list[int]]]:
    return [[h.tokens for h in hyps] for hyps in result]


def assert_same(r1: list[list[Hypothesis]], r2: list[list[Hypothesis]], tol: float = 1e-4) -> None:
    assert tokens_of(r1) == tokens_of(r2)
    for h1, h2 in zip(sum(r1, []), sum(r2, [])):
        assert h1.score == pytest.approx(h2.score, abs=tol)
        assert h1.log_prob == pytest.approx(h2.log_prob, abs=tol)


# ------------------------------------------------------------------------------ options


def test_resolve_decode_precedence_and_one_validation():
    """command line > recipe keys given explicitly > stored (tuned) values > defaults."""
    stored = DecodeConfig(beam=6, alpha=1.0, batch_tokens=999)
    recipe = DecodeConfig.model_validate({"alpha": 0.2})  # only alpha written in the recipe
    assert recipe.model_fields_set == {"alpha"}
    got = resolve_decode(stored, recipe, {"beam": 3, "beta": None})
    assert (got.beam, got.alpha, got.batch_tokens, got.beta) == (3, 0.2, 999, 0.0)
    assert resolve_decode(stored) == stored
    with pytest.raises(RecipeError, match=r"^decode: n_best \(4\) must not exceed beam \(3\)$"):
        resolve_decode(stored, None, {"beam": 3, "n_best": 4})
    with pytest.raises(RecipeError, match=r"^--beam: Input should be greater than or equal to 1 \(got 0\)$"):
        resolve_decode(stored, None, {"beam": 0})
    with pytest.raises(RecipeError, match="unknown decoding option"):
        resolve_decode(stored, None, {"bean": 3})
    with pytest.raises(pydantic.ValidationError):  # frozen: nothing downstream can change it
        got.beam = 2  # type: ignore[misc]


# ------------------------------------------------------------------------------ fake-model tests


def test_beam_finds_more_probable_sequence_than_greedy():
    model = FakeModel(GREEDY_TRAP)
    g = greedy_search(model, SRC3, opts())[0][0]
    assert g.tokens == [A, A] and g.log_prob == pytest.approx(math.log(0.6 * 0.4 * 0.97), abs=1e-6)
    b = beam_search(model, SRC3, opts(beam=2))[0][0]
    assert b.tokens == [B] and b.log_prob == pytest.approx(math.log(0.36), abs=1e-6)
    assert b.score == pytest.approx(b.log_prob)  # alpha = beta = 0: score is the raw log-prob


def test_early_stop_when_no_open_beam_can_win():
    model = FakeModel(GREEDY_TRAP)
    beam_search(model, SRC3, opts(beam=2, max_len_b=10))
    # step 0 (A, B open), step 1 (B EOS = 0.36 finishes; best open A A = 0.24 < 0.36): stop
    assert model.calls == 2


def test_stop_early_ends_a_sentence_at_beam_finished_hypotheses():
    # SHORT_OR_LONG with alpha = 2 prefers the long [A, A]; with beam 2 the short [] (step 0) and
    # [A] (step 1) finish first, so fairseq's rule stops after two steps and misses [A, A]
    exact_model, early_model = FakeModel(SHORT_OR_LONG), FakeModel(SHORT_OR_LONG)
    exact = beam_search(exact_model, SRC3, opts(beam=2, alpha=2.0))[0][0]
    early = beam_search(early_model, SRC3, opts(beam=2, n_best=2, alpha=2.0, stop_early=True))[0]
    assert exact.tokens == [A, A] and exact_model.calls == 3
    assert early_model.calls == 2 and sorted(h.tokens for h in early) == [[], [A]]
    # both rank what they found by the same penalised score
    assert early[0].score == max(h.score for h in early)


@pytest.mark.parametrize("table", [GREEDY_TRAP, SHORT_OR_LONG, EOS_SECOND, {}])
def test_beam_one_equals_greedy_on_fake(table):
    model = FakeModel(table, default=LOOP if not table else None)
    o = opts(beam=1, max_len_b=6)
    assert_same(beam_search(model, SRC3, o), greedy_search(model, SRC3, o))


def test_pad_and_bos_are_never_generated():
    model = FakeModel({(): {PAD: 0.5, BOS: 0.3, A: 0.2}})
    for result in (greedy_search(model, SRC3, opts()), beam_search(model, SRC3, opts(n_best=2))):
        assert result[0][0].tokens == [A] and result[0][0].log_prob == pytest.approx(math.log(0.2 * 0.97))
        assert all(PAD not in h.tokens and BOS not in h.tokens for h in result[0])


def test_alpha_switches_short_to_long():
    model = FakeModel(SHORT_OR_LONG)
    assert beam_search(model, SRC3, opts(alpha=0.0))[0][0].tokens == []
    long = beam_search(model, SRC3, opts(alpha=2.0))[0][0]
    assert long.tokens == [A, A]
    assert long.score == pytest.approx(math.log(0.44 * 0.9 * 0.92) / (8 / 6) ** 2, abs=1e-6)
    power = beam_search(model, SRC3, opts(alpha=1.0, length_penalty="power"))[0][0]
    assert power.tokens == [A, A] and power.score == pytest.approx(math.log(0.36432) / 3, abs=1e-6)


def test_coverage_penalty_prefers_covering_hypothesis_and_ignores_padding():
    model = FakeModel(SHORT_OR_LONG)
    src = torch.tensor([[7, 7, 7, PAD, PAD]])  # 3 real tokens: [A, A] + EOS covers all of them
    assert beam_search(model, src, opts(beta=0.0))[0][0].tokens == []
    hyps = beam_search(model, src, opts(beta=0.2, n_best=10))[0]  # every finished hypothesis
    assert hyps[0].tokens == [A, A] and hyps[0].score == pytest.approx(hyps[0].log_prob, abs=1e-6)
    empty = next(h for h in hyps if h.tokens == [])  # covers 1 of 3 real tokens; the pads do not count
    assert empty.score == pytest.approx(math.log(0.55) + 0.2 * 2 * math.log(COVERAGE_FLOOR), rel=1e-5)


def test_min_len_forbids_early_eos():
    model = FakeModel({})  # EOS 0.97 everywhere
    assert greedy_search(model, SRC3, opts())[0][0].tokens == []
    o = opts(min_len=3, n_best=2)
    for result in (greedy_search(model, SRC3, o), beam_search(model, SRC3, o)):
        assert all(len(h.tokens) >= 3 for h in result[0])
        assert len(result[0][0].tokens) == 3


def test_max_len_forces_eos_and_counts_it():
    model = FakeModel({}, default=LOOP)
    src = torch.tensor([[7, 7, 7, PAD, PAD]])  # |X| = 3 real tokens
    g = greedy_search(model, src, opts(max_len_a=1.0, max_len_b=1))[0][0]  # 1.0 * 3 + 1 = 4
    assert g.tokens == [A] * 4 and g.log_prob == pytest.approx(4 * math.log(0.7) + math.log(0.1), abs=1e-5)
    o = opts(max_len_a=1.0, max_len_b=1, alpha=2.0, length_penalty="power", n_best=2)
    hyps = beam_search(model, src, o)[0]
    assert hyps[0].tokens == [A] * 4 and all(len(h.tokens) <= 4 for h in hyps)


def test_max_len_capped_by_max_positions():
    model = FakeModel({}, default=LOOP, max_positions=4)
    assert greedy_search(model, SRC3, opts(max_len_b=100))[0][0].tokens == [A] * 3
    assert all(len(h.tokens) <= 3 for h in beam_search(model, SRC3, opts(max_len_b=100, n_best=2))[0])


def _has_repeat(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_no_repeat_ngram():
    model = FakeModel({}, default=LOOP)
    assert _has_repeat(greedy_search(model, SRC3, opts(max_len_b=8))[0][0].tokens, 2)
    assert greedy_search(model, SRC3, opts(max_len_b=8, no_repeat_ngram=2))[0][0].tokens == [A, A, B, A]
    assert greedy_search(model, SRC3, opts(max_len_b=8, no_repeat_ngram=1))[0][0].tokens == [A, B]
    hyps = beam_search(model, SRC3, opts(beam=3, n_best=3, max_len_b=8, alpha=1.0, no_repeat_ngram=2))[0]
    assert not any(_has_repeat(h.tokens, 2) for h in hyps)


def test_n_best_sorted_and_first_is_one_best_on_fake():
    model = FakeModel(SHORT_OR_LONG)
    hyps = beam_search(model, SRC3, opts(beam=3, n_best=3, alpha=2.0))[0]
    assert len(hyps) == 3 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert hyps[0].tokens == beam_search(model, SRC3, opts(beam=3, alpha=2.0))[0][0].tokens


FIRST_TOKEN = {(): {A: 0.5, B: 0.3, C: 0.2}}


def _first_tokens(top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    model = FakeModel(FIRST_TOKEN, default={EOS: 1.0})
    src = SRC3.repeat(300, 1)
    result = sample(model, src, opts(sample=True, top_k=top_k, top_p=top_p, seed=seed))
    return [hyps[0].tokens[0] for hyps in result]


def test_sampling_filters():
    assert set(_first_tokens()) == {A, B, C}
    assert set(_first_tokens(top_k=2)) == {A, B}
    assert set(_first_tokens(top_p=0.6)) == {A, B}  # 0.5 < 0.6 <= 0.5 + 0.3
    assert set(_first_tokens(top_p=0.45)) == {A}


def test_top_k_top_p_filter_keeps_at_least_one():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert torch.isfinite(top_k_top_p_filter(logits, 0, 1e-9)).tolist() == [[False, True, False]]
    assert torch.isfinite(top_k_top_p_filter(logits, 2, 1.0)).tolist() == [[False, True, True]]


def test_sampling_seeded():
    assert _first_tokens(seed=3) == _first_tokens(seed=3)
    assert _first_tokens(seed=3) != _first_tokens(seed=4)


def test_sampling_n_best_sorted():
    model = FakeModel({}, default=LOOP)
    hyps = sample(model, SRC3, opts(sample=True, n_best=5, max_len_b=6))[0]
    assert len(hyps) == 5 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_search_dispatch():
    model = FakeModel(GREEDY_TRAP)
    assert search(model, SRC3, opts(beam=1))[0][0].tokens == [A, A]
    assert search(model, SRC3, opts(beam=2))[0][0].tokens == [B]
    assert search(model, SRC3, opts(sample=True, top_k=1))[0][0].tokens == [A, A]


# ------------------------------------------------------------------------------ the real Transformer


def _eos_boosted_model(seed: int, cfg: ModelConfig, vocab: int, boost: float):
    """A random model whose EOS embedding is scaled up, so hypotheses end at varied lengths
    (with the plain init every output runs to max_len and early finishing goes untested)."""
    torch.manual_seed(seed)
    model = build_model(cfg, vocab, vocab, 0, 2, 3).eval()
    with torch.no_grad():
        model.tgt_embed.weight[3] *= boost
    return model


def _random_sources(lengths: list[int], vocab: int, seed: int) -> torch.Tensor:
    """(len(lengths), max length) source ids, padded with 0, drawn from the non-special ids."""
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(4, vocab, (n,), generator=g)
    return src


@pytest.fixture(scope="module")
def transformer():
    cfg = ModelConfig(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, ff_dim=64, dropout=0.0)
    return _eos_boosted_model(0, cfg, 40, 10.0)


@pytest.fixture(scope="module")
def batch():
    lengths = [7, 3, 9, 1, 5]
    return _random_sources(lengths, 40, 1), lengths


def real_opts(**kw) -> DecodeConfig:
    return DecodeConfig(**{**dict(beam=4, alpha=0.6, max_len_a=1.5, max_len_b=5), **kw})


def test_beam_one_equals_greedy_on_transformer(transformer, batch):
    src, _ = batch
    o = real_opts(beam=1, alpha=0.0)
    assert_same(beam_search(transformer, src, o), greedy_search(transformer, src, o))


@pytest.mark.parametrize(
    "kw", [dict(beam=1), dict(beam=4), dict(beam=4, beta=0.3, n_best=2)], ids=["greedy", "beam4", "beam4-coverage"]
)
def test_batch_invariance(transformer, batch, kw):
    src, lengths = batch
    o = real_opts(**kw)
    together = search(transformer, src, o)
    alone = [search(transformer, src[i : i + 1, :n], o)[0] for i, n in enumerate(lengths)]
    assert_same(together, alone)


def _teacher_forced(model, src_row: torch.Tensor, tokens: list[int]) -> tuple[float, torch.Tensor]:
    """Summed log-prob of tokens + EOS and the summed attention (1, S), one step at a time."""
    state, total, coverage = model.start(src_row), 0.0, torch.zeros(src_row.shape)
    with torch.no_grad():
        for prev, nxt in zip([model.bos_id] + tokens, tokens + [model.eos_id]):
            lp, attn = model.step(torch.tensor([prev]), state, True)
            total, coverage = total + lp[0, nxt].item(), coverage + attn
    return total, coverage


@pytest.mark.parametrize("kw", [dict(beam=4, beta=0.3, n_best=4), dict(beam=1, beta=0.3)], ids=["beam", "greedy"])
def test_scores_match_teacher_forced_rescoring(transformer, batch, kw):
    """log_prob and coverage must follow the back-pointers: recompute every hypothesis from scratch."""
    src, lengths = batch
    o = real_opts(**kw)
    for i, hyps in enumerate(search(transformer, src, o)):
        row = src[i : i + 1, : lengths[i]]
        for h in hyps:
            log_prob, coverage = _teacher_forced(transformer, row, h.tokens)
            expected = rescore(
                torch.tensor([log_prob]), torch.tensor([len(h.tokens) + 1]), coverage, row.ne(0), o.alpha, o.beta
            ).item()
            assert h.log_prob == pytest.approx(log_prob, abs=1e-4)
            assert h.score == pytest.approx(expected, abs=1e-4)


def test_n_best_on_transformer(transformer, batch):
    src, _ = batch
    nbest = beam_search(transformer, src, real_opts(n_best=4))
    one = beam_search(transformer, src, real_opts(n_best=1))
    for hyps, best in zip(nbest, one):
        assert len(hyps) == 4 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert hyps[0].tokens == best[0].tokens and hyps[0].score == pytest.approx(best[0].score, abs=1e-5)


def test_max_len_on_transformer(transformer, batch):
    src, lengths = batch
    results = beam_search(transformer, src, real_opts(n_best=4))
    lens = [(len(h.tokens), int(1.5 * n + 5)) for hyps, n in zip(results, lengths) for h in hyps]
    assert all(got <= cap for got, cap in lens)
    assert any(got == cap for got, cap in lens) and any(got < cap for got, cap in lens)  # both endings occur


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)])
def test_degenerate_sampling_equals_greedy(transformer, batch, kw):
    src, _ = batch
    o = real_opts(beam=1, sample=True, **kw)
    assert_same(sample(transformer, src, o), greedy_search(transformer, src, o))


def test_sampling_differs_from_greedy_at_high_temperature(transformer, batch):
    src, _ = batch
    o = real_opts(beam=1, sample=True, temperature=2.0)
    assert tokens_of(sample(transformer, src, o)) != tokens_of(greedy_search(transformer, src, o))


# ------------------------------------------------------------------------------ ensembles


def test_ensemble_of_one_and_of_two_copies_equals_the_model(transformer, batch):
    src, _ = batch
    o = real_opts(beta=0.3, n_best=2)
    alone = beam_search(transformer, src, o)
    assert_same(beam_search(Ensemble([transformer]), src, o), alone)
    assert_same(beam_search(Ensemble([transformer, transformer]), src, o), alone)


def test_ensemble_step_is_renormalised_mean_of_log_probs(transformer, batch):
    src, _ = batch
    torch.manual_seed(5)
    other = build_model(transformer.cfg, 40, 40, 0, 2, 3).eval()
    ens = Ensemble([transformer, other])
    tokens = torch.full((src.size(0),), 2)
    with torch.no_grad():
        lp, attn = ens.step(tokens, ens.start(src), need_attention=True)
        lp1, a1 = transformer.step(tokens, transformer.start(src), True)
        lp2, a2 = other.step(tokens, other.start(src), True)
    assert torch.allclose(lp, ((lp1 + lp2) / 2).log_softmax(-1), atol=1e-6)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(src.size(0)), atol=1e-5)
    assert torch.allclose(attn, (a1 + a2) / 2, atol=1e-6)


def test_ensemble_rejects_mismatched_special_ids(transformer):
    other = build_model(transformer.cfg, 40, 40, 0, 1, 3)
    with pytest.raises(ValueError, match="ids"):
        Ensemble([transformer, other])


def _reference_beam(model, src_row: torch.Tensor, o: DecodeConfig) -> list[tuple[list[int], float]]:
    """Beam search written as plainly as possible, for one sentence: every open hypothesis is
    re-scored by a full teacher-forced forward pass (no cache, no batching, no reordering), the 2k
    best of its k*V continuations are ranked in Python, an EOS among the first k finishes (scored
    log P / lp(|Y|), |Y| counting EOS), the k best others stay open; only EOS at max_len; stop at
    k finished. Returns (tokens, score) of every finished hypothesis, best first."""
    k, eos = o.beam, model.eos_id
    max_len = min(int(o.max_len_a * int(src_row.ne(PAD).sum()) + o.max_len_b), model.cfg.max_positions - 1)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    t = 0
    while beams and len(finished) < k and t <= max_len:
        cands = []
        for toks, score in beams:
            with torch.no_grad():
                lp = model(src_row, torch.tensor([[model.bos_id] + toks])).float().log_softmax(-1)[0, -1]
            lp[model.pad_id] = lp[model.bos_id] = -math.inf
            if t >= max_len:
                lp = torch.where(torch.arange(lp.numel()) == eos, lp, torch.tensor(-math.inf))
            cands += [(score + float(x), toks, v) for v, x in enumerate(lp.tolist())]
        cands.sort(key=lambda c: -c[0])
        beams = []
        for rank, (score, toks, v) in enumerate(cands[: 2 * k]):
            if score == -math.inf:
                break
            if v == eos:
                if rank < k:
                    lp_y = float(length_penalty(torch.tensor(float(len(toks) + 1)), o.alpha, o.length_penalty))
                    finished.append((toks, score / lp_y))
            elif len(beams) < k:
                beams.append((toks + [v], score))
        t += 1
    return sorted(finished, key=lambda h: -h[1])


@pytest.mark.parametrize("kw", [dict(beam=4, n_best=2), dict(beam=3, alpha=0.0), dict(beam=5, length_penalty="power")])
def test_beam_search_equals_a_plain_reference(transformer, batch, kw):
    """The batched search (beams kept in their own slots, caches reordered and compacted in place,
    finished sentences' holes filled from the end, each row's top 2k ranked first) must find
    exactly what the plain per-sentence reference finds, with the same scores."""
    src, lengths = batch
    o = real_opts(**kw)
    got = beam_search(transformer, src, o)
    for i, n in enumerate(lengths):
        ref = _reference_beam(transformer, src[i : i + 1, :n], o)[: o.n_best]
        assert [h.tokens for h in got[i]] == [toks for toks, _ in ref], i
        for h, (_, score) in zip(got[i], ref):
            assert h.score == pytest.approx(score, abs=1e-4)


def test_keep_own_slots_puts_each_rows_best_child_back_in_its_slot():
    """Hand-worked: sentence 0 (rows 0-3) keeps children of rows 2, 2, 0, 3 (best first); row 2's
    best child and the children of rows 0 and 3 stay in their slots, row 2's second child takes
    the freed slot 1. Sentence 1 (rows 4-7): all four children of row 4, which keep rank order."""
    from seq2seq_cli.search import _keep_own_slots

    rows = torch.tensor([[2, 2, 0, 3], [4, 4, 4, 4]])
    perm = _keep_own_slots(rows, 4)
    assert perm.tolist() == [[2, 1, 0, 3], [0, 1, 2, 3]]
    placed = rows.gather(1, perm)
    assert placed.tolist() == [[0, 2, 2, 3], [4, 4, 4, 4]]
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):  # any back-pointers: a permutation, and no surviving row leaves its slot
        k, a = 5, 7
        rows = torch.arange(a)[:, None] * k + torch.randint(0, k, (a, k), generator=gen)
        perm = _keep_own_slots(rows, k)
        assert torch.equal(perm.sort(1).values, torch.arange(k).expand(a, k))
        placed = rows.gather(1, perm).view(-1)
        survivors = set(rows.view(-1).tolist())
        assert all(placed[r] == r for r in survivors)
        assert int((placed != torch.arange(a * k)).sum()) == a * k - len(survivors)  # only extra children move


def test_fill_holes_moves_only_the_tail_into_the_holes():
    from seq2seq_cli.search import _fill_holes

    keep = torch.tensor([True, False, True, False, True, True, False])
    assert _fill_holes(keep).tolist() == [0, 4, 2, 5]
    assert _fill_holes(torch.tensor([True, True])).tolist() == [0, 1]
    assert _fill_holes(torch.tensor([False, False])).tolist() == []
    gen = torch.Generator().manual_seed(4)
    for _ in range(50):
        keep = torch.rand(9, generator=gen) < 0.5
        order = _fill_holes(keep)
        assert sorted(order.tolist()) == keep.nonzero().squeeze(1).tolist()
        assert all(order[i] == i for i in range(order.numel()) if keep[i])


@pytest.fixture(scope="module")
def wide_transformer():
    """The default recipe's widths (256, 4 heads of 64, FFN 1024) with one layer each and 512 pieces:
    shapes whose bf16 products oneDNN computes row by row the same whatever the batch."""
    cfg = ModelConfig(d_model=256, n_heads=4, n_encoder_layers=1, n_decoder_layers=1, ff_dim=1024, dropout=0.0)
    return _eos_boosted_model(2, cfg, 512, 12.0)


@pytest.mark.parametrize("beam", [1, 4])
def test_bf16_matmul_decoding_is_bitwise_batch_invariant(wide_transformer, beam):
    """bf16-matmul decoding gives a sentence the same numbers, to the last bit, alone and in a
    batch with sources of other lengths (1 to 71 pieces: across the 32-key padding blocks), so
    tokens and scores agree exactly. Without the source padding to whole key blocks, or with a
    lone-row product, rows differ (measured on the Bible model: 4 of 150 lines)."""
    import copy

    from seq2seq_cli.precision import bf16_matmuls, native_bf16
    from seq2seq_cli.translate import plan_bf16_matmul, set_precision

    if not native_bf16():
        pytest.skip("bf16 is emulated on this CPU: auto never picks bf16-matmul here")
    plan = plan_bf16_matmul(wide_transformer, beam)
    if plan.problem:  # then auto decodes in fp32 on this CPU (test_translate checks that fallback)
        pytest.skip(f"this CPU's bf16 products are not row-invariant for these shapes: {plan.problem}")
    model = set_precision(copy.deepcopy(wide_transformer), "bf16-matmul", torch.device("cpu"), plan.bf16_layers)
    lengths = [1, 3, 17, 29, 32, 33, 44, 64, 71]
    src = _random_sources(lengths, 512, 5)
    o = real_opts(beam=beam, max_len_a=0.5, max_len_b=8)
    with bf16_matmuls():
        together = search(model, src, o)
        alone = [search(model, src[i : i + 1, :n], o)[0] for i, n in enumerate(lengths)]
    assert tokens_of(together) == tokens_of(alone)
    assert [h.score for hs in together for h in hs] == [h.score for hs in alone for h in hs]
    assert len({len(h[0].tokens) for h in together}) > 2  # varied lengths, not all cut at the limit


def test_bf16_matmul_encoding_pads_sources_to_whole_key_blocks(wide_transformer):
    """The source keys are padded to multiples of 32 before encoding under bf16 attention products:
    a 44-piece sentence's cross-attention keys are then the same bits alone and beside a 71-piece
    one (unpadded, the 44- and 71-key products sum in different blocks: measured to differ)."""
    import copy

    from seq2seq_cli.model import KEY_BLOCK
    from seq2seq_cli.precision import bf16_matmuls, native_bf16
    from seq2seq_cli.translate import set_precision

    if not native_bf16():
        pytest.skip("bf16 is emulated on this CPU")
    model = set_precision(copy.deepcopy(wide_transformer), "bf16-matmul", torch.device("cpu"))
    src = _random_sources([44, 71], 512, 6)
    with torch.inference_mode(), bf16_matmuls():
        together, alone = model.start(src), model.start(src[:1, :44])
    assert together.memory_mask.size(1) % KEY_BLOCK == 0 and alone.memory_mask.size(1) == 64
    for (kb, vb), (ka, va) in zip(together.cross_kv, alone.cross_kv):
        assert torch.equal(kb[0, :, :44], ka[0, :, :44]) and torch.equal(vb[0, :, :44], va[0, :, :44])


def test_row_topk_equals_topk():
    """The chunked pre-selection returns topk's values exactly (and its indices where values are
    distinct), also with -inf (forbidden tokens), rows of equal values and a fall-back shape."""
    from seq2seq_cli.search import _row_topk

    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 8000, generator=g).log_softmax(-1)
    x[:5, ::3] = -math.inf
    x[5] = -math.inf
    x[6, 100:200] = 5.0  # a tie across chunks
    for k in (1, 2, 10):
        values, index = _row_topk(x, k)
        ref = x.topk(k, dim=1)
        assert torch.equal(values, ref.values)
        assert torch.equal(x.gather(1, index), values)  # the indices point at those values
        assert torch.equal(index[7:], ref.indices[7:])  # distinct values: the same indices
    odd = torch.randn(3, 1001, generator=g)
    assert torch.equal(_row_topk(odd, 4)[1], odd.topk(4, dim=1).indices)
