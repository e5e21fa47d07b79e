"""Hard lexical constraints for beam search: dynamic beam allocation (Post & Vilar 2018).

A sentence's constraints are target phrases given as token-id sequences (`list[list[int]]`);
every one must appear, contiguously and in any order, in the output. Hypotheses track their
progress; beam search asks this module which candidates to keep at each step.

State of one hypothesis (immutable tuples, shared between rows that have the same state):
  * met[c]:  constraint c has appeared in the hypothesis;
  * prog[c]: for an unmet c, the length of the longest prefix of c that is a suffix of the
    hypothesis (a KMP automaton per constraint, so overlaps such as c = [a, a, b] after
    "a a a" are tracked exactly). Once met, c stays met.
  * bank = sum of len(c) over met c + max(prog[c]) over unmet c: the number of constraint tokens
    the hypothesis has produced (0 .. T, T = total constraint tokens of the sentence);
  * closed: the last token completed a constraint. Beam search then forbids the pieces that would
    continue the word (given as `word_continuations`), so "Cristo" cannot come out as "Cristos".

Dynamic beam allocation, one step of one sentence (k beams), as `order_candidates` does it:
  1. Candidates = the unconstrained top 2k over the sentence's k*V continuations (what plain
     beam search looks at), plus, for every live beam row, its single best token and the next
     token of every unmet constraint (c[prog[c]]: continuing a started constraint or starting a
     new one). Duplicates and -inf candidates are dropped.
  2. EOS is only allowed to a hypothesis whose constraints are all met, except at max_len, where
     EOS is forced whatever is unmet (so every sentence ends; the hypothesis is marked with its
     unmet count and ranked after every complete one).
  3. Each candidate's bank is that of its new state. Candidates are sorted by (bank desc, score
     desc), ranked inside their bank, then interleaved round-robin across banks: best of the
     highest bank, best of the next bank, ..., then the second best of each bank, and so on.
     The first k of that order that do not end in EOS become the new beams, and EOS candidates
     within the first k finish (beam search's usual rules, see search.py). The round-robin is the
     vectorised form of the bank allocation (Hu et al. 2019, fairseq's "stripes"): every bank
     gets about k/(T+1) rows, and slots a bank cannot fill flow to the others in rank order.
With no constraint in a sentence there is one bank and the order is the plain top-2k order, so
such a sentence is searched exactly as without this module.

The per-row state update is plain Python over a few tuples, memoised per sentence on
(state, token); the decoder step dominates the cost.

Public names: ConstraintSet, ConstraintBeams, order_candidates, check_constraints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ConstraintSet", "ConstraintBeams", "order_candidates", "check_constraints"]

NEG_INF = float("-inf")

State = tuple[tuple[bool, ...], tuple[int, ...], bool]  # (met, prog, closed)


def _failure(c: Sequence[int]) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of c[:i+1] that is
    also its suffix."""
    fail, j = [0] * len(c), 0
    for i in range(1, len(c)):
        while j and c[i] != c[j]:
            j = fail[j - 1]
        if c[i] == c[j]:
            j += 1
        fail[i] = j
    return fail


def check_constraints(constraints: Sequence[Sequence[int]], forbidden: Sequence[int]) -> None:
    """Raise ValueError for an empty constraint or one that contains a special id (PAD/BOS/EOS)."""
    for c in constraints:
        if not c:
            raise ValueError("a constraint is empty")
        bad = set(c) & set(forbidden)
        if bad:
            raise ValueError(f"a constraint contains the special id(s) {sorted(bad)}")


