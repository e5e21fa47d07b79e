"""The Transformer: positions, attention against a hand-written reference, masks, the incremental
cache, weight sharing, state reordering, and a small learning test (reverse digit strings)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from seq2seq_cli.loss import label_smoothed_nll
from seq2seq_cli.model import (
    CACHE_BLOCK,
    DecoderState,
    MultiHeadAttention,
    Seq2SeqTransformer,
    build_model,
    cache_capacity,
    sinusoidal_positions,
)
from seq2seq_cli.recipe import DecodeConfig, ModelConfig
from seq2seq_cli.search import greedy_search

PAD, UNK, BOS, EOS = 0, 1, 2, 3
V = 17


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        d_model=16,
        n_heads=4,
        n_encoder_layers=2,
        n_decoder_layers=2,
        ff_dim=32,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        max_positions=32,
    )
    return ModelConfig(**{**base, **kw})


def make_model(seed: int = 0, src_vocab: int = V, tgt_vocab: int = V, **kw) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return build_model(small_cfg(**kw), src_vocab, tgt_vocab, pad_id=PAD, bos_id=BOS, eos_id=EOS).eval()


def random_batch(
    seed: int, batch: int = 3, src_len: int = 7, tgt_len: int = 6, src_lengths: tuple[int, ...] = (7, 4, 2)
) -> tuple[torch.Tensor, torch.Tensor]:
    """src (B, S) with EOS at the end of each row and pads after it; tgt_in (B, T) starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (batch, src_len), generator=g)
    for i, n in enumerate(src_lengths[:batch]):
        src[i, n - 1] = EOS
        src[i, n:] = PAD
    tgt = torch.randint(4, V, (batch, tgt_len), generator=g)
    tgt[:, 0] = BOS
    return src, tgt


# ------------------------------------------------------------------------------ positions


def test_sinusoidal_hand_picked_entries() -> None:
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16) and pe.dtype == torch.float32
    expected = {
        (0, 0): 0.0,
        (0, 1): 1.0,
        (0, 15): 1.0,
        (1, 0): math.sin(1.0),
        (1, 1): math.cos(1.0),
        (7, 4): math.sin(7 / 10000 ** (4 / 16)),
        (7, 5): math.cos(7 / 10000 ** (4 / 16)),  # i = 2: 7 / 10
        (3, 8): math.sin(3 / 100.0),
        (3, 9): math.cos(3 / 100.0),  # 10000^(8/16) = 100
        (49, 14): math.sin(49 / 10000 ** (14 / 16)),
        (49, 15): math.cos(49 / 10000 ** (14 / 16)),
    }
    for (pos, j), value in expected.items():
        assert pe[pos, j].item() == pytest.approx(value, abs=1e-6), (pos, j)
    assert pe[7, 4].item() == pytest.approx(math.sin(0.7), abs=1e-6)


def test_sinusoidal_full_formula_and_odd_width() -> None:
    for d in (8, 7):
        pe = sinusoidal_positions(20, d)
        for pos in range(20):
            for j in range(d):
                angle = pos / 10000 ** ((j - j % 2) / d)
                ref = math.sin(angle) if j % 2 == 0 else math.cos(angle)
                assert pe[pos, j].item() == pytest.approx(ref, abs=1e-6)


# ------------------------------------------------------------------------------ attention


