"""Beam-5 decoding speed: this project's decoder (fp32, bf16, int8) against its CTranslate2 export
(float32, int8), same model, same test lines, same search (power length penalty, the checkpoint's
alpha and max-length rule), side by side in one run.

Each measurement runs in its own child process (its peak RSS is its own); the configurations are
alternated round after round (fp32, bf16, int8, ct2-float32, ct2-int8, fp32, ...) so that a slow
spell of a shared machine hits all of them. Reported per configuration: target tokens/s (target
pieces without EOS, translation time only: model loaded and one warm-up batch done first), peak RSS
(MiB, whole child), BLEU against the references when given, and the exports' size on disk.

    python bench/export_bench.py CKPT --src data/bible-en-es/test.en --ref data/bible-en-es/test.es \
        --lines 300 --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

CONFIGS = ("translate-fp32", "translate-bf16-matmul", "translate-bf16", "translate-int8", "ct2-float32", "ct2-int8")


def cpu_info() -> dict[str, Any]:
    """CPU model, ISA flags and whether bf16 is native, from the package's one probe (precision.py),
    which also honours an ONEDNN_MAX_CPU_ISA cap."""
    from seq2seq_cli.precision import cpu_info as probe

    info = probe()
    return {
        "cpu": info.model,
        "cores": os.cpu_count(),
        "isa": list(info.flags),
        "bf16_native": info.native_bf16,
        "onednn_max_cpu_isa": info.onednn_isa_cap or None,
    }


def child(kind: str, ckpt: str, export_dir: str, src: list[str], threads: int, beam: int) -> dict[str, Any]:
    """Load one decoder, warm it up on 16 lines, translate `src`; speed, tokens and outputs."""
    from seq2seq_cli.memory import peak_rss_mib

    if kind.startswith("translate-"):
        import torch

        from seq2seq_cli.translate import Translator

        torch.set_num_threads(threads)
        tr = Translator([Path(ckpt)], "cpu", threads, {"precision": kind.split("-", 1)[1]})
        opts = tr.options(beam=beam, n_best=1, length_penalty="power", beta=0.0)
        tr.translate_window(src[:16], opts)
        tr.stats.target_tokens = 0
        t0 = time.perf_counter()
        hyps = tr.translate_window(src, opts)
        seconds = time.perf_counter() - t0
        out = [tr.detok(h[0]) if h else "" for h in hyps]
        tokens, extra = tr.stats.target_tokens, {"workers": tr.workers, "precision": tr.precision}
    else:
        from seq2seq_cli.ct2_backend import CT2Translator

        ct = CT2Translator(export_dir, "cpu", threads, "default")
        o = ct.options({"beam": beam, "n_best": 1, "length_penalty": "power", "beta": 0.0})
        ct.translate_lines(src[:16], **o)
        ct.target_tokens = 0
        t0 = time.perf_counter()
        res = ct.translate_lines(src, **o)
        seconds = time.perf_counter() - t0
        out = [h[0][0] if h else "" for h in res]
        tokens, extra = ct.target_tokens, {"compute_type": ct.translator.compute_type}
    return {
        "kind": kind,
        "seconds": seconds,
        "tgt_tokens": tokens,
        "tgt_tokens_per_s": tokens / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "hyps": out,
        **extra,
    }


def _export(ckpt: Path, out: Path, quantization: str) -> None:
    if not (out / "model.bin").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "seq2seq_cli",
                "export",
                str(ckpt),
                "-o",
                str(out),
                "--force",
                "--no-check",
                "--quantization",
                quantization,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def _dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.name == "model.bin") / 2**20


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--ref", type=Path)
    ap.add_argument("--lines", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--work", type=Path, help="where the exports go (default: a temporary directory)")
    ap.add_argument(
        "--omp-wait-policy",
        default="",
        help="OMP_WAIT_POLICY for every child (e.g. PASSIVE: "
        "on an oversubscribed CPU, spinning OpenMP threads slowed CTranslate2 float32 ~15x)",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    src = [x.rstrip("\n") for x in args.src.read_text(encoding="utf-8").splitlines()][: args.lines]
    if args.child:
        result = child(args.child, str(args.checkpoint), args.export_dir, src, args.threads, args.beam)
        print(json.dumps(result))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    exports = {"ct2-float32": work / "ct2-float32", "ct2-int8": work / "ct2-int8"}
    _export(args.checkpoint, exports["ct2-float32"], "float32")
    _export(args.checkpoint, exports["ct2-int8"], "int8")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    load_before = os.getloadavg()[0]
    configs = [c for c in args.configs.split(",") if c]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for kind in configs:
            cmd = [
                sys.executable,
                __file__,
                str(args.checkpoint),
                "--src",
                str(args.src),
                "--lines",
                str(args.lines),
                "--threads",
                str(args.threads),
                "--beam",
                str(args.beam),
                "--child",
                kind,
                "--export-dir",
                str(exports.get(kind, "")),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"{kind} failed:\n{res.stderr[-3000:]}")
            runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {kind}: {runs[kind][-1]['tgt_tokens_per_s']:.0f} tok/s", file=sys.stderr)
    refs = args.ref.read_text(encoding="utf-8").splitlines()[: args.lines] if args.ref else None
    table = []
    for kind, rs in runs.items():
        row = {
            "config": kind,
            "tgt_tokens_per_s": [round(x["tgt_tokens_per_s"]) for x in rs],
            "tgt_tokens": rs[0]["tgt_tokens"],
            "peak_rss_mib": round(max(x["peak_rss_mib"] for x in rs)),
        }
        if refs:
            import sacrebleu

            row["bleu"] = round(sacrebleu.corpus_bleu(rs[0]["hyps"], [refs]).score, 2)
        if kind in exports:
            row["model_bin_mib"] = round(_dir_mib(exports[kind]), 1)
        table.append(row)
    report = {
        **cpu_info(),
        "threads": args.threads,
        "beam": args.beam,
        "lines": len(src),
        "rounds": args.rounds,
        "omp_wait_policy": args.omp_wait_policy or None,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": table,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(
        f"CPU: {report['cpu']} ({report['cores']} cores), ISA: {' '.join(report['isa'])}, "
        f"bf16 native: {report['bf16_native']}; {args.threads} threads, beam {args.beam}, "
        f"{len(src)} lines; "
        f"load average {report['load_average_1min'][0]} -> {report['load_average_1min'][1]}, "
        f"OMP_WAIT_POLICY={args.omp_wait_policy or '(unset)'}"
    )
    print("| decoder | target tokens/s (each round) | peak RSS MiB | BLEU | model.bin MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in table:
        speeds = ", ".join(f"{x:,}" for x in row["tgt_tokens_per_s"])
        print(
            f"| {row['config']} | {speeds} | {row['peak_rss_mib']:,} | {row.get('bleu', '')} | "
            f"{row.get('model_bin_mib', '')} |"
        )


if __name__ == "__main__":
    main()
