"""`translate export CKPT -o DIR --format ctranslate2`: a self-contained CTranslate2 model directory.

The checkpoint's Transformer is written through CTranslate2's spec API (as its own converters
do), mapping model.py exactly:
  * embeddings scaled by sqrt(d_model) (scale_embeddings), then this model's own position table
    added: the sinusoidal table of `sinusoidal_positions` (sin at even, cos at odd dimensions,
    which is not CTranslate2's built-in half-sin/half-cos layout) or the learned one, both starting
    at position 0 for the first source token and for <s> on the target side;
  * post-norm LN(x + f(x)) or pre-norm x + f(LN(x)) with the final encoder/decoder norms;
    LayerNorm epsilon 1e-5; ReLU or exact (erf) GELU;
  * self-attention: q_proj and kv_proj fused into one QKV matrix (q, k, v order); cross-attention:
    q, then the fused kv_proj; heads split the same way (contiguous d_head slices);
  * output projection (tied to the target embedding or not, no bias); source/target embeddings
    shared or not; one joint vocabulary or one per side, in sentencepiece id order, so that the
    special ids pad=0 unk=1 bos=2 eos=3 are CTranslate2's <pad>, <unk>, <s>, </s>.
Next to the model: spm.model (or src.model + tgt.model) and translate_export.json (decode defaults,
max_positions, the parity figures), so the directory is all `decode --backend ctranslate2` needs.

Parity check (skipped with check=False): the float32 export decodes a sample (the recipe's dev set
if its files exist, else SAMPLE_SENTENCES) next to this project's decoder, greedy and beam 5 with the
power length penalty (the form both run exactly); the export is refused when greedy token-exact
agreement is below MIN_GREEDY_EXACT. A quantised export is checked as float32 (the same weights
before quantisation) and its own agreement is reported without a bar.

The directory is written into a temporary sibling and renamed at the end: an error or an
interruption leaves no DIR behind (and a DIR replaced with force stays intact until then).
Public names: ExportError, export_ctranslate2, build_spec, QUANTIZATIONS, MIN_GREEDY_EXACT.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import load_checkpoint, load_model
from .ct2_backend import EXPORT_FORMAT, EXPORT_INFO, CT2Translator, import_ctranslate2, max_decode_len
from .data import clean_line, read_lines
from .model import Seq2SeqTransformer
from .recipe import UserError
from .score import corpus_scores
from .tokenizer import Tokenizer

__all__ = ["ExportError", "export_ctranslate2", "build_spec", "QUANTIZATIONS", "MIN_GREEDY_EXACT", "SAMPLE_SENTENCES"]

QUANTIZATIONS = ("float32", "int8", "int8_float32", "bfloat16")
MIN_GREEDY_EXACT = 0.99
CHECK_BEAM = 5

log = logging.getLogger(__name__)

SAMPLE_SENTENCES = (
    "In the beginning God created the heavens and the earth.",
    "The Lord is my shepherd; I shall not want.",
    "Jesus wept.",
    "And God said, Let there be light: and there was light.",
    "Love your neighbour as yourself.",
    "The house is on the hill near the river.",
    "She opened the door and walked into the garden.",
    "We will meet again tomorrow morning.",
    "Where is the nearest station?",
    "The children were playing in the street until dark.",
    "He gave bread to the poor and water to the thirsty.",
    "Blessed are the peacemakers, for they shall be called the children of God.",
    "I do not know what you are talking about.",
    "The king sent his servants to the city.",
    "They went up to the mountain to pray.",
    "Do not be afraid.",
    "My father works in a small shop.",
    "The sun rises in the east and sets in the west.",
    "Give us this day our daily bread.",
    "All the people heard the voice of the prophet.",
    "It was raining when we left the house.",
    "The disciples asked him many questions.",
    "A soft answer turns away wrath.",
    "Two men went into the temple.",
    "The fields are white, ready for harvest.",
    "What is your name?",
    "Seven years of plenty will come throughout the land of Egypt.",
    "The book is on the table.",
    "Peace be with you.",
    "He who has ears to hear, let him hear.",
)


class ExportError(UserError):
    """An export that cannot be written or failed its parity check; the message names the file."""


def _np(t: torch.Tensor) -> Any:
    return t.detach().float().cpu().contiguous().numpy().copy()


def _linear(spec: Any, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    spec.weight = _np(weight)
    if bias is not None:
        spec.bias = _np(bias)


def _norm(spec: Any, norm: torch.nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _np(norm.weight), _np(norm.bias)


def _attention(spec: Any, attn: Any, fused_qkv: bool) -> None:
    """Self-attention: linear[0] = [q; k; v] (kv_proj already holds [k; v]); cross: linear[0] = q,
    linear[1] = [k; v]; the last linear is the output projection."""
    q, kv = attn.q_proj, attn.kv_proj
    if fused_qkv:
        _linear(spec.linear[0], torch.cat([q.weight, kv.weight]), torch.cat([q.bias, kv.bias]))
    else:
        _linear(spec.linear[0], q.weight, q.bias)
        _linear(spec.linear[1], kv.weight, kv.bias)
    _linear(spec.linear[-1], attn.out_proj.weight, attn.out_proj.bias)


def _ffn(spec: Any, ffn: Any, norm: torch.nn.LayerNorm) -> None:
    _norm(spec.layer_norm, norm)
    _linear(spec.linear_0, ffn.fc1.weight, ffn.fc1.bias)
    _linear(spec.linear_1, ffn.fc2.weight, ffn.fc2.bias)


def position_table(model: Seq2SeqTransformer) -> torch.Tensor:
    """(max_positions, d_model): what model._embed adds at positions 0, 1, ... (sinusoidal or learned)."""
    return model.pos_embed.weight if model.pos_embed is not None else model.pos_table


def build_spec(model: Seq2SeqTransformer, tok: Tokenizer) -> Any:
    """A validated ctranslate2 TransformerSpec holding the model's weights and vocabularies."""
    import_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.cfg
    pre = cfg.norm == "pre"
    act = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}.get(cfg.activation)
    if act is None:
        raise ExportError(f"activation {cfg.activation!r} has no CTranslate2 equivalent")
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers), cfg.n_heads, pre_norm=pre, no_final_norm=not pre, activation=act
    )
    positions = position_table(model)
    enc, dec = spec.encoder, spec.decoder
    _linear(enc.embeddings[0], model.src_embed.weight)
    enc.scale_embeddings = True  # x * sqrt(d_model)
    enc.position_encodings.encodings = _np(positions)
    for layer_spec, layer in zip(enc.layer, model.encoder):
        _attention(layer_spec.self_attention, layer.attn, fused_qkv=True)
        _norm(layer_spec.self_attention.layer_norm, layer.sub1.norm)
        _ffn(layer_spec.ffn, layer.ffn, layer.sub2.norm)
    _linear(dec.embeddings, model.tgt_embed.weight)
    dec.scale_embeddings = True
    dec.position_encodings.encodings = _np(positions)
    _linear(dec.projection, model.output.weight)
    for layer_spec, layer in zip(dec.layer, model.decoder):
        _attention(layer_spec.self_attention, layer.self_attn, fused_qkv=True)
        _norm(layer_spec.self_attention.layer_norm, layer.sub1.norm)
        _attention(layer_spec.attention, layer.cross_attn, fused_qkv=False)
        _norm(layer_spec.attention.layer_norm, layer.sub2.norm)
        _ffn(layer_spec.ffn, layer.ffn, layer.sub3.norm)
    if pre:
        _norm(enc.layer_norm, model.enc_norm)
        _norm(dec.layer_norm, model.dec_norm)
    src_vocab = [tok.id_to_piece(i, "src") for i in range(tok.src_vocab_size)]
    tgt_vocab = [tok.id_to_piece(i, "tgt") for i in range(tok.tgt_vocab_size)]
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    for name, vocab in (("source", src_vocab), ("target", tgt_vocab)):
        if vocab[:4] != specials:
            raise ExportError(f"{name} vocabulary starts with {vocab[:4]}, expected {specials}")
    spec.register_source_vocabulary(src_vocab)
    spec.register_target_vocabulary(tgt_vocab)
    spec.config.layer_norm_epsilon = 1e-5
    spec.config.add_source_eos = False  # the source pieces are passed with their "</s>" (ct2_backend)
    spec.validate()
    return spec