def reference_attention(
    mha: MultiHeadAttention, q: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d_k)) V per head from the raw projection weights, in float64.
    allowed (B, T, S) boolean or None. Returns (output (B, T, D), head-averaged probs (B, T, S))."""
    d, h = q.size(-1), mha.n_heads
    dk = d // h
    W = lambda lin: (lin.weight.detach().double(), lin.bias.detach().double())  # noqa: E731
    wq, bq = W(mha.q_proj)
    wkv, bkv = W(mha.kv_proj)
    wo, bo = W(mha.out_proj)
    Q = q.double() @ wq.T + bq
    KV = x.double() @ wkv.T + bkv
    K, Vv = KV[..., :d], KV[..., d:]
    heads, probs = [], []
    for i in range(h):
        sl = slice(i * dk, (i + 1) * dk)
        scores = Q[..., sl] @ K[..., sl].transpose(-1, -2) / math.sqrt(dk)  # (B, T, S)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        p = scores.softmax(-1)
        probs.append(p)
        heads.append(p @ Vv[..., sl])
    out = torch.cat(heads, -1) @ wo.T + bo
    return out, torch.stack(probs).mean(0)


@pytest.fixture
def mha_inputs():
    torch.manual_seed(1)
    mha = MultiHeadAttention(12, 3, dropout=0.5).eval()  # eval: dropout must be off
    q = torch.randn(2, 4, 12)
    x = torch.randn(2, 5, 12)
    key_ok = torch.tensor([[True] * 5, [True, True, True, False, False]])  # (B, S)
    return mha, q, x, key_ok


@pytest.mark.parametrize("need_weights", [False, True])
def test_attend_matches_reference_no_mask(mha_inputs, need_weights: bool) -> None:
    mha, q, x, _ = mha_inputs
    out, w = mha.attend(q, *mha.keys_values(x), need_weights=need_weights)
    ref, ref_w = reference_attention(mha, q, x, None)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    if need_weights:
        assert w.shape == (2, 4, 5) and torch.allclose(w.double(), ref_w, atol=1e-6)
    else:
        assert w is None


@pytest.mark.parametrize("need_weights", [False, True])
def test_attend_matches_reference_padding_mask(mha_inputs, need_weights: bool) -> None:
    mha, q, x, key_ok = mha_inputs
    out, w = mha.attend(q, *mha.keys_values(x), mask=key_ok[:, None, None, :], need_weights=need_weights)
    ref, ref_w = reference_attention(mha, q, x, key_ok[:, None, :].expand(2, 4, 5))
    assert torch.allclose(out.double(), ref, atol=1e-5)
    # the masked keys do matter without the mask (the test can fail)
    unmasked, _ = reference_attention(mha, q, x, None)
    assert not torch.allclose(unmasked[1], ref[1], atol=1e-3)
    if need_weights:
        assert torch.allclose(w.double(), ref_w, atol=1e-6)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4), atol=1e-6)
        assert w[1, :, 3:].abs().max().item() == 0.0
        assert (w[1, :, :3] > 0).all() and (w[0] > 0).all()


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("t,s", [(5, 5), (2, 5), (1, 5)])
def test_attend_causal_bottom_right(t: int, s: int, need_weights: bool) -> None:
    """Causal: query i (the (s-t+i)-th position) sees keys 0..s-t+i, as after a cache of s-t keys."""
    torch.manual_seed(2)
    mha = MultiHeadAttention(8, 2).eval()
    x = torch.randn(2, s, 8)
    q = x[:, s - t :]
    out, _ = mha.attend(q, *mha.keys_values(x), causal=t > 1, need_weights=need_weights)
    allowed = torch.ones(t, s, dtype=torch.bool).tril(s - t).expand(2, t, s)
    ref, _ = reference_attention(mha, q, x, allowed)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_attend_causal_with_padding_mask_and_weights() -> None:
    torch.manual_seed(3)
    mha = MultiHeadAttention(8, 2).eval()
    x = torch.randn(2, 4, 8)
    key_ok = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out, w = mha.attend(x, *mha.keys_values(x), mask=key_ok[:, None, None, :], causal=True, need_weights=True)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril() & key_ok[:, None, :]
    ref, ref_w = reference_attention(mha, x, x, allowed)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(w.double(), ref_w, atol=1e-6)
    assert torch.equal(w > 0, allowed)


# ------------------------------------------------------------------------------ whole model


def test_forward_shapes_and_keep() -> None:
    model = make_model()
    src, tgt = random_batch(0)
    with torch.no_grad():
        logits = model(src, tgt)
        assert logits.shape == (3, 6, V)
        keep = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) > 0.4
        kept = model(src, tgt, keep)
    assert kept.shape == (int(keep.sum()), V)
    assert torch.allclose(kept, logits[keep], atol=1e-6)


def test_causal_mask_future_targets_do_not_leak() -> None:
    model = make_model(dropout=0.0)
    src, tgt = random_batch(1, tgt_len=7)
    with torch.no_grad():
        base = model(src, tgt)
        for t in range(6):
            changed = tgt.clone()
            g = torch.Generator().manual_seed(t)
            changed[:, t + 1 :] = torch.randint(4, V, changed[:, t + 1 :].shape, generator=g)
            changed[:, t + 1] = (tgt[:, t + 1] - 4 + 1) % (V - 4) + 4  # surely different at t+1
            out = model(src, changed)
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5), t
            assert not torch.allclose(out[:, t + 1], base[:, t + 1], atol=1e-4), t  # position t+1 does see it


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_source_padding_invariance(norm: str) -> None:
    model = make_model(norm=norm)
    src, tgt = random_batch(2)
    with torch.no_grad():
        base = model(src, tgt)
        memory, mask = model.encode(src)
        padded = torch.cat([src, torch.full((3, 4), PAD)], 1)
        assert torch.allclose(model(padded, tgt), base, atol=1e-5)
        memory2, mask2 = model.encode(padded)
        assert torch.equal(mask2[:, :7], mask) and not mask2[:, 7:].any()
        assert torch.allclose(memory2[:, :7][mask], memory[mask], atol=1e-5)
        # each row alone, without any pad, gives the same logits as in the padded batch
        for i, n in enumerate((7, 4, 2)):
            alone = model(src[i : i + 1, :n], tgt[i : i + 1])
            assert torch.allclose(alone[0], base[i], atol=1e-5), i
        # and the source content matters (so the check above can fail)
        other = src.clone()
        other[0, 0] = (src[0, 0] - 4 + 1) % (V - 4) + 4
        assert not torch.allclose(model(other, tgt)[0], base[0], atol=1e-4)


CONFIGS = list(itertools.product(["post", "pre"], ["sinusoidal", "learned"], [True, False]))


@pytest.mark.parametrize("norm,positions,share", CONFIGS, ids=["-".join(map(str, c)) for c in CONFIGS])
def test_incremental_decoding_matches_full_forward(norm: str, positions: str, share: bool) -> None:
    model = make_model(seed=4, norm=norm, positions=positions, share_embeddings=share, src_vocab=V if share else V + 5)
    src, tgt = random_batch(5, tgt_len=8)
    with torch.no_grad():
        full = model(src, tgt).log_softmax(-1)  # (B, T, V)
        state = model.start(src)
        assert isinstance(state, DecoderState) and state.step == 0
        for t in range(tgt.size(1)):
            log_probs, attn = model.step(tgt[:, t], state, need_attention=(t % 2 == 0))
            assert log_probs.dtype == torch.float32 and log_probs.shape == (3, V)
            assert torch.allclose(log_probs, full[:, t], atol=1e-5), t
            assert state.step == t + 1
            cap = cache_capacity(t)
            assert all(
                kv[0].shape == (3, 4, cap, 4)
                and kv[0][:, :, t + 1 :].abs().max() == 0
                and kv[1][:, :, t].abs().min() > 0
                for kv in state.self_kv
            )
            if t % 2 == 0:
                assert attn.shape == (3, 7)
                assert torch.allclose(attn.sum(-1), torch.ones(3), atol=1e-5)
                assert attn[1, 4:].abs().max().item() == 0.0 and attn[2, 2:].abs().max().item() == 0.0
            else:
                assert attn is None


def test_cache_capacity_grows_in_blocks() -> None:
    assert [cache_capacity(p) for p in (0, CACHE_BLOCK - 1, CACHE_BLOCK, 2 * CACHE_BLOCK + 3)] == [
        CACHE_BLOCK,
        CACHE_BLOCK,
        2 * CACHE_BLOCK,
        3 * CACHE_BLOCK,
    ]


def test_incremental_decoding_across_cache_blocks_with_reordering() -> None:
    """Targets longer than two cache blocks, rows reordered (beam back-pointers) after every step:
    each step's log-probs equal the full forward pass of the reordered prefixes."""
    length = 2 * CACHE_BLOCK + 5
    model = make_model(seed=7, max_positions=length + 1)
    src, tgt = random_batch(9, tgt_len=length)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        state = model.start(src)
        prefix = tgt[:, :0]
        for t in range(length):
            log_probs, _ = model.step(tgt[:, t], state)
            prefix = torch.cat([prefix, tgt[:, t : t + 1]], 1)
            full = model(src, prefix).log_softmax(-1)[:, -1]
            assert torch.allclose(log_probs, full, atol=1e-5), t
            order = torch.randint(0, 3, (3,), generator=g)
            state, prefix, src, tgt = state.select(order), prefix[order], src[order], tgt[order]


