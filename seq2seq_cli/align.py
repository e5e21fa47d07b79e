"""Word alignments from cross-attention, in Pharaoh format ("0-0 1-2 ..."), and the word view of
attention maps used by `translate attention`.

Method (one teacher-forced pass over the final hypotheses, after search):
  1. Attention: the cross-attention of ONE decoder layer, averaged over its heads. The default is
     the penultimate decoder layer (the first one for a 1-layer decoder): the last layer's
     attention is shaped by predicting the next word and aligns worse; Garg et al. (2019,
     "Jointly Learning to Align and Translate with Transformer Models") found the penultimate
     layer best, and fairseq's `--print-alignment` uses it by default. Row t is the attention
     while predicting target piece t, so it is aligned with piece t.
  2. Pieces to words: a sentencepiece piece that starts with '▁' starts a word (the first piece
     always does), so word i is the i-th whitespace-separated word of the text, on both sides.
     The source EOS column and the target EOS row are left out.
  3. Word matrix: M[j, i] = mean over target pieces of word j of the summed attention to the
     pieces of source word i. Each target word is linked to argmax_i M[j, i] (exactly one link
     per target word; source words may have none or several).
Pharaoh pairs are "source-target", 0-based, listed in target order.

Public names: word_starts, word_attention, hard_alignment, pharaoh, pick_layer, align_batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["word_starts", "word_attention", "hard_alignment", "pharaoh", "align_batch", "pick_layer"]

WORD_START = "\u2581"


def word_starts(pieces: Sequence[str]) -> list[int]:
    """Word index of each piece: a piece starting with '▁' opens a new word (the first always does)."""
    out, w = [], -1
    for i, p in enumerate(pieces):
        if i == 0 or p.startswith(WORD_START):
            w += 1
        out.append(w)
    return out


def word_attention(attn: Tensor, src_words: Sequence[int], tgt_words: Sequence[int]) -> Tensor:
    """attn (T, S) over pieces (EOS excluded) → (words_t, words_s): mean over the target pieces of
    a word of the attention mass summed over the source pieces of a word."""
    n_t, n_s = max(tgt_words) + 1, max(src_words) + 1
    src_map = torch.zeros(attn.size(1), n_s)
    src_map[torch.arange(attn.size(1)), torch.tensor(src_words)] = 1.0
    tgt_map = torch.zeros(n_t, attn.size(0))
    tgt_map[torch.tensor(tgt_words), torch.arange(attn.size(0))] = 1.0
    tgt_map = tgt_map / tgt_map.sum(1, keepdim=True)
    return tgt_map @ attn.float() @ src_map


def hard_alignment(word_attn: Tensor) -> list[tuple[int, int]]:
    """(source word, target word) links: argmax over source words for each target word."""
    return [(int(i), j) for j, i in enumerate(word_attn.argmax(1).tolist())]


def pharaoh(links: Sequence[tuple[int, int]]) -> str:
    return " ".join(f"{s}-{t}" for s, t in links)


def pick_layer(n_layers: int, layer: Optional[int]) -> int:
    """The decoder layer to use: `layer` (negative counts from the end), else the penultimate."""
    if layer is None:
        return max(0, n_layers - 2)
    index = layer if layer >= 0 else n_layers + layer
    if not 0 <= index < n_layers:
        raise ValueError(f"layer {layer} does not exist: the decoder has {n_layers} layers")
    return index


def align_batch(
    model,
    tokenizer,
    src_ids: Sequence[Sequence[int]],
    tgt_ids: Sequence[Sequence[int]],
    device: torch.device,
    layer: Optional[int] = None,
) -> list[str]:
    """Pharaoh alignments of (source ids with EOS, target tokens without BOS/EOS) pairs, batched.
    An empty source or target gives ""."""
    out = ["" for _ in src_ids]
    todo = [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids)) if len(s) > 1 and len(t) > 0]
    if not todo:
        return out
    pad = model.pad_id
    src = torch.full((len(todo), max(len(src_ids[i]) for i in todo)), pad, dtype=torch.long)
    tgt = torch.full((len(todo), max(len(tgt_ids[i]) for i in todo) + 1), pad, dtype=torch.long)
    for r, i in enumerate(todo):
        src[r, : len(src_ids[i])] = torch.tensor(list(src_ids[i]))
        tgt[r, 0] = model.bos_id
        tgt[r, 1 : len(tgt_ids[i]) + 1] = torch.tensor(list(tgt_ids[i]))
    maps = model.cross_attention(src.to(device), tgt.to(device))  # (L, B, H, T, S)
    attn = maps[pick_layer(maps.size(0), layer)].mean(1).cpu()  # (B, T, S)
    for r, i in enumerate(todo):
        s_ids = [x for x in src_ids[i] if x != tokenizer.eos_id]
        t_ids = list(tgt_ids[i])
        a = attn[r, : len(t_ids), : len(s_ids)]
        sw = word_starts([tokenizer.id_to_piece(x, "src") for x in s_ids])
        tw = word_starts([tokenizer.id_to_piece(x, "tgt") for x in t_ids])
        out[i] = pharaoh(hard_alignment(word_attention(a, sw, tw)))
    return out