@dataclass
class ConstraintSet:
    """One sentence's constraints and its memoised state transitions."""

    phrases: tuple[tuple[int, ...], ...]
    fail: tuple[tuple[int, ...], ...] = field(init=False)
    total: int = field(init=False)
    _memo: dict[tuple[State, int], State] = field(default_factory=dict, init=False, repr=False)
    _banks: dict[State, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.fail = tuple(tuple(_failure(c)) for c in self.phrases)
        self.total = sum(len(c) for c in self.phrases)

    @property
    def start(self) -> State:
        n = len(self.phrases)
        return (False,) * n, (0,) * n, False

    def advance(self, state: State, tok: int) -> State:
        """The state after appending `tok` (KMP step for every unmet constraint)."""
        key = (state, tok)
        new = self._memo.get(key)
        if new is not None:
            return new
        met, prog = list(state[0]), list(state[1])
        closed = False
        for i, c in enumerate(self.phrases):
            if met[i]:
                continue
            p = prog[i]
            while p and c[p] != tok:
                p = self.fail[i][p - 1]
            if c[p] == tok:
                p += 1
            if p == len(c):
                met[i], p, closed = True, 0, True
            prog[i] = p
        new = (tuple(met), tuple(prog), closed)
        self._memo[key] = new
        return new

    def bank(self, state: State) -> int:
        """Constraint tokens produced: sum of len(c) over met c + the longest partial match."""
        bank = self._banks.get(state)
        if bank is None:
            met, prog, _ = state
            bank = sum(len(c) for c, m in zip(self.phrases, met) if m) + max(
                (p for p, m in zip(prog, met) if not m), default=0
            )
            self._banks[state] = bank
        return bank

    def unmet(self, state: State) -> int:
        return sum(not m for m in state[0])

    def next_tokens(self, state: State) -> set[int]:
        """Tokens that advance an unmet constraint: c[prog[c]] for each unmet c."""
        met, prog, _ = state
        return {c[p] for c, m, p in zip(self.phrases, met, prog) if not m}


@dataclass
class ConstraintBeams:
    """Constraint states of beam-search rows: `sets[r]` is row r's sentence's ConstraintSet."""

    sets: list[ConstraintSet]
    states: list[State]

    @classmethod
    def start(cls, constraints: Sequence[Sequence[Sequence[int]]], k: int) -> "ConstraintBeams":
        """k rows per sentence, all at the start state (sentence s owns rows s*k .. s*k+k-1)."""
        sets = [ConstraintSet(tuple(tuple(c) for c in cs)) for cs in constraints]
        return cls([s for s in sets for _ in range(k)], [s.start for s in sets for _ in range(k)])

    def select(self, rows: Tensor) -> "ConstraintBeams":
        """Rows `rows` (drop finished sentences), states unchanged."""
        idx = rows.tolist()
        return ConstraintBeams([self.sets[r] for r in idx], [self.states[r] for r in idx])

    def advance(self, rows: Tensor, toks: Tensor) -> "ConstraintBeams":
        """New rows: old row rows[i] extended by toks[i]."""
        idx = rows.tolist()
        sets = [self.sets[r] for r in idx]
        return ConstraintBeams(sets, [s.advance(self.states[r], t) for s, r, t in zip(sets, idx, toks.tolist())])

    def unmet(self, rows: Tensor) -> list[int]:
        """Unmet constraint count of each of `rows`."""
        return [self.sets[r].unmet(self.states[r]) for r in rows.tolist()]

    def unmet_mask(self, device: torch.device) -> Tensor:
        """(rows,) True where some constraint is still unmet."""
        return torch.tensor([not all(st[0]) for st in self.states], dtype=torch.bool, device=device)

    def closed_mask(self, device: torch.device) -> Tensor:
        """(rows,) True where the last token completed a constraint."""
        return torch.tensor([st[2] for st in self.states], dtype=torch.bool, device=device)


def order_candidates(
    cons: ConstraintBeams, scores: Tensor, log_probs: Tensor, cand: tuple[Tensor, Tensor, Tensor], k: int, eos: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic beam allocation for one step (see the module docstring).

    scores (A*k,) raw scores of the open rows; log_probs (A*k, V) this step's log-probs after
    every generation rule (EOS already masked where constraints are unmet); cand = (top, rows,
    toks), each (A, 2k): the plain top-2k candidates. Returns the same triple with width W >= 2k
    in allocation order, padded with -inf candidates (row = the sentence's first row, token EOS:
    never kept, never finished).
    """
    top, rows, toks = cand
    a = top.size(0)
    best = log_probs.argmax(-1).tolist()  # (A*k,)
    live = (scores > NEG_INF).tolist()
    top_l, rows_l, toks_l = top.tolist(), rows.tolist(), toks.tolist()
    per_sentence: list[list[tuple[float, int, int]]] = []
    extra_rows: list[int] = []
    extra_toks: list[int] = []
    for s in range(a):  # gather the extra (row, token) pairs of all sentences for one gather
        for r in range(s * k, s * k + k):
            if live[r]:
                cs = cons.sets[r]
                for t in {best[r]} | cs.next_tokens(cons.states[r]):
                    extra_rows.append(r)
                    extra_toks.append(t)
    extra_scores = (scores[extra_rows] + log_probs[extra_rows, extra_toks]).tolist() if extra_rows else []
    extras: dict[int, list[tuple[float, int, int]]] = {}
    for sc, r, t in zip(extra_scores, extra_rows, extra_toks):
        extras.setdefault(r // k, []).append((sc, r, t))
    width = 0
    for s in range(a):
        seen: set[tuple[int, int]] = set()
        items: list[tuple[int, float, int, int]] = []  # (bank, score, row, tok) in discovery order
        for sc, r, t in list(zip(top_l[s], rows_l[s], toks_l[s])) + extras.get(s, []):
            if sc == NEG_INF or (r, t) in seen:
                continue
            seen.add((r, t))
            cs = cons.sets[r]
            items.append((cs.bank(cs.advance(cons.states[r], t)), sc, r, t))
        # sort by (bank desc, score desc) (stable: ties keep the top-k order), rank within banks,
        # then interleave by (rank asc, bank desc)
        items.sort(key=lambda x: (-x[0], -x[1]))
        ranked, last_bank, rank = [], None, 0
        for bank, sc, r, t in items:
            rank = rank + 1 if bank == last_bank else 0
            last_bank = bank
            ranked.append((rank, -bank, sc, r, t))
        ranked.sort(key=lambda x: (x[0], x[1]))
        per_sentence.append([(sc, r, t) for _, _, sc, r, t in ranked])
        width = max(width, len(ranked))
    width = max(width, top.size(1))
    out_top = torch.full((a, width), NEG_INF, device=top.device)
    out_rows = (torch.arange(a, device=top.device)[:, None] * k).repeat(1, width)
    out_toks = torch.full((a, width), eos, dtype=toks.dtype, device=toks.device)
    for s, lst in enumerate(per_sentence):
        if lst:
            sc, r, t = zip(*lst)
            n = len(lst)
            out_top[s, :n] = torch.tensor(sc, dtype=out_top.dtype)
            out_rows[s, :n] = torch.tensor(r, dtype=out_rows.dtype)
            out_toks[s, :n] = torch.tensor(t, dtype=out_toks.dtype)
    return out_top, out_rows, out_toks


def as_constraint_beams(constraints: Optional[Sequence[Sequence[Sequence[int]]]], k: int) -> Optional[ConstraintBeams]:
    """ConstraintBeams for a batch, or None when no sentence has a constraint (the plain path)."""
    if constraints is None or not any(len(cs) for cs in constraints):
        return None
    return ConstraintBeams.start(constraints, k)