def test_autocast_decoding_stores_bf16_keys_values_and_tracks_fp32() -> None:
    """Under bf16 autocast the cached keys/values (self and cross) are kept in bf16 even for an fp32
    model (int8 decoding relies on it), and the steps still follow the fp32 full forward pass."""
    model = make_model(seed=2)
    src, tgt = random_batch(4)
    with torch.inference_mode():
        full = model(src, tgt).log_softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state = model.start(src)
            steps = [model.step(tgt[:, i], state)[0] for i in range(tgt.size(1))]
    assert {t.dtype for kv in state.cross_kv + state.self_kv for t in kv} == {torch.bfloat16}
    for i, lp in enumerate(steps):
        assert lp.dtype == torch.float32
        assert (lp.exp() - full[:, i].exp()).abs().sum(-1).max().item() < 0.05


def test_step_refuses_beyond_max_positions() -> None:
    model = make_model(max_positions=8)
    src, _ = random_batch(0)
    state = model.start(src)
    with torch.no_grad():
        for _ in range(8):
            model.step(torch.full((3,), BOS), state)
        with pytest.raises(ValueError, match="max_positions"):
            model.step(torch.full((3,), BOS), state)


def test_eval_is_deterministic_and_train_uses_dropout() -> None:
    model = make_model(dropout=0.3)
    src, tgt = random_batch(6)
    with torch.no_grad():
        a, b = model(src, tgt), model(src, tgt)
        assert torch.equal(a, b)
        model.train()
        c = model(src, tgt)
    assert not torch.allclose(a, c, atol=1e-3)


