"""`translate bench RECIPE`: training and decoding speed of the recipe's model on this machine.

Each part runs in its own child process so that its peak RSS is its own:
  matmul   2048^3 torch.mm, fp32 and bf16: the machine's practical GEMM peak (GFLOP/s);
  train    tokens/s (source + target subword tokens, non-pad) over `steps` updates after `warmup`;
           model FLOPs per token = 6 x parameters touched (split: a source token passes the
           encoder, a target token the decoder and the softmax; embeddings are lookups) and
           MFU = tokens/s x FLOPs/token / matmul peak of the training precision;
  decode   greedy and beam-5 target tokens/s, sentences/s and BLEU/chrF on the first `lines` test
           lines with the recipe's decode.batch_tokens, beam 5 in fp32, bf16-matmul, bf16 and int8;
  startup  wall time from process start to the first translated line through stdin.
Public names: run_bench, bench_part.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from .memory import peak_rss_mib

__all__ = ["run_bench", "bench_part", "DECODE_RUNS"]

DECODE_RUNS = ((1, "fp32"), (5, "fp32"), (5, "bf16-matmul"), (5, "bf16"), (5, "int8"))  # (beam, precision)


def _matmul(n: int = 2048, reps: int = 10) -> dict[str, float]:
    """GFLOP/s of n^3 matmuls; where bf16 is emulated (~1 GFLOP/s) it is timed on 512^3 x 3 instead
    of taking minutes."""
    import torch

    from .precision import native_bf16

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and not native_bf16():
            n, reps = 512, 3
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        out[f"{name}_gflops"] = 2 * n**3 / sorted(times)[len(times) // 2] / 1e9
    return out


def _flops_per_token(model, src_share: float) -> dict[str, float]:
    """6 x parameters touched per token: encoder for source tokens, decoder + softmax for target."""
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder") or n.startswith("enc_norm"))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder") or n.startswith("dec_norm"))
    softmax = model.output.weight.numel()
    per_src, per_tgt = 6 * enc, 6 * (dec + softmax)
    return {
        "flops_per_src_token": per_src,
        "flops_per_tgt_token": per_tgt,
        "flops_per_token": src_share * per_src + (1 - src_share) * per_tgt,
    }


def _train_part(
    recipe_path: str, overrides: list[str], warmup: int, steps: int, minutes: float = 0.0
) -> dict[str, Any]:
    """Training speed through the real loop (`Trainer.run`: data order, logging, validation and
    checkpoints as the recipe says), from its own metrics.jsonl: tokens and seconds of the log
    windows after the first `warmup` updates. With `minutes` the run lasts that long (as a real run
    with train.max_time would) instead of warmup + steps updates."""
    import torch

    from .pipeline import run_tokenizer
    from .recipe import load_recipe
    from .train import Trainer

    work = Path(tempfile.mkdtemp(prefix="translate-bench-"))
    base = load_recipe(recipe_path, overrides)
    log_every = base.train.log_every if minutes > 0 else max(1, min(base.train.log_every, steps // 10))
    budget = (
        [f"train.max_time={minutes}", "train.max_steps=0"]
        if minutes > 0
        else [f"train.max_steps={warmup + steps}", "train.max_time=0"]
    )
    recipe = load_recipe(recipe_path, [*overrides, f"output_dir={work}", f"train.log_every={log_every}", *budget])
    source = base.output_dir / "tokenizer"
    if source.is_dir():
        shutil.copytree(source, work / "tokenizer")
    else:
        run_tokenizer(recipe)
    trainer = Trainer(recipe, progress=False)
    trainer.run()
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    windows = [r for r in records if r["type"] == "train" and r["step"] - log_every >= warmup]
    shutil.rmtree(work, ignore_errors=True)
    if not windows:
        raise RuntimeError(f"no update after the {warmup} warm-up updates was logged: raise --steps or --minutes")
    n_src, n_tgt = sum(r["src_tokens"] for r in windows), sum(r["tgt_tokens"] for r in windows)
    elapsed, ran = sum(r["seconds"] for r in windows), sum(r["updates"] for r in windows)
    rates = sorted(r["tokens_per_s"] for r in windows)
    flops = _flops_per_token(trainer.model, n_src / max(1, n_src + n_tgt))
    tps = (n_src + n_tgt) / elapsed
    return {
        "precision": trainer.precision,
        "precision_asked": recipe.train.precision,
        "threads": torch.get_num_threads(),
        "steps": ran,
        "minutes": elapsed / 60,
        "tokens_per_step": (n_src + n_tgt) / ran,
        "tokens_per_s": tps,
        "s_per_step": elapsed / ran,
        "median_window_tokens_per_s": rates[len(rates) // 2],
        "windows": len(windows),
        **flops,
        "model_gflops": tps * flops["flops_per_token"] / 1e9,
        "peak_rss_mib": peak_rss_mib(),
    }


def _decode_part(
    checkpoint: str, src: str, ref: str, lines: int, beam: int, precision: str, batch_tokens: int
) -> dict[str, Any]:
    from .score import dev_scores
    from .translate import Translator

    translator = Translator([Path(checkpoint)], "cpu", 0, {"precision": precision, "batch_tokens": batch_tokens})
    text = Path(src).read_text(encoding="utf-8").splitlines()[:lines]
    opts = translator.options(beam=beam, n_best=1, sample=False)
    t0 = time.perf_counter()
    hyps = translator.translate_window(text, opts)  # inference mode is entered per batch there
    elapsed = time.perf_counter() - t0
    tokens = sum(len(h[0].tokens) for h in hyps if h)  # target pieces without EOS, as the peers count
    out = {
        "beam": beam,
        "precision": precision,
        "precision_used": translator.precision,  # bf16-matmul falls back to fp32 where not row-invariant
        "workers": translator.workers,
        "sentences": len(text),
        "target_tokens": tokens,
        "seconds": elapsed,
        "sent_per_s": len(text) / elapsed,
        "tgt_tokens_per_s": tokens / elapsed,
        "peak_rss_mib": peak_rss_mib(),
    }
    if ref:
        refs = Path(ref).read_text(encoding="utf-8").splitlines()[:lines]
        system = [translator.detok(h[0]) if h else "" for h in hyps]
        out.update(dev_scores(system, refs))
    return out


def bench_part(part: str, args: list[str]) -> dict[str, Any]:
    """Run one part in this process (called in the child)."""
    if part == "machine":
        return machine()
    if part == "matmul":
        return {**_matmul(), "peak_rss_mib": peak_rss_mib()}
    if part == "train":
        return _train_part(
            args[0], json.loads(args[1]), int(args[2]), int(args[3]), float(args[4]) if len(args) > 4 else 0.0
        )
    return _decode_part(args[0], args[1], args[2], int(args[3]), int(args[4]), args[5], int(args[6]))


def _child(part: str, *args: str) -> dict[str, Any]:
    code = (
        "import json,sys; from seq2seq_cli.bench import bench_part; "
        "print(json.dumps(bench_part(sys.argv[1], sys.argv[2:])))"
    )
    out = subprocess.run([sys.executable, "-c", code, part, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench part {part} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _startup(checkpoint: str, line: str) -> float:
    """Seconds from spawning `translate decode CKPT` to reading its first translated line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "seq2seq_cli", "decode", checkpoint, "--beam", "5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    proc.stdin.close()
    proc.wait()
    return elapsed


