"""Pictures: cross-attention heatmaps (`translate attention`) and learning curves (`translate plot`).

matplotlib is an optional extra (`pip install -e ".[plot]"`); it is imported only when a PNG (or
any matplotlib format) is written, with the non-interactive Agg backend. The terminal heatmap
needs nothing.

Attention: `attention_map` translates one sentence with the checkpoint's decode settings, then
recomputes the cross-attention of the 1-best hypothesis by teacher forcing
(`Seq2SeqTransformer.cross_attention`): rows = target pieces (+ </s>), columns = source pieces
(+ </s>). Averaged over every layer and head by default; --layer picks one layer (averaged over
its heads), --head one head of that layer.

Learning curves: each run's metrics.jsonl ("train" rows: step, minutes, loss; "valid" rows:
step, minutes, dev_nll, bleu) on one 2 x 3 grid: train loss, dev loss (NLL per token), dev BLEU
against step (top) and wall-clock minutes (bottom), one colour per run.

Public names: attention_map, terminal_heatmap, save_attention_png, read_metrics, save_curves_png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from .recipe import UserError

__all__ = ["attention_map", "terminal_heatmap", "save_attention_png", "read_metrics", "save_curves_png"]

SHADES = " .:-=+*#%@"


def _pyplot():
    """matplotlib.pyplot with the Agg backend, or a one-line user error."""
    try:
        import matplotlib
    except ImportError:
        raise UserError('drawing pictures needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_map(
    translator, sentence: str, layer: Optional[int] = None, head: Optional[int] = None, opts=None
) -> tuple[list[str], list[str], Any]:
    """(source pieces, target pieces, attention (T, S) as a tensor) for one sentence."""
    import torch

    from .align import pick_layer
    from .data import clean_line
    from .search import Ensemble

    line = clean_line(sentence)
    if not line:
        raise UserError("the sentence is empty")
    opts = opts or translator.options()
    hyp = translator.translate_window([line], opts)[0][0]
    model = translator.model.models[0] if isinstance(translator.model, Ensemble) else translator.model
    tok = translator.tokenizer
    src_ids = translator._last_ids[0]
    src = torch.tensor([src_ids], device=translator.device)
    tgt = torch.tensor([[tok.bos_id] + hyp.tokens], device=translator.device)
    with torch.inference_mode(), translator.autocast():
        maps = model.cross_attention(src, tgt)  # (L, 1, H, T, S)
    n_layers, n_heads = maps.size(0), maps.size(2)
    if head is not None and layer is None:
        raise UserError("--head needs --layer")
    if layer is None:
        attn = maps[:, 0].mean(dim=(0, 1))
    else:
        try:
            index = pick_layer(n_layers, layer)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if head is None:
            attn = maps[index, 0].mean(0)
        elif not -n_heads <= head < n_heads:
            raise UserError(f"head {head} does not exist: layers have {n_heads} heads")
        else:
            attn = maps[index, 0, head]
    src_pieces = [tok.id_to_piece(i, "src") for i in src_ids[:-1]] + ["</s>"]
    # the attention row t predicts target piece t; the last row predicts </s>
    tgt_pieces = [tok.id_to_piece(i, "tgt") for i in hyp.tokens]
    return src_pieces, tgt_pieces, attn[: len(tgt_pieces), :].float().cpu()


def terminal_heatmap(src: Sequence[str], tgt: Sequence[str], attn, width: int = 3) -> str:
    """A coarse text heatmap: one row per target piece, `width` characters per source piece,
    shade by attention weight (' ' = 0 ... '@' = the row's maximum); source pieces listed below."""
    label = max((len(t) for t in tgt), default=0)
    lines = []
    for t, row in zip(tgt, attn.tolist()):
        top = max(row) or 1.0
        levels = [min(len(SHADES) - 1, int(w / top * (len(SHADES) - 1) + 0.5)) for w in row]
        cells = "".join(SHADES[v] * width for v in levels)
        lines.append(f"{t:>{label}} |{cells}|")
    lines.append(" " * label + " +" + "-" * (width * len(src)) + "+")
    lines.append(" " * label + "  " + " ".join(f"{i}:{p}" for i, p in enumerate(src)))
    return "\n".join(lines)


def save_attention_png(src: Sequence[str], tgt: Sequence[str], attn, out: Path, title: str) -> None:
    """A labelled heatmap: source pieces along x, target pieces along y."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(src) + 2), max(3.0, 0.4 * len(tgt) + 1.5)))
    image = ax.imshow(attn.numpy(), cmap="Blues", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(src)), labels=list(src), rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(len(tgt)), labels=list(tgt), fontsize=9)
    ax.set_xlabel("source pieces")
    ax.set_ylabel("target pieces (1-best)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def read_metrics(run: Path) -> tuple[str, list[dict], list[dict]]:
    """(label, train rows, valid rows) of a run directory or a metrics.jsonl file."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise UserError(f"{path}: no metrics.jsonl (give a run directory or its metrics.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}: line {n}: not JSON") from None
    # a resumed run repeats the steps after its last checkpoint: keep the latest of each step
    train = list({r["step"]: r for r in rows if r.get("type") == "train" and "loss" in r}.values())
    valid = list({r["step"]: r for r in rows if r.get("type") == "valid"}.values())
    label = path.parent.name if path.name == "metrics.jsonl" else path.stem
    return label, sorted(train, key=lambda r: r["step"]), sorted(valid, key=lambda r: r["step"])


def save_curves_png(runs: Sequence[Path], out: Path) -> list[dict]:
    """Draw every run on one figure; returns a summary row per run (last step, best dev BLEU)."""
    plt = _pyplot()
    data = [read_metrics(Path(r)) for r in runs]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex="row")
    panels = (
        ("train", "loss", "train loss (label-smoothed)"),
        ("valid", "dev_nll", "dev loss (NLL/token)"),
        ("valid", "bleu", "dev BLEU"),
    )
    for row, xkey, xlabel in ((0, "step", "step"), (1, "minutes", "wall-clock minutes")):
        for col, (kind, ykey, ylabel) in enumerate(panels):
            ax = axes[row][col]
            for i, (label, train, valid) in enumerate(data):
                pts = [
                    (r[xkey], r[ykey])
                    for r in (train if kind == "train" else valid)
                    if xkey in r and r.get(ykey) is not None
                ]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if kind == "valid" else None, markersize=3, label=label, color=f"C{i}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][2].legend(fontsize=8)
    fig.suptitle("learning curves: " + ", ".join(label for label, _, _ in data), fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [
        {
            "run": label,
            "last_step": train[-1]["step"] if train else None,
            "best_bleu": max((v.get("bleu", float("nan")) for v in valid), default=None),
        }
        for label, train, valid in data
    ]