def _save(spec: Any, directory: Path, quantization: str) -> None:
    spec.optimize(quantization=quantization)
    spec.save(str(directory))


def check_sample(recipe: Any, max_lines: int) -> tuple[list[str], Optional[list[str]], str]:
    """(source lines, references or None, where from): the recipe's dev set if its files exist,
    else the built-in SAMPLE_SENTENCES."""
    dev = getattr(recipe.data, "dev", None)
    if dev is not None and dev.src is not None and dev.tgt is not None and dev.src.is_file() and dev.tgt.is_file():
        src, ref = read_lines(dev.src), read_lines(dev.tgt)
        pairs = [(s, r) for s, r in zip(src, ref) if s][:max_lines]
        if pairs:
            return [s for s, _ in pairs], [r for _, r in pairs], str(dev.src)
    return list(SAMPLE_SENTENCES[:max_lines]), None, "built-in sample"


def _bleu(hyps: list[str], refs: list[str]) -> float:
    return round(corpus_scores(hyps, [refs], ["bleu"])[0].score, 2)


def parity(
    ckpt_path: Path,
    model_dir: Path,
    lines: Sequence[str],
    refs: Optional[Sequence[str]],
    decode: dict[str, Any],
    compute_type: str = "float32",
) -> dict[str, Any]:
    """Decode `lines` with this project's fp32 decoder and with the export; per search (greedy,
    beam 5 with the power length penalty): token-exact match rate, BLEU of each against the
    references (or None), and BLEU of the export against this project's output."""
    from .translate import Translator

    ours = Translator([ckpt_path], "cpu", 0, {"precision": "fp32"})  # workers: the checkpoint's; same output
    theirs = CT2Translator(model_dir, "cpu", 0, compute_type)
    alpha = float(decode.get("alpha", 0.6))
    common = dict(
        max_len_a=float(decode.get("max_len_a", 1.5)),
        max_len_b=int(decode.get("max_len_b", 10)),
        min_len=int(decode.get("min_len", 0)),
    )
    out: dict[str, Any] = {}
    for name, beam in (("greedy", 1), (f"beam{CHECK_BEAM}", CHECK_BEAM)):
        opts = ours.options(
            beam=beam,
            n_best=1,
            alpha=alpha,
            beta=0.0,
            length_penalty="power",
            sample=False,
            stop_early=True,
            no_repeat_ngram=0,
            **common,
        )
        t0 = time.perf_counter()
        a = [h[0].tokens if h else [] for h in ours.translate_window(list(lines), opts)]
        t1 = time.perf_counter()
        b = [h[0][0] if h else [] for h in theirs.translate_pieces(lines, beam, 1, alpha, **common)]
        t2 = time.perf_counter()
        text_a = [ours.tokenizer.decode_tgt(x) for x in a]
        text_b = [theirs.tokenizer.decode_tgt(x) for x in b]
        mismatched = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        # where every beam hits max_len the two rank them differently (ours counts the forced EOS)
        limits = [
            max_decode_len(
                len(theirs._src_pieces(clean_line(x))), common["max_len_a"], common["max_len_b"], theirs.max_positions
            )
            for x in lines
        ]
        at_limit = [i for i in mismatched if max(len(a[i]), len(b[i])) >= limits[i]]
        out[name] = {
            "exact": 1 - len(mismatched) / max(1, len(a)),
            "mismatched_lines": [i + 1 for i in mismatched][:20],
            "mismatched_at_length_limit": [i + 1 for i in at_limit][:20],
            "bleu_translate": _bleu(text_a, list(refs)) if refs else None,
            "bleu_ctranslate2": _bleu(text_b, list(refs)) if refs else None,
            "bleu_ctranslate2_vs_translate": _bleu(text_b, text_a),
            "seconds_translate": round(t1 - t0, 2),
            "seconds_ctranslate2": round(t2 - t1, 2),
        }
        if refs:
            out[name]["bleu_delta"] = round(out[name]["bleu_ctranslate2"] - out[name]["bleu_translate"], 2)
    return out


