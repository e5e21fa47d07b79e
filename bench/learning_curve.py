"""Draw dev BLEU against training minutes from one or more metrics.jsonl files as an SVG.

Usage: python bench/learning_curve.py OUT.svg LABEL=runs/x/metrics.jsonl [LABEL=...]
Also prints the validation points as a Markdown table. No plotting library needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

W, H, PAD = 640, 360, 50
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def points(path: Path) -> list[tuple[float, float, int]]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(r["minutes"], r["bleu"], r["step"]) for r in rows if r.get("type") == "valid"]


def main(out: str, specs: list[str]) -> None:
    series = [(s.split("=", 1)[0], points(Path(s.split("=", 1)[1]))) for s in specs]
    max_x = max(p[0] for _, pts in series for p in pts) or 1
    max_y = max(p[1] for _, pts in series for p in pts) * 1.1 or 1
    sx = lambda x: PAD + x / max_x * (W - 2 * PAD)  # noqa: E731
    sy = lambda y: H - PAD - y / max_y * (H - 2 * PAD)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">training minutes (2 CPU threads)</text>',
             f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">dev BLEU (greedy, 300 lines)</text>']
    for i in range(6):
        y, x = max_y * i / 5, max_x * i / 5
        parts.append(f'<text x="{PAD - 6}" y="{sy(y) + 4}" text-anchor="end">{y:.0f}</text>')
        parts.append(f'<text x="{sx(x)}" y="{H - PAD + 16}" text-anchor="middle">{x:.0f}</text>')
    for k, (label, pts) in enumerate(series):
        c = COLOURS[k % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        parts.append(f'<text x="{PAD + 10}" y="{PAD + 16 * (k + 1)}" fill="{c}">{label}</text>')
    parts.append("</svg>")
    Path(out).write_text("\n".join(parts) + "\n")
    for label, pts in series:
        print(f"\n| {label}: step | minutes | dev BLEU |\n| ---: | ---: | ---: |")
        for x, y, step in pts:
            print(f"| {step} | {x:.1f} | {y:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
