"""Documents in, sentences out, and back: the sentence splitting shared by `translate serve` and
`translate decode --split-sentences`.

A document is cut into paragraphs at blank lines (the separators, blank lines and their
whitespace, are kept verbatim); inside a paragraph, single line breaks are read as spaces (wrapped
prose) and the text is cut into sentences by pysbd (rule-based, per language; a language pysbd
does not know falls back to its English rules). Translations are rejoined with one space between
the sentences of a paragraph and the original separators between paragraphs, so a text of three
paragraphs comes back as three paragraphs. A whitespace-only paragraph gives no sentences and
comes back empty.

pysbd is an optional dependency (the `serve` extra); it is imported on first use.

Public names: Segmented, split_document, join_document, sentence_splitter_available.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Segmented", "split_document", "join_document", "sentence_splitter_available"]

# one blank line or more (lines holding only spaces/tabs count as blank), newline included
_PARAGRAPH_BREAK = re.compile(r"(\r?\n[ \t]*\r?\n(?:[ \t]*\r?\n)*)")


@dataclass(frozen=True)
class Segmented:
    """A document cut into sentences: `sentences` in reading order, and how to put them back.

    `counts[i]` is the number of sentences of paragraph i; `separators[i]` is the text between
    paragraph i and i+1 (so len(separators) == len(counts) - 1).
    """

    sentences: tuple[str, ...]
    counts: tuple[int, ...]
    separators: tuple[str, ...]


def sentence_splitter_available() -> bool:
    """Whether pysbd can be imported (the `serve` extra is installed)."""
    try:
        import pysbd  # noqa: F401
    except ImportError:
        return False
    return True


def _segmenter(lang: str):
    """A fresh pysbd segmenter for `lang` (cheap to build; pysbd segmenters are not thread-safe)."""
    try:
        import pysbd
        from pysbd.languages import LANGUAGE_CODES
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sentence splitting needs pysbd: pip install 'seq2seq-cli[serve]'") from exc
    code = (lang or "en").split("-")[0].split("_")[0].lower()
    return pysbd.Segmenter(language=code if code in LANGUAGE_CODES else "en", clean=False)


def split_sentences(paragraph: str, lang: str) -> list[str]:
    """The sentences of one paragraph (line breaks read as spaces), stripped, none empty."""
    flat = " ".join(line.strip() for line in paragraph.splitlines())
    if not flat.strip():
        return []
    return [s.strip() for s in _segmenter(lang).segment(flat) if s.strip()]


def split_document(text: str, lang: str) -> Segmented:
    """Cut `text` into paragraphs at blank lines and each paragraph into sentences (pysbd, `lang`)."""
    parts = _PARAGRAPH_BREAK.split(text)
    paragraphs, separators = parts[0::2], parts[1::2]
    sentences: list[str] = []
    counts: list[int] = []
    for paragraph in paragraphs:
        found = split_sentences(paragraph, lang)
        sentences += found
        counts.append(len(found))
    return Segmented(tuple(sentences), tuple(counts), tuple(separators))


def join_document(segmented: Segmented, translations: Sequence[str]) -> str:
    """Put one translation per sentence back into the document's paragraph layout."""
    if len(translations) != len(segmented.sentences):
        raise ValueError(f"{len(translations)} translations for {len(segmented.sentences)} sentences")
    out: list[str] = []
    start = 0
    for i, n in enumerate(segmented.counts):
        if i:
            out.append(segmented.separators[i - 1])
        out.append(" ".join(t.strip() for t in translations[start : start + n]))
        start += n
    return "".join(out)
