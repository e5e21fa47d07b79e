"""Build a terminology glossary (source term<TAB>target term) from a parallel training corpus.

Usage: python bench/build_glossary.py TRAIN.src TRAIN.tgt -o glossary.tsv [--size 50] [--min-count 20]
       [--min-dice 0.6]

Method (proper nouns, aligned by a co-occurrence statistic):
  1. Words are maximal runs of letters (\\w without digits/underscore). A source word is a proper-noun
     candidate when it is capitalised in at least 90% of its occurrences that are NOT the first word
     of the line (so "God"/"Moses" qualify and "The" does not), occurs in at least --min-count lines,
     and is not all upper-case. Target candidates are chosen the same way on the target side.
  2. For each candidate pair (e, s) that co-occur in a line pair, the Dice coefficient over lines:
         Dice(e, s) = 2 * c(e, s) / (c(e) + c(s)),
     c(.) = number of lines containing the (lower-cased) word, c(e, s) = lines where both sides
     contain it. Each source term is paired with its best-Dice target term; pairs with Dice below
     --min-dice are dropped, and so is a target term already taken by a better-scoring source term.
  3. The --size most frequent source terms (by c(e)) are kept; the target term is written in its
     most frequent surface form.
The output is deterministic (ties break alphabetically). The glossary never looks at test data.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

WORD = re.compile(r"[^\W\d_]+")


def capitalised_words(lines: list[str], min_count: int) -> tuple[set[str], list[set[str]], dict[str, str]]:
    """(proper-noun candidates (lower-cased), per-line sets of lower-cased words, surface form)."""
    cap, seen_inside, doc_freq = Counter(), Counter(), Counter()
    surface: dict[str, Counter] = defaultdict(Counter)
    per_line = []
    for line in lines:
        words = WORD.findall(line)
        for i, w in enumerate(words):
            low = w.lower()
            surface[low][w] += 1
            if i > 0:
                seen_inside[low] += 1
                cap[low] += w[0].isupper() and not w.isupper()
        s = {w.lower() for w in words}
        per_line.append(s)
        doc_freq.update(s)
    cands = {
        w for w, n in seen_inside.items() if n >= 5 and cap[w] >= 0.9 * n and doc_freq[w] >= min_count and len(w) > 1
    }
    forms = {w: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for w, c in surface.items() if w in cands}
    return cands, per_line, forms


def build(
    src_lines: list[str], tgt_lines: list[str], size: int, min_count: int, min_dice: float
) -> list[tuple[str, str, float, int]]:
    """[(source term, target term, Dice, source line count)], most frequent source term first."""
    src_c, src_sets, src_forms = capitalised_words(src_lines, min_count)
    tgt_c, tgt_sets, tgt_forms = capitalised_words(tgt_lines, min_count)
    c_src, c_tgt, c_pair = Counter(), Counter(), Counter()
    for s_words, t_words in zip(src_sets, tgt_sets):
        s_terms, t_terms = s_words & src_c, t_words & tgt_c
        c_src.update(s_terms)
        c_tgt.update(t_terms)
        c_pair.update((e, s) for e in s_terms for s in t_terms)
    best: dict[str, tuple[float, str]] = {}
    for (e, s), n in c_pair.items():
        dice = 2 * n / (c_src[e] + c_tgt[s])
        if dice >= min_dice and (e not in best or (dice, s) > (best[e][0], best[e][1])):
            best[e] = (dice, s)
    taken: set[str] = set()
    out = []
    for e, (dice, s) in sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0])):  # best Dice first
        if s in taken:
            continue
        taken.add(s)
        out.append((src_forms[e], tgt_forms[s], dice, c_src[e]))
    out.sort(key=lambda x: (-x[3], x[0]))
    return out[:size]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("tgt", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--size", type=int, default=50)
    ap.add_argument("--min-count", type=int, default=20)
    ap.add_argument("--min-dice", type=float, default=0.6)
    args = ap.parse_args()
    src = args.src.read_text(encoding="utf-8").splitlines()
    tgt = args.tgt.read_text(encoding="utf-8").splitlines()
    if len(src) != len(tgt):
        raise SystemExit(f"error: {args.src} has {len(src)} lines but {args.tgt} has {len(tgt)}")
    rows = build(src, tgt, args.size, args.min_count, args.min_dice)
    args.output.write_text("".join(f"{e}\t{s}\n" for e, s, _, _ in rows), encoding="utf-8")
    print("| source | target | Dice | source lines |\n| --- | --- | ---: | ---: |")
    for e, s, dice, n in rows:
        print(f"| {e} | {s} | {dice:.2f} | {n} |")


if __name__ == "__main__":
    main()
