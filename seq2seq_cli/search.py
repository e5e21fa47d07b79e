"""Decoding: greedy search, batched beam search with GNMT penalties, sampling, and ensembles.

Search sees a model only through the `Seq2SeqDecoder` protocol (start / step / state.select and the
special ids), so tests can drive it with a fake model whose log-probs come from fixed tables.

Conventions (shared with `penalties.py`):
  * Hypothesis tokens exclude BOS and EOS; the length |Y| counts the tokens plus EOS.
  * max_len = min(int(max_len_a * |X| + max_len_b), max_positions - 1) tokens, |X| = real source
    tokens; at step max_len only EOS is allowed (forced; its log-prob counts). EOS is forbidden
    while fewer than min_len tokens exist (max_len wins a conflict). PAD and BOS are never generated.
  * Beam search prunes open beams by their RAW summed log-prob (fairseq style). The penalties,
    s(Y, X) = log P(Y|X) / lp(Y) + cp(X; Y), rank only finished hypotheses, applied once when a
    hypothesis emits EOS, so no score ever needs "unnormalising".
  * Every decision is per sentence (top-k over the sentence's own k*V candidates, per-sentence
    stopping): a sentence's output does not depend on the other sentences in its batch.

The settings are a `recipe.DecodeConfig` (its speed-only fields batch_tokens, workers and
precision are read by `translate_ids` and the Translator, not by the search itself).
`translate_ids` is the batched entry point shared by decoding and training's validation.
  * Per-sentence extras, passed as arguments (not options): `constraints` (target phrases as
    token ids that must appear; beam search only, see constraints.py) and `prefixes` (target
    tokens forced at the first steps, their log-probs counted; max_len is raised to fit them).
  * opts.repeat_guard = k > 0 forbids a token that would make the output end with the same
    n-gram (n = 1..REPEAT_GUARD_MAX_N pieces) k times in a row ("a a a" for k = 3, n = 1;
    "x y x y x y" for n = 2): a hard stop for looping outputs, milder than no_repeat_ngram.
  * Sampling with temperature 0 is greedy decoding (argmax of the filtered distribution).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .constraints import ConstraintBeams, as_constraint_beams, check_constraints, order_candidates
from .data import length_batches, pad_rows
from .penalties import length_penalty, rescore
from .recipe import DecodeConfig

__all__ = [
    "Seq2SeqDecoder",
    "Hypothesis",
    "translate_ids",
    "batch_by_tokens",
    "greedy_search",
    "beam_search",
    "sample",
    "search",
    "top_k_top_p_filter",
    "Ensemble",
    "EnsembleState",
]

NEG_INF = float("-inf")
REPEAT_GUARD_MAX_N = 8


class DecoderStateLike(Protocol):
    """Per-row decoding state: `select(index)` returns a new state made of rows `index`."""

    @property
    def src_mask(self) -> Tensor: ...  # (N, S) True at real source tokens

    def select(self, index: Tensor) -> "DecoderStateLike": ...


class _Limits(Protocol):
    @property
    def max_positions(self) -> int: ...


class Seq2SeqDecoder(Protocol):
    """What search needs from a model (Seq2SeqTransformer and Ensemble satisfy it)."""

    pad_id: int
    bos_id: int
    eos_id: int

    @property
    def cfg(self) -> _Limits: ...

    def start(self, src: Tensor) -> DecoderStateLike: ...  # src (B, S) → a state with B rows

    def step(
        self, tokens: Tensor, state: Any, need_attention: bool
    ) -> tuple[
        Tensor, Optional[Tensor]
    ]: ...  # tokens (N,) → log_probs (N, V), attention (N, S) or None; advances `state`


@dataclass
class Hypothesis:
    """One output: tokens without BOS/EOS, final rescored score, summed log-prob (EOS included),
    and how many of its sentence's constraints it misses (0 unless max_len cut it short)."""

    tokens: list[int]
    score: float
    log_prob: float
    unmet: int = 0


# ------------------------------------------------------------------------------ shared steps


