"""Memory and kernel time of training, per 10 updates: RSS, peak RSS, minor page faults, system vs
user CPU seconds, tokens/s. Drives `Trainer._update` on the recipe's real batches, 1 thread.

    python bench/train_memory.py recipes/bible-en-es.yaml --steps 100 --precision bf16 --tokenizer runs/x/tokenizer

Run it with ONEDNN_PRIMITIVE_CACHE_CAPACITY=N or ONEDNN_MAX_CPU_ISA=AVX2 in the environment to see
their effect; the first line names the CPU (model, ISA, native bf16).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path


def rss_mib() -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--tokenizer", help="an existing tokenizer/ directory (else one is trained)")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides")
    ap.add_argument("--trim-every", type=int, default=0, help="glibc malloc_trim(0) every N updates (0: never)")
    args = ap.parse_args()

    from seq2seq_cli.bench import machine
    from seq2seq_cli.memory import release_free_heap
    from seq2seq_cli.pipeline import run_tokenizer
    from seq2seq_cli.recipe import load_recipe
    from seq2seq_cli.train import Trainer

    print(json.dumps({"machine": machine()["description"]}), flush=True)
    out = Path(tempfile.mkdtemp(prefix="train-memory-"))
    recipe = load_recipe(
        args.recipe, [f"output_dir={out}", f"train.precision={args.precision}", "train.threads=1", *args.set]
    )
    if args.tokenizer:
        shutil.copytree(args.tokenizer, out / "tokenizer")
    else:
        run_tokenizer(recipe)
    trainer = Trainer(recipe, progress=False)
    groups = [g for _ in range(1 + args.steps // max(1, len(trainer._epoch_groups()))) for g in trainer._epoch_groups()]
    t0, tokens = time.perf_counter(), 0
    for i, group in enumerate(groups[: args.steps], 1):
        _, _, tgt, src = trainer._update(group)
        tokens += tgt + src
        if args.trim_every and i % args.trim_every == 0:
            release_free_heap()
        if i % 10 == 0:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            print(
                json.dumps(
                    {
                        "step": i,
                        "rss_mib": rss_mib(),
                        "peak_rss_mib": ru.ru_maxrss // 1024,
                        "minor_faults": ru.ru_minflt,
                        "sys_s": round(ru.ru_stime, 1),
                        "user_s": round(ru.ru_utime, 1),
                        "tokens_per_s": round(tokens / (time.perf_counter() - t0)),
                    }
                ),
                flush=True,
            )
            t0, tokens = time.perf_counter(), 0
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