# ------------------------------------------------------------------------------ sharing


def test_weight_tying_and_shared_embeddings() -> None:
    tied = make_model(tie_output=True, share_embeddings=True)
    assert tied.output.weight is tied.tgt_embed.weight
    assert tied.src_embed is tied.tgt_embed
    n_tied = sum(p.numel() for p in tied.parameters())

    unshared = make_model(tie_output=True, share_embeddings=False, src_vocab=V + 3)
    assert unshared.output.weight is unshared.tgt_embed.weight
    assert unshared.src_embed is not unshared.tgt_embed
    assert unshared.src_embed.weight.shape == (V + 3, 16)

    untied = make_model(tie_output=False, share_embeddings=True)
    assert untied.output.weight is not untied.tgt_embed.weight
    assert sum(p.numel() for p in untied.parameters()) == n_tied + V * 16

    # a gradient step through the tied output moves the embedding too
    src, tgt = random_batch(7)
    before = tied.tgt_embed.weight.detach().clone()
    tied.zero_grad()
    tied(src, tgt)[..., 5].sum().backward()
    with torch.no_grad():
        for p in tied.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert tied.output.weight is tied.tgt_embed.weight
    assert not torch.equal(before, tied.tgt_embed.weight)


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_build_without_init_draws_no_random_numbers_and_loads_exactly(positions: str) -> None:
    """init=False (checkpoint loading) skips every random fill, leaves the RNG where it was, and
    after a strict load the model computes exactly what the initialised one does."""
    ref = make_model(seed=3, positions=positions)
    torch.manual_seed(11)
    bare = build_model(small_cfg(positions=positions), V, V, pad_id=PAD, bos_id=BOS, eos_id=EOS, init=False)
    after = torch.rand(4)
    torch.manual_seed(11)
    assert torch.equal(after, torch.rand(4))  # no random number was drawn while building
    bare.load_state_dict(ref.state_dict(), strict=True)
    src, tgt = random_batch(5)
    assert torch.equal(bare.eval()(src, tgt), ref(src, tgt))
    # the skipping mode is gone afterwards: a normal build is still random and reproducible
    assert not torch.equal(make_model(seed=4).output.weight, make_model(seed=5).output.weight)
    assert torch.equal(make_model(seed=3, positions=positions).output.weight, ref.output.weight)


def test_share_embeddings_needs_joint_vocab() -> None:
    with pytest.raises(ValueError, match="joint"):
        make_model(share_embeddings=True, src_vocab=V + 1)