def _max_lengths(
    src_mask: Tensor, opts: DecodeConfig, model: Seq2SeqDecoder, at_least: Optional[Tensor] = None
) -> Tensor:
    """(N,) max_len = min(int(max_len_a * |X| + max_len_b), max_positions - 1) per row, raised to
    at_least (N,) (the forced prefix lengths, which are cut to max_positions - 1)."""
    cap = model.cfg.max_positions - 1
    lengths = [min(int(opts.max_len_a * n + opts.max_len_b), cap) for n in src_mask.sum(1).tolist()]
    out = torch.tensor(lengths, dtype=torch.long, device=src_mask.device)
    return out if at_least is None else torch.maximum(out, at_least)


class _Prefixes:
    """Forced target prefixes of a batch: tokens (B, L) padded with -1, lengths (B,)."""

    def __init__(self, prefixes: Sequence[Sequence[int]], cap: int, device: torch.device) -> None:
        cut = [list(p)[:cap] for p in prefixes]
        width = max((len(p) for p in cut), default=0)
        self.tokens = torch.full((len(cut), max(width, 1)), -1, dtype=torch.long, device=device)
        for i, p in enumerate(cut):
            self.tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.lengths = torch.tensor([len(p) for p in cut], dtype=torch.long, device=device)
        self.width = width

    def at(self, t: int, sent: Tensor) -> Optional[Tensor]:
        """(N,) the token forced at step t for rows of sentences `sent` (-1 = free), or None."""
        return self.tokens[sent, t] if t < self.width else None


def _make_prefixes(
    prefixes: Optional[Sequence[Sequence[int]]], model: Seq2SeqDecoder, src: Tensor
) -> Optional[_Prefixes]:
    if prefixes is None or not any(len(p) for p in prefixes):
        return None
    if len(prefixes) != src.size(0):
        raise ValueError(f"{len(prefixes)} prefixes for {src.size(0)} sentences")
    return _Prefixes(prefixes, model.cfg.max_positions - 1, src.device)


def _guard_repeats(log_probs: Tensor, history: Tensor, k: int) -> Tensor:
    """Forbid (-inf) each token that would make the history end with one n-gram repeated k times
    in a row, n = 1..REPEAT_GUARD_MAX_N. log_probs (N, V) in place; history (N, t).

    Appending y repeats an n-gram k times iff the last k*n - 1 tokens have period n and y equals
    the token n positions back."""
    t = history.size(1)
    if k <= 1:
        return log_probs
    for n in range(1, REPEAT_GUARD_MAX_N + 1):
        span = k * n - 1
        if span > t:
            break
        tail = history[:, t - span :]  # (N, span)
        if span > n:
            periodic = (tail[:, :-n] == tail[:, n:]).all(1)  # (N,)
        else:  # k = 1 never gets here; k*n - 1 == n only for k = 2, n = 1: "a" + "a" repeats
            periodic = torch.ones(tail.size(0), dtype=torch.bool, device=tail.device)
        if bool(periodic.any()):
            rows = periodic.nonzero().squeeze(1)
            log_probs[rows, history[rows, t - n]] = NEG_INF
    return log_probs