def machine() -> dict[str, Any]:
    """The machine beside every figure: CPU model, ISA, native bf16, what precision auto picks."""
    import torch

    from .precision import cpu_info, resolve_precision

    info = cpu_info()
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": info.model,
        "isa": list(info.flags),
        "native_bf16": info.native_bf16,
        "onednn_max_cpu_isa": info.onednn_isa_cap or None,
        "description": info.describe(),
        "auto_train": resolve_precision("auto", "cpu", "train"),
        "auto_decode": resolve_precision("auto", "cpu", "decode"),
    }


def run_bench(
    recipe_path: Path,
    overrides: list[str],
    checkpoint: Optional[Path],
    warmup: int,
    steps: int,
    lines: int,
    minutes: float = 0.0,
) -> dict[str, Any]:
    """All parts; decoding needs a trained checkpoint (default: the recipe's best.pt). bf16 decoding
    is skipped on a CPU that would emulate it (reported under `skipped`)."""
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    result: dict[str, Any] = {"machine": _child("machine")}
    result["matmul"] = _child("matmul")
    result["train"] = _child("train", str(recipe_path), json.dumps(overrides), str(warmup), str(steps), str(minutes))
    peak = result["matmul"][f"{'bf16' if result['train']['precision'] == 'bf16' else 'fp32'}_gflops"]
    result["train"]["mfu"] = result["train"]["model_gflops"] / peak
    ckpt = checkpoint or recipe.output_dir / "checkpoints" / "best.pt"
    if ckpt.exists() and recipe.data.test is not None and recipe.data.test.src is not None:
        ref = str(recipe.data.test.tgt or "")
        runs = [(b, p) for b, p in DECODE_RUNS if not p.startswith("bf16") or result["machine"]["native_bf16"]]
        result["skipped"] = [
            f"decode beam {b} {p}: bf16 is emulated on this CPU" for b, p in DECODE_RUNS if (b, p) not in runs
        ]
        result["decode"] = [
            _child(
                "decode",
                str(ckpt),
                str(recipe.data.test.src),
                ref,
                str(lines),
                str(b),
                p,
                str(recipe.decode.batch_tokens),
            )
            for b, p in runs
        ]
        result["startup_s"] = _startup(str(ckpt), "In the beginning God created the heavens and the earth.")
    return result