def test_pad_embedding_is_zero_and_gets_no_gradient() -> None:
    model = make_model(share_embeddings=False, tie_output=False)
    assert model.src_embed.weight[PAD].abs().max().item() == 0.0
    assert model.tgt_embed.weight[PAD].abs().max().item() == 0.0
    assert model.tgt_embed.weight[5].abs().max().item() > 0.0
    src, tgt = random_batch(8)
    tgt[0, 3:] = PAD
    model(src, tgt).sum().backward()
    assert model.src_embed.weight.grad[PAD].abs().max().item() == 0.0
    assert model.tgt_embed.weight.grad[PAD].abs().max().item() == 0.0
    assert model.src_embed.weight.grad[EOS].abs().max().item() > 0.0


# ------------------------------------------------------------------------------ DecoderState.select


def test_state_select_reorders_rows() -> None:
    model = make_model(seed=9)
    src, tgt = random_batch(9, tgt_len=5)
    index = torch.tensor([2, 0, 0, 1, 2])
    with torch.no_grad():
        state = model.start(src)
        for t in range(3):
            model.step(tgt[:, t], state)
        picked = state.select(index)
        assert picked.step == 3 and torch.equal(picked.src_mask, state.src_mask[index])
        lp_picked, _ = model.step(tgt[index, 3], picked)
        lp_all, _ = model.step(tgt[:, 3], state)  # the original state is not affected by select
        assert torch.allclose(lp_picked, lp_all[index], atol=1e-6)
        # the same as decoding the reordered inputs from scratch
        fresh = model.start(src[index])
        for t in range(4):
            lp_fresh, _ = model.step(tgt[index, t], fresh)
        assert torch.allclose(lp_picked, lp_fresh, atol=1e-5)
        # and the next step after select keeps agreeing with a full forward on reordered inputs
        lp_next, _ = model.step(tgt[index, 4], picked)
        full = model(src[index], tgt[index]).log_softmax(-1)
        assert torch.allclose(lp_next, full[:, 4], atol=1e-5)
        # rows differ (so the reordering is visible)
        assert not torch.allclose(lp_picked[0], lp_picked[1], atol=1e-4)


def test_state_select_before_first_step() -> None:
    model = make_model(seed=10)
    src, tgt = random_batch(10, tgt_len=3)
    beams = torch.arange(3).repeat_interleave(2)  # expand to 2 beams per sentence
    with torch.no_grad():
        state = model.start(src).select(beams)
        assert all(kv is None for kv in state.self_kv)
        assert state.cross_kv[0][0].shape[0] == 3 and state.group == 2  # K/V shared by each sentence's rows
        assert torch.equal(state.src_mask, src.ne(PAD)[beams])
        out = [model.step(tgt[beams, t], state)[0] for t in range(3)]
        full = model(src, tgt).log_softmax(-1)[beams]
    for t in range(3):
        assert torch.allclose(out[t], full[:, t], atol=1e-5)


@pytest.mark.parametrize(
    "index, shared",
    [
        ([1, 0, 5, 4], True),  # reorder within sentences, drop sentence 1: K/V subset, still shared
        ([1, 0, 3, 2, 5, 4], True),  # every sentence, reordered within: K/V not even copied
        ([4, 5, 0, 1], True),  # sentence 2 moved into sentence 0's place (a filled hole): still shared
        ([4, 1, 0], False),  # unequal runs (one row of sentence 2, two of 0): one K/V copy per row
        ([0, 0, 1, 2, 4], False),  # unequal runs per source: falls back too
    ],
)
def test_state_select_keeps_cross_kv_shared_when_it_can(index: list[int], shared: bool) -> None:
    """After expanding to 2 beams and two steps, any selection decodes like a full forward pass
    over the selected rows; the cross-attention K/V are shared whenever the rows allow it."""
    model = make_model(seed=11)
    src, tgt = random_batch(11, tgt_len=4)
    beams = torch.arange(3).repeat_interleave(2)
    rows = beams[torch.tensor(index)]  # the sentence behind each selected row
    with torch.no_grad():
        state = model.start(src).select(beams)
        for t in range(2):
            model.step(tgt[beams, t], state)
        picked = state.select(torch.tensor(index))
        assert (picked.group > 1) == shared
        assert picked.cross_kv[0][0].shape[0] * picked.group == len(index)
        assert torch.equal(picked.src_mask, src.ne(PAD)[rows])
        out = [model.step(tgt[rows, t], picked)[0] for t in (2, 3)]
        full = model(src[rows], tgt[rows]).log_softmax(-1)
    for i, t in enumerate((2, 3)):
        assert torch.allclose(out[i], full[:, t], atol=1e-5)