def _ban_repeats(log_probs: Tensor, history: Tensor, n: int) -> Tensor:
    """Forbid (-inf) each token that would complete an n-gram already present in the history.

    log_probs (N, V) is changed in place; history (N, t) holds the generated tokens.
    """
    t = history.size(1)
    if n <= 0 or t < n:
        return log_probs
    grams = history.unfold(1, n, 1)  # (N, t-n+1, n)
    prefix = history[:, t - n + 1 :]  # (N, n-1): the n-1 latest tokens
    match = (grams[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, t-n+1)
    banned = torch.zeros_like(log_probs).scatter_add_(1, grams[:, :, -1], match.float())  # (N, V)
    return log_probs.masked_fill_(banned > 0, NEG_INF)


def _constrain(
    log_probs: Tensor,
    history: Tensor,
    max_len: Tensor,
    opts: DecodeConfig,
    model: Seq2SeqDecoder,
    forced: Optional[Tensor] = None,
) -> Tensor:
    """Apply the generation rules at step t = history.size(1) to log_probs (N, V), in place:
    no PAD/BOS; no EOS while t < min_len; no repeated n-gram; no k-fold tandem repeat; only EOS
    once t >= max_len (N,); then, where forced (N,) is >= 0, only the forced prefix token (with
    its own log-prob; a forced prefix overrides every other rule)."""
    t, eos = history.size(1), model.eos_id
    forced_log_prob = None
    if forced is not None:
        is_forced = forced >= 0  # (N,)
        forced_log_prob = log_probs.gather(1, forced.clamp(min=0)[:, None]).squeeze(1)  # (N,)
    eos_log_prob = log_probs[:, eos].clone()  # (N,)
    for tok in {model.pad_id, model.bos_id} - {eos}:
        log_probs[:, tok] = NEG_INF
    if t < opts.min_len:
        log_probs[:, eos] = NEG_INF
    _ban_repeats(log_probs, history, opts.no_repeat_ngram)
    _guard_repeats(log_probs, history, opts.repeat_guard)
    at_max = max_len <= t  # (N,)
    if bool(at_max.any()):
        log_probs[at_max] = NEG_INF
        log_probs[at_max, eos] = eos_log_prob[at_max]
    if forced_log_prob is not None and bool(is_forced.any()):
        rows = is_forced.nonzero().squeeze(1)
        log_probs[rows] = NEG_INF
        log_probs[rows, forced[rows]] = forced_log_prob[rows]
    return log_probs


def _last_tokens(history: Tensor, bos: int) -> Tensor:
    """(N,) the token to feed next: BOS at the first step, else the latest generated one."""
    return history[:, -1] if history.size(1) else history.new_full((history.size(0),), bos)


def _accumulate(coverage: Optional[Tensor], attn: Optional[Tensor]) -> Optional[Tensor]:
    """coverage (N, S) + this step's attention (N, S); None while the coverage penalty is off."""
    if coverage is None:
        return None
    if attn is None:
        raise ValueError("beta > 0 needs the model to return attention")
    return coverage + attn


def _hypotheses(
    history: Tensor, sum_log_prob: Tensor, coverage: Optional[Tensor], src_mask: Tensor, opts: DecodeConfig
) -> list[Hypothesis]:
    """Rows that just emitted EOS → Hypothesis; history (F, t) excludes EOS, so |Y| = t + 1."""
    length = torch.full_like(sum_log_prob, history.size(1) + 1)  # (F,)
    scores = rescore(sum_log_prob, length, coverage, src_mask, opts.alpha, opts.beta, opts.length_penalty)
    return [
        Hypothesis(tokens, score, lp)
        for tokens, score, lp in zip(history.tolist(), scores.tolist(), sum_log_prob.tolist())
    ]


def _best_first(finished: list[list[Hypothesis]], n: int) -> list[list[Hypothesis]]:
    """The n best hypotheses per sentence: fewest unmet constraints first, then by final score
    (stable: ties keep discovery order)."""
    return [
        sorted(hyps, key=lambda h: (h.unmet, -h.score))[:n] or [Hypothesis([], NEG_INF, NEG_INF)] for hyps in finished
    ]  # an empty list: every continuation was forbidden


# ------------------------------------------------------------------ greedy and sampling


def _fill_holes(keep: Tensor) -> Tensor:
    """Indices of the True entries of `keep` (n,), m of them, in the order that moves the fewest:
    each kept entry among the first m stays where it is and the kept entries after position m fill
    the holes left by dropped ones. Dropping finished sentences this way copies only the decoder
    state of the sentences that move into holes, where keeping the order shifts every row after
    the first hole (and sentences end mostly one at a time)."""
    m = int(keep.sum())
    order = torch.arange(m, device=keep.device)
    order[~keep[:m]] = keep[m:].nonzero().squeeze(1) + m
    return order


def _decode_paths(
    model: Seq2SeqDecoder,
    src: Tensor,
    opts: DecodeConfig,
    copies: int,
    choose: Callable[[Tensor], Tensor],
    prefixes: Optional[Sequence[Sequence[int]]] = None,
) -> list[list[Hypothesis]]:
    """Extend `copies` independent paths per sentence by `choose(log_probs (N, V)) -> (N,)` until
    EOS; finished rows leave the batch at once."""
    sent = torch.arange(src.size(0), device=src.device).repeat_interleave(copies)  # (N,)
    state = model.start(src).select(sent)
    pre = _make_prefixes(prefixes, model, src)
    max_len = _max_lengths(state.src_mask, opts, model, None if pre is None else pre.lengths[sent])  # (N,)
    history = src.new_empty((sent.numel(), 0))  # (N, t)
    sum_lp = torch.zeros(sent.numel(), device=src.device)  # (N,)
    coverage = torch.zeros(state.src_mask.shape, device=src.device) if opts.beta > 0 else None  # (N, S)
    finished: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
    while sent.numel():
        log_probs, attn = model.step(_last_tokens(history, model.bos_id), state, opts.beta > 0)
        forced = None if pre is None else pre.at(history.size(1), sent)
        log_probs = _constrain(log_probs, history, max_len, opts, model, forced)
        tok = choose(log_probs) if forced is None else torch.where(forced >= 0, forced, choose(log_probs))
        sum_lp = sum_lp + log_probs.gather(1, tok[:, None]).squeeze(1)
        coverage, done = _accumulate(coverage, attn), tok.eq(model.eos_id)
        hyps = _hypotheses(
            history[done], sum_lp[done], None if coverage is None else coverage[done], state.src_mask[done], opts
        )
        for s, hyp in zip(sent[done].tolist(), hyps):
            finished[s].append(hyp)
        keep = _fill_holes(~done)
        history = torch.cat([history, tok[:, None]], 1)[keep]
        sent, max_len, sum_lp, state = sent[keep], max_len[keep], sum_lp[keep], state.select(keep)
        coverage = None if coverage is None else coverage[keep]
    return _best_first(finished, copies)


@torch.no_grad()
def greedy_search(
    model: Seq2SeqDecoder, src: Tensor, opts: DecodeConfig, prefixes: Optional[Sequence[Sequence[int]]] = None
) -> list[list[Hypothesis]]:
    """Pick the most probable token at each step; one hypothesis per sentence. src (B, S)."""
    return _decode_paths(model, src, opts, 1, lambda log_probs: log_probs.argmax(-1), prefixes)


def top_k_top_p_filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Keep the top_k best tokens (0 = all; ties at the k-th value survive), then the nucleus: the
    smallest best-first set whose probability reaches top_p (Holtzman et al. 2020), never empty.
    The others become -inf. logits (N, V) → (N, V)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # the mass before this token already reaches p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), NEG_INF)
    return logits


@torch.no_grad()
def sample(
    model: Seq2SeqDecoder,
    src: Tensor,
    opts: DecodeConfig,
    generator: Optional[torch.Generator] = None,
    prefixes: Optional[Sequence[Sequence[int]]] = None,
) -> list[list[Hypothesis]]:
    """Ancestral sampling from softmax(top_k_top_p_filter(log_probs / temperature)); n_best
    independent samples per sentence, best score first. Scores use the model's own log-probs (not
    the tempered or filtered ones). Without a generator, one seeded with opts.seed is used.
    temperature 0 is the limit of sampling as the temperature goes to 0: the argmax (greedy)."""
    if opts.temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {opts.temperature}")
    if generator is None:
        generator = torch.Generator(device=src.device).manual_seed(opts.seed)

    def choose(log_probs: Tensor) -> Tensor:
        if opts.temperature == 0:
            return log_probs.argmax(-1)
        logits = top_k_top_p_filter(log_probs / opts.temperature, opts.top_k, opts.top_p)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)

    return _decode_paths(model, src, opts, opts.n_best, choose, prefixes)


