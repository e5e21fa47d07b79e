"""The Transformer encoder-decoder (Vaswani et al. 2017) with an incremental-decoding cache.

Mask convention for the whole package: boolean, True = may attend (as in
`torch.nn.functional.scaled_dot_product_attention`). `src_mask` is (batch, src_len), True at
real source tokens.

Search sees the model only through two methods:
  `start(src) -> DecoderState`   encode once; cross-attention keys/values computed once per layer;
  `step(tokens, state, need_attention) -> (log_probs, attention)`   one target position for every
      row of the state, appending self-attention keys/values to the state's cache.
`DecoderState.select(index)` reorders or expands rows (beam search back-pointers).

This room does not read files, recipes (beyond ModelConfig), data or checkpoints.
Public names: Seq2SeqTransformer, DecoderState, MultiHeadAttention, RowStableLinear, sinusoidal_positions,
build_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .recipe import ModelConfig

__all__ = [
    "Seq2SeqTransformer",
    "DecoderState",
    "MultiHeadAttention",
    "RowStableLinear",
    "sinusoidal_positions",
    "build_model",
]


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    Returns: (n_positions, d_model)
    """
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d/2,)
    pe = torch.zeros(n_positions, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return pe.float()


class RowStableLinear(nn.Linear):
    """nn.Linear whose product always takes oneDNN's path, so that each row's result is the same
    bits whatever the number of rows. torch sends an fp32 product with bf16 fpmath to oneDNN only
    when it has at least 2 rows and rows x in_features > 256 (measured, torch 2.13: in 256 -> 2
    rows, 64 -> 5, 32 -> 9); smaller ones run as plain fp32 (MKL), whose last bits differ from the
    same rows inside a larger product, and a lone bf16 row takes another kernel too. Fewer rows are
    padded with copies of the first. Decoding with bf16 matmuls swaps it in (translate.py); a real
    model needs it only for a lone row.

    The input is cast to the weight's dtype: with bf16 weights the layer takes any input and
    returns bf16 (fp32 accumulation inside the product). `row_floor` (set per layer by
    translate.set_precision, from the start-up plan): products of more than SMALL_ROWS and fewer
    than row_floor rows are padded to row_floor rows, for a shape that oneDNN sums in another order
    only in that range (a 1024 -> 256 bf16 layer on an AMX Xeon: 33-255 rows)."""

    SMALL_ROWS = 32
    row_floor: int = 0

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)
        rows = x.numel() // x.size(-1)
        need = max(2, 256 // self.in_features + 1)
        if self.SMALL_ROWS < rows < self.row_floor:
            need = self.row_floor
        if rows >= need:
            return super().forward(x)
        flat = x.reshape(rows, -1)
        padded = torch.cat([flat, flat[:1].expand(need - rows, -1)])
        return super().forward(padded)[:rows].reshape(*x.shape[:-1], -1)


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_k) + mask) V over n_heads heads, through SDPA.

    With `need_weights=True` the probabilities are computed explicitly and returned averaged
    over heads, shape (batch, tgt_len, src_len); the output is the same either way.

    `kv_dtype` (None unless decoding with bf16 matmuls sets it): at inference the two products
    Q K^T and P V take their inputs in this dtype, with fp32 accumulation; the keys/values are
    stored in it; the scores are scaled, masked and normalised in fp32. The explicit path is used
    then for every query length, except over keys whose length does not depend on the batch
    (`fixed_keys`): unlike the fused SDPA kernel, its bf16 products agree bitwise whatever the
    padding and the number of rows (measured), which batch-invariant decoding needs.
    The context keeps the query's dtype (bf16 when the projections are bf16 layers).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.d_head, self.dropout = n_heads, d_model // n_heads, dropout
        self.kv_dtype: Optional[torch.dtype] = None
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Project x (B, S, D) to keys and values, each (B, H, S, Dh)."""
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Optional[Tensor] = None,
        causal: bool = False,
        need_weights: bool = False,
        average_heads: bool = True,
        fixed_keys: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """q (B, T, D) projected here; k, v (B, H, S, Dh); mask broadcastable to (B, H, T, S).
        With need_weights and average_heads=False the weights are per head, (B, H, T, S).

        fixed_keys: S is the same for a row whatever batch it is in (a self-attention cache, whose
        capacity follows the step alone). Then bf16 products (kv_dtype) may take the fused
        kernel, whose sums depend on S only: 1.6-1.8x faster than the explicit path for one query
        over 16-96 keys (measured, AMX Xeon), and as batch-invariant there."""
        b, t, d = q.shape
        qh = self.split_heads(self.q_proj(q))  # (B, H, T, Dh)
        p = self.dropout if self.training else 0.0
        weights = None
        if fixed_keys and self.kv_dtype is not None and not (need_weights or self.training):
            kv = self.kv_dtype
            ctx = F.scaled_dot_product_attention(qh.to(kv), k.to(kv), v.to(kv), attn_mask=mask).to(qh.dtype)
        elif need_weights or (not self.training and (t <= 16 or self.kv_dtype is not None)):
            # explicit softmax(QK^T/sqrt(d))V: also the fast path for the few queries of a decoding
            # step, where the fused kernel's set-up costs more than the work (measured 1.5-2.5x)
            mm = self.kv_dtype or qh.dtype  # the products' input dtype
            scores = (qh.to(mm) @ k.to(mm).transpose(-2, -1)).float() / math.sqrt(self.d_head)  # (B, H, T, S)
            if causal:
                s = k.size(-2)
                scores = scores.masked_fill(
                    ~torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t), float("-inf")
                )
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(-1).nan_to_num(0.0).to(mm)  # all-masked rows → 0
            weights = None  # (B, T, S) heads averaged, or (B, H, T, S)
            if need_weights:
                weights = probs.mean(dim=1) if average_heads else probs
            ctx = (F.dropout(probs, p, self.training) @ v.to(mm)).to(qh.dtype)  # autocast may have made it bf16
        else:
            if causal and k.size(-2) != t:  # new positions after a cache: align the causal mask bottom-right
                s = k.size(-2)
                tri = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
                mask, causal = (tri if mask is None else mask & tri), False
            if qh.device.type == "cpu" and (qh.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
                # The CPU flash-attention kernel is several times slower in bf16 than in fp32
                # (measured: backward 6x); the matmuls around it keep their bf16 speed-up.
                with torch.autocast("cpu", enabled=False):
                    ctx = F.scaled_dot_product_attention(
                        qh.float(), k.float(), v.float(), attn_mask=mask, dropout_p=p, is_causal=causal
                    ).to(qh.dtype)
            else:
                ctx = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        ctx = ctx.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.out_proj(ctx), weights


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, act = ReLU (paper) or GELU."""

    def __init__(self, d_model: int, ff_dim: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, ff_dim), nn.Linear(ff_dim, d_model)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class _Sublayer(nn.Module):
    """Residual + LayerNorm around a sublayer: post-norm LN(x + drop(f(x))) or pre-norm x + drop(f(LN(x)))."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.norm, self.drop, self.pre_norm = nn.LayerNorm(d_model), nn.Dropout(dropout), pre_norm

    def inp(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.pre_norm else x

    def out(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.drop(y) if self.pre_norm else self.norm(x + self.drop(y))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        pre = cfg.norm == "pre"
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ff_dim, cfg.activation, cfg.activation_dropout)
        self.sub1, self.sub2 = _Sublayer(cfg.d_model, cfg.dropout, pre), _Sublayer(cfg.d_model, cfg.dropout, pre)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.sub1.inp(x)
        k, v = self.attn.keys_values(h)
        x = self.sub1.out(x, self.attn.attend(h, k, v, mask)[0])
        return self.sub2.out(x, self.ffn(self.sub2.inp(x)))


CACHE_BLOCK = 16
KEY_BLOCK = 32  # source padding unit under bf16 attention products (see Seq2SeqTransformer.start)


def cache_capacity(pos: int) -> int:
    """Slots of a self-attention cache that holds positions 0..pos: the next multiple of CACHE_BLOCK."""
    return (pos // CACHE_BLOCK + 1) * CACHE_BLOCK


def stored_dtype(x: Tensor, kv_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype to keep keys/values in across decoding steps: the attention's kv_dtype when set,
    else autocast's when it is on (so no step casts the whole cache again; int8 decoding gets bf16
    caches this way), else x's own."""
    kind = x.device.type
    if kv_dtype is not None:
        return kv_dtype
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _cache_write(
    cache: Optional[tuple[Tensor, Tensor]], k: Tensor, v: Tensor, pos: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Store k, v (N, H, 1, Dh) at slot `pos` of the cache buffers (dtype: stored_dtype), growing
    them (zero-filled) to cache_capacity(pos) when full.

    Why buffers and not torch.cat: concatenation copies the whole cache at every step, and its
    length changes at every step, so each step's attention matmuls have a shape never seen
    before (oneDNN builds a kernel per new shape in bf16). Blocked capacity writes one slot per
    step and repeats shapes; the masked slots cost a few zero multiplications.
    """
    cap = cache_capacity(pos)
    if cache is None or cache[0].size(2) < cap:
        n, h, _, d = k.shape
        grown = (k.new_empty(n, h, cap, d, dtype=dtype), v.new_empty(n, h, cap, d, dtype=dtype))
        kept = 0 if cache is None else cache[0].size(2)
        for i, new in enumerate(grown):
            if cache is not None:
                new[:, :, :kept] = cache[i]
            new[:, :, kept:].zero_()  # masked slots must be finite: 0 * NaN is NaN
        cache = grown
    cache[0][:, :, pos] = k[:, :, 0]
    cache[1][:, :, pos] = v[:, :, 0]
    return cache


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        pre, d, p = cfg.norm == "pre", cfg.d_model, cfg.dropout
        self.self_attn = MultiHeadAttention(d, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(d, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(d, cfg.ff_dim, cfg.activation, cfg.activation_dropout)
        self.sub1, self.sub2, self.sub3 = _Sublayer(d, p, pre), _Sublayer(d, p, pre), _Sublayer(d, p, pre)

    def forward(self, x: Tensor, cross_kv: tuple[Tensor, Tensor], src_mask: Tensor) -> Tensor:
        """Teacher forcing: x (B, T, D) attends causally to itself, then to the source."""
        h = self.sub1.inp(x)
        k, v = self.self_attn.keys_values(h)
        x = self.sub1.out(x, self.self_attn.attend(h, k, v, causal=x.size(1) > 1)[0])
        return self._cross_and_ffn(x, cross_kv, src_mask, False, 1)[0]

    def forward_with_attention(
        self, x: Tensor, cross_kv: tuple[Tensor, Tensor], src_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """forward() that also returns the per-head cross-attention (B, H, T, S) (alignment, plots)."""
        h = self.sub1.inp(x)
        k, v = self.self_attn.keys_values(h)
        x = self.sub1.out(x, self.self_attn.attend(h, k, v, causal=x.size(1) > 1)[0])
        ctx, weights = self.cross_attn.attend(
            self.sub2.inp(x), *cross_kv, mask=src_mask, need_weights=True, average_heads=False
        )
        x = self.sub2.out(x, ctx)
        assert weights is not None
        return self.sub3.out(x, self.ffn(self.sub3.inp(x))), weights

    def step(
        self,
        x: Tensor,
        cross_kv: tuple[Tensor, Tensor],
        src_mask: Tensor,
        cache: Optional[tuple[Tensor, Tensor]],
        pos: int,
        need_weights: bool = False,
        group: int = 1,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Optional[Tensor]]:
        """One new position `pos` per row: x (N, 1, D). The cache holds the self-attention keys/values
        of positions 0..pos-1 in zero-filled buffers (N, H, C, Dh) of capacity C = cache_capacity(pos);
        this position is written in place and the slots after it are masked. Returns (output, cache,
        head-averaged cross-attention)."""
        h = self.sub1.inp(x)
        k, v = self.self_attn.keys_values(h)  # (N, H, 1, Dh)
        cache = _cache_write(cache, k, v, pos, stored_dtype(k, self.self_attn.kv_dtype))
        visible = (torch.arange(cache[0].size(2), device=x.device) <= pos)[None]  # (1, C)
        x = self.sub1.out(x, self.self_attn.attend(h, *cache, mask=visible, fixed_keys=True)[0])
        x, weights = self._cross_and_ffn(x, cross_kv, src_mask, need_weights, group)
        return x, cache, weights

    def _cross_and_ffn(
        self, x: Tensor, cross_kv: tuple[Tensor, Tensor], src_mask: Tensor, need_weights: bool, group: int
    ) -> tuple[Tensor, Optional[Tensor]]:
        """cross_kv and src_mask have B / group rows: each serves `group` consecutive rows of x, whose
        queries are attended together as one (group * T)-long query sequence."""
        b, t, d = x.shape
        q = self.sub2.inp(x).reshape(b // group, group * t, d)
        ctx, weights = self.cross_attn.attend(q, *cross_kv, mask=src_mask, need_weights=need_weights)
        if weights is not None:
            weights = weights.reshape(b, t, -1)
        x = self.sub2.out(x, ctx.reshape(b, t, d))
        return self.sub3.out(x, self.ffn(self.sub3.inp(x))), weights


def _reorder_rows(kv: tuple[Tensor, Tensor], index: Tensor) -> tuple[Tensor, Tensor]:
    """Rows `index` of the key/value buffers kv, each (N, H, C, Dh) (self-attention caches, or the
    cross-attention K/V of the sources).

    A selection of at most N rows (a beam step's back-pointers, or dropping finished sentences) is
    done in place: only rows whose source differs from themselves are copied, and the result is the
    first len(index) rows of the same buffers. Search keeps most rows in place (beams stay in their
    slots, the last sentences fill the holes of finished ones: search._keep_own_slots, _fill_holes),
    so this copies a fraction of the cache where index_select copied all of it into new buffers at
    every step (~19% of fp32 decoding time). The rows to move are gathered first, so a row that is
    both read and overwritten is read before it is written.
    Expansions (more rows out than in: one row per beam) return new buffers; either way the
    caller's old state is consumed.
    """
    n, m = kv[0].size(0), index.numel()
    if m > n:
        return kv[0].index_select(0, index), kv[1].index_select(0, index)
    moved = (index != torch.arange(m, device=index.device)).nonzero().squeeze(1)
    if moved.numel():
        src = index.index_select(0, moved)
        for t in kv:
            t.index_copy_(0, moved, t.index_select(0, src))
    return kv[0][:m], kv[1][:m]


@dataclass
class DecoderState:
    """What incremental decoding carries between steps, one row per hypothesis.

    cross_kv[l]: keys/values of layer l's cross-attention, (A, H, S, Dh), computed once per
        source and shared by its `group` consecutive rows (beam search: group = beam size), so
        rows = A * group and beam reordering never copies them;
    memory_mask: (A, S) True at real source tokens;
    self_kv[l]: cached self-attention keys/values, (rows, H, C, Dh) buffers holding positions
        0..step-1 (capacity C grows in blocks, see _cache_write);
    step: number of target positions consumed.
    """

    cross_kv: list[tuple[Tensor, Tensor]]
    memory_mask: Tensor
    self_kv: list[Optional[tuple[Tensor, Tensor]]] = field(default_factory=list)
    step: int = 0
    group: int = 1

    @property
    def src_mask(self) -> Tensor:
        """(rows, S): each row's source mask."""
        return self.memory_mask if self.group == 1 else self.memory_mask.repeat_interleave(self.group, 0)

    def select(self, index: Tensor) -> "DecoderState":
        """Rows `index` of the state (reorder after beam back-pointers, expand to beams, drop rows).

        Selections of at most as many rows are done in place (see _reorder_rows: this state is
        consumed), expansions copy. The cross-attention K/V stay shared when the selected rows come
        in equal runs of one source each (what beam search and greedy search produce); they follow
        the sources' order and subset when sources drop out, and expand to one copy per row otherwise.
        """
        self_kv = [None if kv is None else _reorder_rows(kv, index) for kv in self.self_kv]
        sources = torch.div(index, self.group, rounding_mode="floor")  # (rows',)
        used, counts = torch.unique_consecutive(sources, return_counts=True)
        group = int(counts[0]) if counts.numel() else 1
        shared = bool((counts == group).all())
        if not shared:
            used, group = sources, 1
        if used.numel() == self.memory_mask.size(0) and bool(
            (used == torch.arange(used.numel(), device=used.device)).all()
        ):
            cross, mask = self.cross_kv, self.memory_mask  # the same sources: nothing to copy
        else:
            cross, mask = [_reorder_rows(kv, used) for kv in self.cross_kv], self.memory_mask.index_select(0, used)
        return DecoderState(cross, mask, self_kv, self.step, group)


class Seq2SeqTransformer(nn.Module):
    """Embeddings * sqrt(d) + positions → N encoder layers; the same for the decoder, then a softmax.

    Shapes: src (B, S) and tgt_in (B, T) token ids; forward returns logits (B, T, V), or
    (K, V) for the K positions selected by `keep` (B, T) — the loss never pays for padding.
    """

    def __init__(
        self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int, pad_id: int = 0, bos_id: int = 2, eos_id: int = 3
    ) -> None:
        super().__init__()
        if cfg.share_embeddings and src_vocab != tgt_vocab:
            raise ValueError("share_embeddings needs one joint vocabulary")
        self.cfg, self.pad_id, self.bos_id, self.eos_id = cfg, pad_id, bos_id, eos_id
        self.tgt_embed = nn.Embedding(tgt_vocab, cfg.d_model, padding_idx=pad_id)
        self.src_embed = (
            self.tgt_embed if cfg.share_embeddings else nn.Embedding(src_vocab, cfg.d_model, padding_idx=pad_id)
        )
        if cfg.positions == "learned":
            self.pos_embed: Optional[nn.Embedding] = nn.Embedding(cfg.max_positions, cfg.d_model)
        else:
            self.pos_embed = None
            self.register_buffer("pos_table", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.output = nn.Linear(cfg.d_model, tgt_vocab, bias=False)
        self.reset_parameters()
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, zero biases, embeddings N(0, d^-0.5) with a zero pad row."""
        for name, p in self.named_parameters():
            if p.dim() > 1 and "embed" not in name:
                nn.init.xavier_uniform_(p)
            elif p.dim() == 1 and name.endswith("bias"):
                nn.init.zeros_(p)
        for emb in {id(m): m for m in (self.src_embed, self.tgt_embed)}.values():
            nn.init.normal_(emb.weight, 0.0, self.cfg.d_model**-0.5)
            with torch.no_grad():
                emb.weight[self.pad_id].zero_()
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, 0.0, self.cfg.d_model**-0.5)

    def _embed(self, table: nn.Embedding, ids: Tensor, offset: int = 0) -> Tensor:
        """table(ids) * sqrt(d) + PE(offset..offset+T), then dropout. ids (B, T) → (B, T, D)."""
        pos = torch.arange(offset, offset + ids.size(1), device=ids.device)
        pe = self.pos_embed(pos) if self.pos_embed is not None else self.pos_table[pos]
        return self.drop(table(ids) * math.sqrt(self.cfg.d_model) + pe)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) → memory (B, S, D), src_mask (B, S)."""
        src_mask = src.ne(self.pad_id)
        x = self._embed(self.src_embed, src)
        attn_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder:
            x = layer(x, attn_mask)
        return self.enc_norm(x), src_mask

    def forward(self, src: Tensor, tgt_in: Tensor, keep: Optional[Tensor] = None, project: bool = True) -> Tensor:
        """Teacher-forced logits for training: (B, T, V), or (K, V) at positions where keep is True.

        project=False returns the final decoder states instead ((B, T, D) or (K, D)), for a loss
        that applies the output layer itself (`loss.output_layer_loss`)."""
        memory, src_mask = self.encode(src)
        state = self.start_from(memory, src_mask)
        x = self._embed(self.tgt_embed, tgt_in)
        for layer, kv in zip(self.decoder, state.cross_kv):
            x = layer(x, kv, src_mask[:, None, None, :])
        x = self.dec_norm(x)
        x = x[keep] if keep is not None else x
        return self.output(x) if project else x

    @torch.no_grad()
    def cross_attention(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced cross-attention of every decoder layer and head: (L, B, H, T, S) float32.
        src (B, S) with EOS, tgt_in (B, T) = BOS + target tokens; row t is the attention while
        predicting target token t."""
        memory, src_mask = self.encode(src)
        state = self.start_from(memory, src_mask)
        x = self._embed(self.tgt_embed, tgt_in)
        maps = []
        for layer, kv in zip(self.decoder, state.cross_kv):
            x, w = layer.forward_with_attention(x, kv, src_mask[:, None, None, :])
            maps.append(w.float())
        return torch.stack(maps)

    def start_from(self, memory: Tensor, src_mask: Tensor) -> DecoderState:
        # contiguous: as views of the fused K/V projection, every step's attention matmuls copied
        # them (~10% of fp32 decoding time) and dropping finished sentences gathered them slowly
        cross = [
            tuple(
                t.to(stored_dtype(memory, a.cross_attn.kv_dtype)).contiguous() for t in a.cross_attn.keys_values(memory)
            )
            for a in self.decoder
        ]
        return DecoderState(cross, src_mask, [None] * len(self.decoder), 0)

    def start(self, src: Tensor) -> DecoderState:
        """Encode src (B, S) and precompute every layer's cross-attention keys/values.

        With bf16 attention products (MultiHeadAttention.kv_dtype) the source is first padded to a
        multiple of KEY_BLOCK positions: oneDNN's bf16 products sum over the keys in blocks, and
        agree bitwise across paddings only when every length is a whole number of blocks
        (measured: key lengths padded to multiples of 2, 8 or 16 still gave differing rows; 32
        none, for 1-511 keys padded by up to 600). So a sentence alone and the same sentence in a
        longer batch get the same numbers. At least two blocks: a single query over exactly 32 keys
        (greedy search) takes another kernel, whose sums rarely round differently (measured: 1 in
        500 random products; 64, 96, 128 and 256 keys agree)."""
        if self.decoder[0].cross_attn.kv_dtype is not None:
            keys = max(2 * KEY_BLOCK, -(-src.size(1) // KEY_BLOCK) * KEY_BLOCK)
            src = F.pad(src, (0, keys - src.size(1)), value=self.pad_id)
        return self.start_from(*self.encode(src))

    def step(
        self, tokens: Tensor, state: DecoderState, need_attention: bool = False
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Feed tokens (N,) at position state.step; returns log_probs (N, V) in float32 and,
        if asked, the last decoder layer's head-averaged cross-attention (N, S)."""
        if state.step >= self.cfg.max_positions:
            raise ValueError(f"target longer than max_positions ({self.cfg.max_positions})")
        x = self._embed(self.tgt_embed, tokens[:, None], offset=state.step)  # (N, 1, D)
        mask = state.memory_mask[:, None, None, :]
        weights = None
        last = len(self.decoder) - 1
        for i, layer in enumerate(self.decoder):
            x, state.self_kv[i], w = layer.step(
                x, state.cross_kv[i], mask, state.self_kv[i], state.step, need_attention and i == last, state.group
            )
            if w is not None:
                weights = w[:, 0, :].float()
        state.step += 1
        logits = self.output(self.dec_norm(x[:, 0]))  # (N, V)
        return logits.float().log_softmax(-1), weights


class _SkipRandomInit(TorchFunctionMode):
    """While active (in this thread only: torch function modes are thread-local), the random
    fills of parameter initialisation return their tensor untouched. For a model whose every
    weight `load_state_dict(strict=True)` overwrites next: drawing ~12M random numbers first
    costs ~0.07 s of start-up for nothing."""

    SKIPPED = frozenset(
        {
            torch.Tensor.uniform_,
            torch.Tensor.normal_,
            nn.init.uniform_,
            nn.init.normal_,
            nn.init.kaiming_uniform_,
            nn.init.xavier_uniform_,
            nn.init.trunc_normal_,
        }
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_model(
    cfg: ModelConfig, src_vocab: int, tgt_vocab: int, pad_id: int, bos_id: int, eos_id: int, init: bool = True
) -> Seq2SeqTransformer:
    """The one constructor used by training, checkpoint loading and tests.

    init=False leaves the parameters' values undefined (for a caller that loads all of them next).
    """
    if init:
        return Seq2SeqTransformer(cfg, src_vocab, tgt_vocab, pad_id, bos_id, eos_id)
    with _SkipRandomInit():
        return Seq2SeqTransformer(cfg, src_vocab, tgt_vocab, pad_id, bos_id, eos_id)