def decode_notes(decode: dict[str, Any]) -> list[str]:
    """What of the checkpoint's decode defaults CTranslate2 cannot run exactly (warned at export;
    `decode --backend ctranslate2` warns about GNMT again and refuses beta > 0)."""
    notes = []
    if decode.get("length_penalty", "gnmt") == "gnmt" and float(decode.get("alpha", 0)) != 0:
        notes.append(
            f"decode defaults use the GNMT length penalty (alpha={decode['alpha']}): CTranslate2 "
            "has only the power form |Y|^alpha, which `decode --backend ctranslate2` uses with the "
            "same alpha (greedy output is unaffected; beam results may differ; the parity check "
            "uses power on both sides)"
        )
    if float(decode.get("beta", 0)) > 0:
        notes.append(
            f"decode defaults use a coverage penalty (beta={decode['beta']}): `decode --backend "
            "ctranslate2` refuses it; pass --beta 0 there"
        )
    if not decode.get("stop_early", True):
        notes.append(
            "decode defaults use stop_early: false; CTranslate2 always stops at `beam` finished "
            "hypotheses (stop_early: true)"
        )
    return notes


def _prepare_target(out_dir: Path, force: bool) -> Path:
    """Check the destination and return a fresh temporary sibling directory to write into."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir}: directory exists and is not empty (use --force to replace it)")
    parent = out_dir.parent
    if not parent.is_dir():
        raise ExportError(f"{out_dir}: parent directory {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise ExportError(f"{out_dir}: cannot write here ({exc.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the export is an ordinary directory
    return tmp


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished tmp directory to out_dir (an old out_dir is removed only now)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def export_ctranslate2(
    ckpt_path: Path,
    out_dir: Path,
    quantization: str = "float32",
    force: bool = False,
    check: bool = True,
    check_lines: int = 200,
) -> dict[str, Any]:
    """Write the CTranslate2 export of one checkpoint (see the module docstring); returns a report."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    import_ctranslate2()
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    model, tok = load_model(ckpt, "cpu")
    decode = ckpt.decode.model_dump(mode="json")
    notes = decode_notes(decode)
    for note in notes:
        log.warning(note)
    tmp = _prepare_target(out_dir, force)
    check_dir = None
    try:
        report: dict[str, Any] = {
            "output": str(out_dir),
            "checkpoint": str(ckpt_path),
            "quantization": quantization,
            "notes": notes,
        }
        with torch.no_grad():
            if check:
                check_dir = (
                    tmp
                    if quantization == "float32"
                    else Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.check.", dir=out_dir.parent))
                )
                _save(build_spec(model, tok), check_dir, "float32")
                tok.save(check_dir)
                _write_info(check_dir, ckpt, model, decode, "float32", None)
                lines, refs, where = check_sample(ckpt.recipe, check_lines)
                result = parity(ckpt_path, check_dir, lines, refs, decode)
                report["parity"] = {"sample": where, "lines": len(lines), "float32": result}
                exact = result["greedy"]["exact"]
                if exact < MIN_GREEDY_EXACT:
                    raise ExportError(
                        f"{out_dir}: parity check failed: greedy float32 exact match {100 * exact:.1f}% < "
                        f"{100 * MIN_GREEDY_EXACT:.0f}% on {len(lines)} lines of {where} (first mismatched "
                        f"lines {result['greedy']['mismatched_lines'][:5]}); nothing written"
                    )
            if quantization != "float32" or not check:
                _save(build_spec(model, tok), tmp, quantization)
            tok.save(tmp)
            _write_info(tmp, ckpt, model, decode, quantization, report.get("parity"))
            if check and quantization != "float32":  # reported, no bar (see the module docstring)
                report["parity"][quantization] = parity(ckpt_path, tmp, lines, refs, decode, "default")
                _write_info(tmp, ckpt, model, decode, quantization, report["parity"])
        _replace_dir(tmp, out_dir)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if check_dir is not None and check_dir != tmp:
            shutil.rmtree(check_dir, ignore_errors=True)


def _write_info(
    directory: Path,
    ckpt: Any,
    model: Seq2SeqTransformer,
    decode: dict[str, Any],
    quantization: str,
    parity_report: Optional[dict[str, Any]],
) -> None:
    info = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "quantization": quantization,
        "max_positions": model.cfg.max_positions,
        "joint_vocabulary": Tokenizer.from_state(dict(ckpt.tokenizer)).joint,
        "model": ckpt.recipe.model.model_dump(),
        "decode": decode,
        "parity": parity_report,
    }
    (directory / EXPORT_INFO).write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