# ------------------------------------------------------------------------------ beam search


@dataclass
class _Beams:
    """Open hypotheses of the A active sentences, k rows each (sentence a owns rows a*k .. a*k+k-1)."""

    sent: Tensor  # (A,) index of each active sentence in the input batch
    max_len: Tensor  # (A,)
    state: DecoderStateLike  # A*k rows
    history: Tensor  # (A*k, t) generated tokens, no BOS
    scores: Tensor  # (A*k,) RAW summed log-probs; -inf = empty slot
    coverage: Optional[Tensor]  # (A*k, S) summed cross-attention, only when beta > 0
    cons: Optional[ConstraintBeams] = None  # per-row constraint states, only with constraints


def _init_beams(model: Seq2SeqDecoder, src: Tensor, opts: DecodeConfig, prefixes: Optional[_Prefixes] = None) -> _Beams:
    """Encode once, copy each sentence's state to k rows; only row 0 is live (the rest -inf),
    so the first step does not pick k copies of the same token."""
    k, b = opts.beam, src.size(0)
    state = model.start(src)
    max_len = _max_lengths(state.src_mask, opts, model, None if prefixes is None else prefixes.lengths)  # (B,)
    state = state.select(torch.arange(b, device=src.device).repeat_interleave(k))
    scores = torch.full((b, k), NEG_INF, device=src.device)
    scores[:, 0] = 0.0
    coverage = torch.zeros(state.src_mask.shape, device=src.device) if opts.beta > 0 else None
    return _Beams(
        torch.arange(b, device=src.device), max_len, state, src.new_empty((b * k, 0)), scores.view(-1), coverage
    )


