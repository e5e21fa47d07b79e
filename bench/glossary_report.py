"""Term inclusion of translations under a glossary: how many glossary terms that apply to a line
(source term found, case-insensitive and word-bounded, exactly as `translate decode --glossary`
decides) appear in the hypothesis (target term as a whole-word, case-sensitive match), and in
the reference for comparison.

Usage: python bench/glossary_report.py GLOSSARY.tsv SRC HYP [HYP ...] --ref REF
Prints a Markdown table: lines with a term, term instances, and per file the share found.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from seq2seq_cli.translate import glossary_constraints, read_glossary


def found(term: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text) is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("glossary", type=Path)
    ap.add_argument("src", type=Path)
    ap.add_argument("hyps", type=Path, nargs="+")
    ap.add_argument("--ref", type=Path)
    args = ap.parse_args()
    glossary = read_glossary(args.glossary)
    src = args.src.read_text(encoding="utf-8").splitlines()
    terms = [list(dict.fromkeys(glossary_constraints(glossary, line))) for line in src]
    n_lines, n_terms = sum(1 for t in terms if t), sum(len(t) for t in terms)
    print(f"{args.src}: {len(src)} lines, {n_lines} with a glossary term, {n_terms} term instances\n")
    print("| file | terms found | share | lines with every term |\n| --- | ---: | ---: | ---: |")
    for path in ([args.ref] if args.ref else []) + list(args.hyps):
        out = path.read_text(encoding="utf-8").splitlines()
        if len(out) != len(src):
            raise SystemExit(f"error: {path} has {len(out)} lines but {args.src} has {len(src)}")
        hits = sum(found(t, o) for ts, o in zip(terms, out) for t in ts)
        full = sum(all(found(t, o) for t in ts) for ts, o in zip(terms, out) if ts)
        print(f"| {path} | {hits} / {n_terms} | {100 * hits / max(n_terms, 1):.1f}% | {full} / {n_lines} |")


if __name__ == "__main__":
    main()