# ------------------------------------------------------------------------------ learning

DIGITS = range(4, 14)  # vocabulary: pad, unk, bos, eos + ten digits = 14


def reverse_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Random digit strings of length 3-8: src = x + EOS, tgt_in = BOS + reversed(x),
    tgt_out = reversed(x) + EOS; also the references reversed(x)."""
    lengths = torch.randint(3, 9, (n,), generator=g)
    digits = torch.randint(DIGITS.start, DIGITS.stop, (n, 8), generator=g)
    pos = torch.arange(9)
    src = torch.full((n, 9), PAD)
    src[:, :8] = digits
    src[pos[None, :9] >= lengths[:, None]] = PAD
    src[torch.arange(n), lengths] = EOS
    # reversed prefix: y_j = x_{L-1-j}
    idx = (lengths[:, None] - 1 - pos[None, :8]).clamp(min=0)
    y = digits.gather(1, idx)
    tgt_out = torch.full((n, 9), PAD)
    tgt_out[:, :8] = y
    tgt_out[pos[None, :9] >= lengths[:, None]] = PAD
    tgt_out[torch.arange(n), lengths] = EOS
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt_out[:, :-1]], 1).masked_fill(
        torch.cat([torch.zeros(n, 1, dtype=torch.bool), tgt_out[:, :-1].eq(EOS)], 1), PAD
    )
    refs = [y[i, : lengths[i]].tolist() for i in range(n)]
    return src, tgt_in, tgt_out, refs


def test_reverse_batch_helper() -> None:
    src, tgt_in, tgt_out, refs = reverse_batch(50, torch.Generator().manual_seed(0))
    for i in range(50):
        x = [t for t in src[i].tolist() if t not in (PAD, EOS)]
        assert src[i].tolist()[: len(x) + 1] == x + [EOS] and 3 <= len(x) <= 8
        assert refs[i] == x[::-1]
        assert tgt_in[i].tolist() == [BOS] + refs[i] + [PAD] * (8 - len(x))
        assert tgt_out[i].tolist() == refs[i] + [EOS] + [PAD] * (8 - len(x))


@pytest.mark.slow
def test_learns_to_reverse_digit_strings() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig(
        d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, ff_dim=128, dropout=0.0, max_positions=32
    )
    model = build_model(cfg, 14, 14, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    steps, warmup = 300, 30
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / warmup, max(0.05, 1 - k / steps)))
    model.train()
    first = last = None
    for _ in range(steps):
        src, tgt_in, tgt_out, _ = reverse_batch(64, g)
        keep = tgt_out.ne(PAD)
        loss, nll, n = label_smoothed_nll(model(src, tgt_in, keep), tgt_out[keep], 0.0, PAD)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        sched.step()
        first = nll.item() / n if first is None else first
        last = nll.item() / n
    assert last < 0.1 * first
    model.eval()
    src, _, _, refs = reverse_batch(200, torch.Generator().manual_seed(123))
    hyps = greedy_search(model, src, DecodeConfig(beam=1, max_len_a=1.0, max_len_b=2))
    exact = sum(h[0].tokens == ref for h, ref in zip(hyps, refs)) / len(refs)
    assert exact >= 0.95, exact


def test_in_place_cache_reorder_equals_index_select() -> None:
    """Beam back-pointers (rows repeated, dropped, swapped, kept) reorder the self-attention cache in
    place; the result must equal a plain index_select of the old cache, including rows that are read
    by one hypothesis and overwritten by another in the same step."""
    from seq2seq_cli.model import _reorder_rows

    gen = torch.Generator().manual_seed(0)
    for index in (
        torch.tensor([0, 0, 1, 3, 2, 5, 5, 4]),  # swaps, repeats, a dropped row (6, 7 unused)
        torch.arange(8),  # nothing moves
        torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]),  # every row moves
        torch.randint(0, 8, (8,), generator=gen),
    ):
        kv = (torch.randn(8, 2, 4, 3, generator=gen), torch.randn(8, 2, 4, 3, generator=gen))
        expected = tuple(t.index_select(0, index) for t in kv)
        ptrs = [t.data_ptr() for t in kv]
        out = _reorder_rows(kv, index)
        assert all(torch.equal(o, e) for o, e in zip(out, expected)), index
        assert [t.data_ptr() for t in out] == ptrs  # in place: no new buffers
    for index in (torch.tensor([0, 2, 3]), torch.tensor([3, 1]), torch.tensor([], dtype=torch.long)):
        kv = (torch.randn(4, 2, 3, 2, generator=gen), torch.randn(4, 2, 3, 2, generator=gen))
        expected = tuple(t.index_select(0, index) for t in kv)
        ptrs = [t.data_ptr() for t in kv]
        out = _reorder_rows(kv, index)  # fewer rows (finished sentences dropped): compacted in place
        assert all(torch.equal(o, e) for o, e in zip(out, expected)), index
        assert all(o.is_contiguous() for o in out)
        if index.numel():
            assert [t.data_ptr() for t in out] == ptrs
    kv = (torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2))
    grown = _reorder_rows(kv, torch.tensor([0, 0, 1, 1, 2, 2]))  # expanding to beams: new buffers
    assert grown[0].shape[0] == 6 and torch.equal(grown[1], kv[1].index_select(0, torch.tensor([0, 0, 1, 1, 2, 2])))


def test_row_stable_linear_equals_linear_and_keeps_shapes() -> None:
    """The lone-row guard computes one row as two and returns it in the caller's shape."""
    from seq2seq_cli.model import RowStableLinear

    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 5)
    guarded = torch.nn.Linear(8, 5)
    guarded.load_state_dict(plain.state_dict())
    guarded.__class__ = RowStableLinear
    for shape in [(8,), (1, 8), (1, 1, 8), (3, 8), (2, 4, 8)]:
        x = torch.randn(*shape)
        out = guarded(x)
        assert out.shape == (*shape[:-1], 5)
        assert torch.allclose(out, plain(x), atol=1e-6)
    assert set(guarded.state_dict()) == {"weight", "bias"}


