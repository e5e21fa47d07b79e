"""Corpora of millions of pairs: `translate prepare` beside `fairseq-preprocess`, and training start-up.

    python bench/prepare_bench.py --sizes 1000000,5000000 --workers 1,2 --out /tmp/prepbench \
        [--fairseq ~/.cache/nmt-peers/venv-fairseq --fairseq-sizes 1000000] [--startup-sizes 0,1000000,5000000]

Big corpora are made from the embedded Bible (26,260 pairs) by repeating it in a shuffled order with
a varied suffix on both sides (" (copy k)" / " (copia k)"), so every line is distinct; they are
written under --out (never into the repository) and reused when present. One tokenizer (the default
recipe's: joint unigram, 8,000 pieces) is trained once on the Bible and given to every run.

Measured, each in a child process, wall time and peak memory of the process tree: the sum of the
proportional set sizes (PSS, /proc/PID/smaps_rollup; pages shared by forked workers are divided
among them) of the process and its descendants, sampled every 50 ms (`peak_rss_mib` in the output):
- `translate prepare` with each --workers value (pairs read per second);
- fairseq (peer): its usual pipeline on the same pairs and dictionary: sentencepiece encoding into
  pieces (sentencepiece's Python encoder, as many threads as workers), then `fairseq-preprocess
  --joined-dictionary --srcdict` with the same number of workers; its pairs/s are reported for
  fairseq-preprocess alone and for both steps together;
- `translate tokenizer` with a bounded sample (--tokenizer-sample pairs): time and peak memory;
- training start-up: `translate train` on the prepared corpus (default recipe shape, 10 updates):
  seconds from the start of the process to the first update's log line, and peak RSS;
  size 0 = the embedded 26k-pair corpus.
The first line printed names the CPU (model, ISA, native bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIBLE = REPO / "data" / "bible-en-es"
RECIPE = REPO / "recipes" / "bible-en-es.yaml"


def tree_rss_kib(pid: int) -> int:
    """Proportional set size (PSS: shared pages divided among the processes sharing them) of a
    process and all its descendants (KiB): the memory the tree really holds, forked workers included."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
                total += next((int(x.split()[1]) for x in f if x.startswith("Pss:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], env: dict | None = None, first_line: str | None = None) -> dict:
    """Run cmd; return wall seconds, peak tree RSS (MiB), and seconds until `first_line` appears on stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, seen = [0], [None]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_kib(proc.pid))
            time.sleep(0.05)

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            watch.lines.append(line)  # type: ignore[attr-defined]
            if first_line and seen[0] is None and line.startswith(first_line):
                seen[0] = time.perf_counter() - start

    watch.lines = []  # type: ignore[attr-defined]
    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    out = proc.stdout.read() if proc.stdout else ""
    proc.wait()
    for t in threads:
        t.join(timeout=5)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(watch.lines[-20:])}")  # type: ignore[attr-defined]
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak[0] / 1024), "first": seen[0], "stdout": out}


def make_corpus(out: Path, n: int) -> tuple[Path, Path]:
    """n distinct pairs: the Bible repeated in shuffled order, each copy with its own suffix."""
    src_path, tgt_path = out / f"big{n}.en", out / f"big{n}.es"
    if src_path.exists() and tgt_path.exists():
        return src_path, tgt_path
    en = (BIBLE / "train.en").read_text(encoding="utf-8").splitlines()
    es = (BIBLE / "train.es").read_text(encoding="utf-8").splitlines()
    rng = random.Random(n)
    order = list(range(len(en)))
    tmp_s, tmp_t = src_path.with_suffix(".en.tmp"), tgt_path.with_suffix(".es.tmp")
    with open(tmp_s, "w", encoding="utf-8") as fs, open(tmp_t, "w", encoding="utf-8") as ft:
        written, copy = 0, 0
        while written < n:
            rng.shuffle(order)
            take = order[: n - written]
            fs.writelines(f"{en[i]} (copy {copy})\n" for i in take)
            ft.writelines(f"{es[i]} (copia {copy})\n" for i in take)
            written, copy = written + len(take), copy + 1
    tmp_s.rename(src_path)
    tmp_t.rename(tgt_path)
    return src_path, tgt_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,5000000")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--startup-sizes", default="0,1000000,5000000")
    ap.add_argument("--out", type=Path, default=Path("/tmp/prepare-bench"))
    ap.add_argument("--fairseq", type=Path, default=Path.home() / ".cache/nmt-peers/venv-fairseq")
    ap.add_argument("--fairseq-sizes", default="1000000", help="sizes at which the peer runs too")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--tokenizer-sizes", default="0,1000000,5000000", help="translate tokenizer at these sizes")
    ap.add_argument("--tokenizer-sample", type=int, default=100_000, help="tokenizer.input_sentence_size (pairs)")
    args = ap.parse_args()
    from seq2seq_cli.bench import machine
    from seq2seq_cli.recipe import TokenizerConfig
    from seq2seq_cli.tokenizer import Tokenizer, train_tokenizer

    print(json.dumps({"machine": machine()["description"]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tok_dir = args.out / "tokenizer"
    if not (tok_dir / "spm.model").exists():
        en = (BIBLE / "train.en").read_text(encoding="utf-8").splitlines()
        es = (BIBLE / "train.es").read_text(encoding="utf-8").splitlines()
        train_tokenizer(TokenizerConfig(vocab_size=8000), en, es, tok_dir)
    tok = Tokenizer.load(tok_dir)
    cli = [sys.executable, "-m", "seq2seq_cli"]
    env = {**os.environ, "COLUMNS": "200"}
    results: list[dict] = []

    def recipe_args(run: Path, src: Path, tgt: Path) -> list[str]:
        return ["--set", f"output_dir={run}", "--set", f"data.train.src={src}", "--set", f"data.train.tgt={tgt}"]

    def run_dir(n: int) -> Path:
        d = args.out / f"run{n}"
        if not (d / "tokenizer" / "spm.model").exists():
            shutil.copytree(tok_dir, d / "tokenizer", dirs_exist_ok=True)
        return d

    corpora = {0: (BIBLE / "train.en", BIBLE / "train.es")}
    wanted = args.sizes.split(",") + args.startup_sizes.split(",") + args.tokenizer_sizes.split(",")
    for n in sorted({int(x) for x in wanted if x}):
        if n:
            corpora[n] = make_corpus(args.out, n)
    for n in [int(x) for x in args.sizes.split(",") if x]:
        src, tgt = corpora[n]
        for w in [int(x) for x in args.workers.split(",")]:
            m = measure(
                [*cli, "prepare", str(RECIPE), *recipe_args(run_dir(n), src, tgt), "--workers", str(w), "--force"]
                + ["--no-progress"],
                env,
            )
            row = {
                "what": "translate prepare",
                "pairs": n,
                "workers": w,
                **_pick(m),
                "pairs_per_s": round(n / m["seconds"]),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
        peer_sizes = {int(x) for x in args.fairseq_sizes.split(",") if x}
        if n in peer_sizes and (args.fairseq / "bin" / "fairseq-preprocess").exists():
            for w in [int(x) for x in args.workers.split(",")]:
                results.extend(_fairseq(args, tok, n, src, tgt, w))
    for n in [int(x) for x in args.tokenizer_sizes.split(",") if x]:
        src, tgt = corpora[n]
        d = args.out / f"tok{n}"
        m = measure(
            [*cli, "tokenizer", str(RECIPE), *recipe_args(d, src, tgt)]
            + ["--set", f"tokenizer.input_sentence_size={args.tokenizer_sample}"],
            env,
        )
        row = {"what": f"translate tokenizer (sample {args.tokenizer_sample:,} pairs)", "pairs": n or 26260, **_pick(m)}
        results.append(row)
        print(json.dumps(row), flush=True)
    for n in [int(x) for x in args.startup_sizes.split(",") if x]:
        src, tgt = corpora[n]
        d = run_dir(n)
        measure([*cli, "prepare", str(RECIPE), *recipe_args(d, src, tgt), "--no-progress"], env)
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
        (d / "metrics.jsonl").unlink(missing_ok=True)
        m = measure(
            [*cli, "train", str(RECIPE), *recipe_args(d, src, tgt), "--no-progress"]
            + ["--set", f"train.max_steps={args.train_steps}", "--set", "train.log_every=1"]
            + ["--set", "train.valid_every=100000", "--set", "train.max_time=0"],
            env,
            first_line="step 1 ",
        )
        row = {
            "what": "translate train start-up",
            "pairs": n or 26260,
            "first_step_s": round(m["first"], 2) if m["first"] else None,
            **_pick(m),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def _pick(m: dict) -> dict:
    return {"seconds": m["seconds"], "peak_rss_mib": m["peak_rss_mib"]}


def _fairseq(args, tok, n: int, src: Path, tgt: Path, workers: int) -> list[dict]:
    """sentencepiece encoding to pieces, then fairseq-preprocess with our vocabulary as its dictionary."""
    d = args.out / f"fairseq{n}"
    d.mkdir(exist_ok=True)
    dict_file = d / "dict.txt"
    sp = tok._src
    dict_file.write_text("".join(f"{sp.id_to_piece(i)} 1\n" for i in range(4, sp.get_piece_size())), encoding="utf-8")
    encode = (
        "import sys, sentencepiece as spm\n"
        "sp = spm.SentencePieceProcessor(model_file=sys.argv[1]); threads = int(sys.argv[2])\n"
        "for path, out in zip(sys.argv[3::2], sys.argv[4::2]):\n"
        "    with open(path, encoding='utf-8') as f, open(out, 'w', encoding='utf-8') as o:\n"
        "        while True:\n"
        "            lines = [x.rstrip('\\n') for x in [f.readline() for _ in range(50000)] if x]\n"
        "            if not lines: break\n"
        "            o.writelines(' '.join(p) + '\\n' for p in sp.encode(lines, out_type=str, num_threads=threads))\n"
    )
    py = str(args.fairseq / "bin" / "python")
    enc = measure(
        [py, "-c", encode, str(args.out / "tokenizer" / "spm.model"), str(workers)]
        + [str(src), str(d / "train.sp.en"), str(tgt), str(d / "train.sp.es")]
    )
    shutil.rmtree(d / "bin", ignore_errors=True)
    pre = measure(
        [str(args.fairseq / "bin" / "fairseq-preprocess"), "--source-lang", "en", "--target-lang", "es"]
        + ["--trainpref", str(d / "train.sp"), "--srcdict", str(dict_file), "--joined-dictionary"]
        + ["--destdir", str(d / "bin"), "--workers", str(workers)],
        {**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rows = [
        {
            "what": "fairseq: spm encode",
            "pairs": n,
            "workers": workers,
            **_pick(enc),
            "pairs_per_s": round(n / enc["seconds"]),
        },
        {
            "what": "fairseq-preprocess",
            "pairs": n,
            "workers": workers,
            **_pick(pre),
            "pairs_per_s": round(n / pre["seconds"]),
        },
        {
            "what": "fairseq: both steps",
            "pairs": n,
            "workers": workers,
            "seconds": round(enc["seconds"] + pre["seconds"], 2),
            "peak_rss_mib": max(enc["peak_rss_mib"], pre["peak_rss_mib"]),
            "pairs_per_s": round(n / (enc["seconds"] + pre["seconds"])),
        },
    ]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


if __name__ == "__main__":
    main()