TOPK_CHUNK = 64


def _row_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """x.topk(k, dim=1) for rows of a vocabulary-sized x (N, V): the k best of a row lie in the k
    chunks of TOPK_CHUNK columns with the largest maxima, so the chunks' maxima are ranked first and
    only those k chunks searched (measured 1.7x faster than a full topk for 400 x 8,000, k = 10).
    Equal values may come back with other indices than topk's, as topk's own order of ties is
    unspecified. Falls back to topk when V is not a multiple of the chunk or too small to gain."""
    n, v = x.shape
    if v % TOPK_CHUNK or v < 8 * k * TOPK_CHUNK:
        return x.topk(k, dim=1)
    chunks = x.view(n, v // TOPK_CHUNK, TOPK_CHUNK)
    best = chunks.amax(-1).topk(k, dim=1).indices  # (N, k) chunk numbers
    cand = chunks.gather(1, best[:, :, None].expand(n, k, TOPK_CHUNK)).view(n, k * TOPK_CHUNK)
    values, pos = cand.topk(k, dim=1)
    return values, best.gather(1, pos // TOPK_CHUNK) * TOPK_CHUNK + pos % TOPK_CHUNK


def _expand(beams: _Beams, log_probs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top 2k continuations per sentence over its own k*V candidates (raw cumulative log-prob).

    Returns scores, source rows (into the A*k rows) and tokens, each (A, 2k), best first.
    2k guarantees k non-EOS candidates, since at most one per beam row is EOS.
    """
    a, v = beams.sent.numel(), log_probs.size(1)
    w = min(2 * k, v)
    # a sentence's best 2k of k*V are among its rows' own best 2k: rank each row's V first (no
    # (A*k, V) sum is built), then the k*2k survivors per sentence
    row_top, row_tok = _row_topk(log_probs, w)  # (A*k, w)
    total = (beams.scores[:, None] + row_top).view(a, k * w)
    top, index = total.topk(min(2 * k, k * w), dim=1)  # (A, 2k)
    rows = torch.arange(a, device=top.device)[:, None] * k + torch.div(index, w, rounding_mode="floor")
    return top, rows, row_tok.view(a, k * w).gather(1, index)


def _collect_finished(
    beams: _Beams, cand: tuple[Tensor, Tensor, Tensor], opts: DecodeConfig, eos: int, finished: list[list[Hypothesis]]
) -> None:
    """EOS candidates ranked within the top k (and not -inf) become finished hypotheses,
    rescored with the length and coverage penalties."""
    top, rows, toks = cand  # (A, 2k) each
    rank = torch.arange(top.size(1), device=top.device)
    final = toks.eq(eos) & (rank < opts.beam) & (top > NEG_INF)  # (A, 2k)
    which, pos = final.nonzero(as_tuple=True)
    if not which.numel():
        return
    r = rows[which, pos]  # (F,)
    cov = None if beams.coverage is None else beams.coverage[r]
    hyps = _hypotheses(beams.history[r], top[which, pos], cov, beams.state.src_mask[r], opts)
    if beams.cons is not None:  # constraints: at max_len a hypothesis may finish with some unmet
        for hyp, unmet in zip(hyps, beams.cons.unmet(r)):
            hyp.unmet = unmet
    for s, hyp in zip(beams.sent[which].tolist(), hyps):
        finished[s].append(hyp)


def _keep_own_slots(rows: Tensor, k: int) -> Tensor:
    """A permutation (A, k) of each sentence's k new beams (given best first as their source rows
    `rows`, (A, k) into the A*k rows) that puts the first child of every surviving row back in that
    row's own slot; the other children fill the freed slots in rank order.

    The order of a sentence's beams carries no meaning (finished hypotheses are ranked by score),
    but it decides how much of the decoder state moves: with rank order ~60% of the rows changed
    place at every step (measured, beam 5), with own slots only the extra children of a row move
    (~23%), and the self-attention caches are reordered in place (model._reorder_rows).
    """
    a = rows.size(0)
    slots = torch.arange(k, device=rows.device)
    parent = rows - torch.arange(a, device=rows.device)[:, None] * k  # (A, k) in 0..k-1
    earlier_same = (parent[:, :, None] == parent[:, None, :]) & (slots[None, :] < slots[:, None])[None]
    first = ~earlier_same.any(2)  # (A, k): the best child of its parent
    taken = (parent[:, :, None] == slots).any(1)  # (A, k): slot s has a child of row s
    free = (taken.long() * k + slots).argsort(1)  # free slots first, ascending
    nth_other = ((~first).long().cumsum(1) - 1).clamp(min=0)
    slot = torch.where(first, parent, free.gather(1, nth_other))  # (A, k) where each candidate goes
    return torch.empty_like(slot).scatter_(1, slot, slots.expand(a, k))


def _advance(beams: _Beams, cand: tuple[Tensor, Tensor, Tensor], k: int, eos: int) -> _Beams:
    """The k best candidates that do not end in EOS become the new beams; the decoder state,
    history and coverage follow their back-pointers."""
    top, rows, toks = cand  # (A, 2k)
    n = top.size(1)
    order = (toks.eq(eos).long() * n + torch.arange(n, device=top.device)).argsort(dim=1)[:, :k]  # (A, k)
    order = order.gather(1, _keep_own_slots(rows.gather(1, order), k))
    rows, toks = rows.gather(1, order).view(-1), toks.gather(1, order).view(-1)  # (A*k,)
    coverage = None if beams.coverage is None else beams.coverage[rows]
    history = torch.cat([beams.history[rows], toks[:, None]], 1)  # (A*k, t+1)
    cons = None if beams.cons is None else beams.cons.advance(rows, toks)
    return replace(
        beams,
        state=beams.state.select(rows),
        history=history,
        scores=top.gather(1, order).view(-1),
        coverage=coverage,
        cons=cons,
    )


def _drop_done(beams: _Beams, finished: list[list[Hypothesis]], opts: DecodeConfig) -> _Beams:
    """Remove sentences that are done: past max_len, no live beam, `beam` finished hypotheses
    (with stop_early, fairseq's rule), or no open beam can still enter their n-best list.

    Bound (sound for any alpha and beta >= 0): an open beam with raw score s <= 0 and t tokens
    finishes with |Y| in [t+1, max_len+1] and a raw score <= s; lp is monotone in |Y| and cp <= 0,
    so its final score is <= s / max(lp(t+1), lp(max_len+1)). With alpha > 0 this bound rarely
    fires before max_len, which is why stop_early is the default.
    """
    a, k, t = beams.sent.numel(), opts.beam, beams.history.size(1)
    best_open = beams.scores.view(a, k).max(1).values  # (A,)
    lp = lambda n: length_penalty(n, opts.alpha, opts.length_penalty)  # noqa: E731
    bound = best_open / torch.maximum(lp(torch.full_like(best_open, t + 1)), lp(beams.max_len + 1))
    sent = beams.sent.tolist()
    nth = [
        sorted((h.score for h in finished[s]), reverse=True)[opts.n_best - 1]
        if len(finished[s]) >= opts.n_best
        else NEG_INF
        for s in sent
    ]
    done = (beams.max_len < t) | best_open.eq(NEG_INF) | (bound <= torch.tensor(nth, device=bound.device))
    if opts.stop_early:
        done |= torch.tensor([len(finished[s]) >= k for s in sent], device=done.device)
    if not bool(done.any()):
        return beams
    keep = _fill_holes(~done)  # (A',)
    rows = (keep[:, None] * k + torch.arange(k, device=keep.device)).view(-1)  # (A'*k,)
    coverage = None if beams.coverage is None else beams.coverage[rows]
    cons = None if beams.cons is None else beams.cons.select(rows)
    return _Beams(
        beams.sent[keep],
        beams.max_len[keep],
        beams.state.select(rows),
        beams.history[rows],
        beams.scores[rows],
        coverage,
        cons,
    )


@torch.no_grad()
def beam_search(
    model: Seq2SeqDecoder,
    src: Tensor,
    opts: DecodeConfig,
    constraints: Optional[Sequence[Sequence[Sequence[int]]]] = None,
    prefixes: Optional[Sequence[Sequence[int]]] = None,
    word_continuations: Optional[Tensor] = None,
) -> list[list[Hypothesis]]:
    """Batched beam search (k = opts.beam rows per sentence); n_best hypotheses per sentence, best
    final score first. src (B, S) padded with model.pad_id. constraints[b]: sentence b's target
    phrases (token ids) that must all appear (dynamic beam allocation, constraints.py);
    prefixes[b]: target tokens forced at its first steps. word_continuations (V,) bool: pieces
    that continue a word (no word-start mark, start with a letter or digit), forbidden right after
    a constraint is completed so that a constraint is a whole word in the output."""
    if constraints is not None:
        if len(constraints) != src.size(0):
            raise ValueError(f"{len(constraints)} constraint lists for {src.size(0)} sentences")
        for cs in constraints:
            check_constraints(cs, (model.pad_id, model.bos_id, model.eos_id))
    pre = _make_prefixes(prefixes, model, src)
    beams = _init_beams(model, src, opts, pre)
    beams.cons = as_constraint_beams(constraints, opts.beam)
    finished: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
    while beams.sent.numel():
        log_probs, attn = model.step(_last_tokens(beams.history, model.bos_id), beams.state, opts.beta > 0)
        beams.coverage = _accumulate(beams.coverage, attn)  # (A*k, S), before back-pointers reorder it
        max_len = beams.max_len.repeat_interleave(opts.beam)  # (A*k,)
        forced = None if pre is None else pre.at(beams.history.size(1), beams.sent.repeat_interleave(opts.beam))
        log_probs = _constrain(log_probs, beams.history, max_len, opts, model, forced)
        if beams.cons is not None:  # no EOS before every constraint is met (unless at max_len)
            log_probs[beams.cons.unmet_mask(log_probs.device) & (max_len > beams.history.size(1)), model.eos_id] = (
                NEG_INF
            )
            if word_continuations is not None:
                closed = beams.cons.closed_mask(log_probs.device)
                if forced is not None:
                    closed &= forced < 0
                if bool(closed.any()):
                    log_probs[closed] = log_probs[closed].masked_fill(word_continuations.to(log_probs.device), NEG_INF)
        cand = _expand(beams, log_probs, opts.beam)
        if beams.cons is not None:
            cand = order_candidates(beams.cons, beams.scores, log_probs, cand, opts.beam, model.eos_id)
        _collect_finished(beams, cand, opts, model.eos_id, finished)
        beams = _drop_done(_advance(beams, cand, opts.beam, model.eos_id), finished, opts)
    return _best_first(finished, opts.n_best)


def search(
    model: Seq2SeqDecoder,
    src: Tensor,
    opts: DecodeConfig,
    generator: Optional[torch.Generator] = None,
    constraints: Optional[Sequence[Sequence[Sequence[int]]]] = None,
    prefixes: Optional[Sequence[Sequence[int]]] = None,
    word_continuations: Optional[Tensor] = None,
) -> list[list[Hypothesis]]:
    """Sampling if opts.sample; greedy when beam == n_best == 1; beam search otherwise.
    Constraints need beam search (with beam 1 it is beam search with one row, not greedy)."""
    has_constraints = constraints is not None and any(len(cs) for cs in constraints)
    if opts.sample:
        if has_constraints:
            raise ValueError("lexical constraints need beam search, not sampling")
        return sample(model, src, opts, generator, prefixes)
    if opts.beam == 1 and opts.n_best == 1 and not has_constraints:
        return greedy_search(model, src, opts, prefixes)
    return beam_search(model, src, opts, constraints if has_constraints else None, prefixes, word_continuations)


# -------------------------------------------------------------------------------- ensembles


@dataclass
class EnsembleState:
    """One decoder state per ensemble member; `select` moves them together."""

    states: list[Any]

    @property
    def src_mask(self) -> Tensor:
        return self.states[0].src_mask

    @property
    def step(self) -> int:
        return self.states[0].step

    def select(self, index: Tensor) -> "EnsembleState":
        return EnsembleState([s.select(index) for s in self.states])


class Ensemble:
    """Several models with one target vocabulary and the same special ids, decoded as one.

    log p(y) = log_softmax_y( (1/M) sum_m log p_m(y) ): the equal-weight, renormalised geometric
    mean of the members' distributions (log-linear ensembling); attention = mean of the members'.
    """

    def __init__(self, models: Sequence[Seq2SeqDecoder]) -> None:
        if not models or len({(m.pad_id, m.bos_id, m.eos_id) for m in models}) > 1:
            raise ValueError("an ensemble needs one or more models with the same pad/bos/eos ids")
        self.models = list(models)
        self.pad_id, self.bos_id, self.eos_id = models[0].pad_id, models[0].bos_id, models[0].eos_id
        self.cfg = SimpleNamespace(max_positions=min(m.cfg.max_positions for m in models))

    def start(self, src: Tensor) -> EnsembleState:
        return EnsembleState([m.start(src) for m in self.models])

    def step(
        self, tokens: Tensor, state: EnsembleState, need_attention: bool = False
    ) -> tuple[Tensor, Optional[Tensor]]:
        outs = [m.step(tokens, s, need_attention) for m, s in zip(self.models, state.states)]
        if len({lp.shape for lp, _ in outs}) > 1:
            raise ValueError(f"ensemble members disagree on the vocabulary: {[lp.shape for lp, _ in outs]}")
        log_probs = torch.stack([lp for lp, _ in outs]).mean(0).log_softmax(-1)  # (N, V)
        attns = [a for _, a in outs if a is not None]  # each (N, S)
        return log_probs, (torch.stack(attns).mean(0) if need_attention and attns else None)


# ------------------------------------------------------------------------------ batched entry point


def batch_by_tokens(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut so that rows * max_len <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return length_batches(order, lengths, batch_tokens)


def translate_ids(
    model: Seq2SeqDecoder,
    src_ids: Sequence[list[int]],
    opts: DecodeConfig,
    device: torch.device,
    pad_id: int,
    on_batch: Optional[Callable[[int, int], None]] = None,
    workers: int = 1,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    constraints: Optional[Sequence[Sequence[Sequence[int]]]] = None,
    prefixes: Optional[Sequence[Sequence[int]]] = None,
    word_continuations: Optional[Tensor] = None,
) -> list[list[Hypothesis]]:
    """Search every source (ids ending in EOS), batched by length; results in input order.

    `constraints` / `prefixes` (aligned with src_ids) are passed to the search per sentence.

    Batches hold at most `opts.batch_tokens` padded source tokens, divided by the rows each
    sentence occupies (beam, or n_best samples). `workers` > 1 searches that many batches at
    once, each in its own thread (PyTorch releases the GIL inside its kernels), with the caller's
    intra-op threads shared out among them; the result does not depend on it, since every batch
    is searched on its own. `context()` is entered in each thread (autocast is per thread).
    `on_batch(n_sentences, n_target_tokens)` is called after each batch, in order, from the
    calling thread (progress); target tokens exclude EOS.
    """
    out: list[list[Hypothesis]] = [[] for _ in src_ids]
    per_row = max(1, opts.batch_tokens // max(1, opts.beam if not opts.sample else opts.n_best))
    batches = batch_by_tokens([len(s) for s in src_ids], per_row)

    def run(index: list[int]) -> list[list[Hypothesis]]:
        src = pad_rows([src_ids[i] for i in index], pad_id)
        cons = None if constraints is None else [constraints[i] for i in index]
        pre = None if prefixes is None else [prefixes[i] for i in index]
        with torch.inference_mode(), context():
            return search(
                model, src.to(device), opts, constraints=cons, prefixes=pre, word_continuations=word_continuations
            )

    def done(index: list[int], hyps: list[list[Hypothesis]]) -> None:
        for i, h in zip(index, hyps):
            out[i] = h
        if on_batch is not None:
            on_batch(len(index), sum(len(h[0].tokens) for h in hyps if h))

    workers = max(1, min(workers, len(batches)))
    if workers == 1:
        for index in batches:
            done(index, run(index))
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))  # read by each new worker thread
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    try:
        for index, hyps in zip(batches, pool.map(run, batches)):
            done(index, hyps)
    finally:  # on an error or Ctrl-C, queued batches are dropped; running ones end with their batch
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(threads)
    return out