def test_row_stable_linear_gives_a_lone_row_its_bits_from_a_larger_product() -> None:
    """Under bf16 matmuls a lone row (plain nn.Linear: another kernel) differs in its last bits from
    the same row among 40; the guarded layer gives it exactly the batched bits."""
    from seq2seq_cli.model import RowStableLinear
    from seq2seq_cli.precision import bf16_matmuls, native_bf16

    if not native_bf16():
        pytest.skip("bf16 is emulated on this CPU")
    torch.manual_seed(0)
    plain = torch.nn.Linear(256, 256)
    guarded = torch.nn.Linear(256, 256)
    guarded.load_state_dict(plain.state_dict())
    guarded.__class__ = RowStableLinear
    rows = torch.randn(40, 256)
    with torch.no_grad(), bf16_matmuls():
        batched = plain(rows)
        assert not all(torch.equal(plain(rows[i : i + 1])[0], batched[i]) for i in range(40))
        assert all(torch.equal(guarded(rows[i : i + 1])[0], batched[i]) for i in range(40))


def test_row_floor_gives_rows_in_the_padded_range_the_bits_of_a_larger_product() -> None:
    """A 1024 -> 256 bf16 layer on AMX sums 33-255 rows in another order than 256 or more: rows
    differ bitwise from the same rows inside a 300-row product (measured), unless row_floor pads
    those products to 256 rows; small products (<= 32 rows) are left as they are."""
    from seq2seq_cli.model import RowStableLinear

    if not (torch.backends.mkldnn.is_available() and torch.cpu._is_amx_tile_supported()):
        pytest.skip("measured on AMX; other CPUs sum in other orders")
    torch.manual_seed(0)
    layer = torch.nn.Linear(1024, 256).to(torch.bfloat16)
    layer.__class__ = RowStableLinear
    rows = torch.randn(300, 1024).relu().bfloat16()
    with torch.no_grad():
        full = layer(rows)
        assert any(not torch.equal(layer(rows[:m]), full[:m]) for m in (64, 100, 200, 255))
        layer.row_floor = 256
        for m in (1, 5, 33, 64, 100, 200, 255, 256):
            out = layer(rows[:m])
            assert out.shape == (m, 256) and torch.equal(out, full[:m]), m
