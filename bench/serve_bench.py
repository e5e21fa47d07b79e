"""Load figures for `translate serve`, beside offline `translate decode` of the same lines in the same run.

Usage:
  python bench/serve_bench.py CKPT [--lines data/bible-en-es/test.en] [--n 300] [--clients 1,8,32]
                              [--batching on,off] [--threads 2] [--max-wait-ms 5] [--json OUT.json]

Steps: (1) the CPU (model, ISA flags from /proc/cpuinfo) and torch; (2) `translate decode` of the first N
non-empty test lines (wall time including start-up, and the decode's own rate without start-up);
(3) for each batching mode (`on`: dynamic batching; `off`: `translate serve --no-batching`, each request
searched alone), `translate serve` on a free port, a warm-up, then for each client count C: C threads, each with
one keep-alive connection, take lines from a shared queue and POST each line alone to /v1/translate
(split_sentences false, so an answer is comparable with the decode line). Reported per C: sentences/s
and target tokens/s (1-best pieces without EOS, as `translate decode` counts them; from /metrics),
p50/p95/p99 request latency, mean sentences and requests per search batch (from /metrics), the mean
number of requests waiting in the batcher's queue and being searched (sampled from /health every 100 ms),
and how many answers equal the offline decode's line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def cpu_info() -> dict:
    """CPU model, logical CPUs available to us, and the ISA extensions that matter for decoding."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    family = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M)
    number = re.search(r"^model\s*:\s*(\d+)$", text, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", text, re.M) or re.match("()", "")).group(1).split())
    isa = [
        f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8") if f in flags
    ]
    import torch

    return {
        "cpu": (model.group(1).strip() if model else platform.processor())
        + (f" (family {family.group(1)} model {number.group(1)})" if family and number else ""),
        "cpus": len(os.sched_getaffinity(0)),
        "isa": isa,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def offline_decode(
    ckpt: Path, lines: list[str], threads: int, workdir: Path, extra: list[str]
) -> tuple[dict, list[str]]:
    src, hyp = workdir / "bench.src", workdir / "bench.hyp"
    src.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "seq2seq_cli",
        "decode",
        str(ckpt),
        "-i",
        str(src),
        "-o",
        str(hyp),
        "--threads",
        str(threads),
        *extra,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"translate decode failed:\n{done.stderr}")
    rates = re.findall(r"(\d+) lines\s+([\d.]+) sent/s\s+(\d+) tok/s", done.stderr)
    own_sent, own_tok = (float(rates[-1][1]), float(rates[-1][2])) if rates else (float("nan"), float("nan"))
    out = hyp.read_text(encoding="utf-8").split("\n")[:-1]
    return {
        "command": " ".join(["translate", *cmd[3:]]),
        "wall_s": wall,
        "sent_per_s_wall": len(lines) / wall,
        "sent_per_s": own_sent,
        "tok_per_s": own_tok,
    }, out


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples over all label sets."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:{{.*}})? (\S+)$", line)
        if m:
            total += float(m.group(1))
    return total


def start_server(
    ckpt: Path, threads: int, max_wait_ms: float, extra: list[str], batching: bool = True
) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "seq2seq_cli",
        "serve",
        str(ckpt),
        "--port",
        "0",
        "--threads",
        str(threads),
        *extra,
        "--no-access-log",
        "--max-wait-ms",
        str(max_wait_ms),
        "--max-sentences",
        "1000",
        "--batching" if batching else "--no-batching",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    while True:
        line = proc.stderr.readline()
        if not line:
            sys.exit("translate serve did not start")
        m = re.search(r"on (http://[\d.]+:\d+)", line)
        if m:
            url = m.group(1)
            break
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
    for _ in range(400):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    sys.exit("translate serve did not answer /health")


def load(url: str, lines: list[str], clients: int) -> tuple[dict, list[str]]:
    """C clients translate all lines once, one line per request; returns figures and answers in order."""
    work: queue.Queue = queue.Queue()
    for i, line in enumerate(lines):
        work.put((i, line))
    answers: list[str] = [""] * len(lines)
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                try:
                    i, line = work.get_nowait()
                except queue.Empty:
                    return
                t = time.perf_counter()
                r = http.post(f"{url}/v1/translate", json={"text": line, "split_sentences": False})
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t)
                answers[i] = r.json()["translations"][0]["text"]

    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:  # where the requests are: queued for a batch, or submitted and not answered
        with httpx.Client(timeout=60) as http:
            while not done.wait(0.1):
                h = http.get(f"{url}/health").json()
                samples.append((h["queued_requests"], h["in_flight_requests"]))

    before = httpx.get(f"{url}/metrics").text
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    sampler = threading.Thread(target=sample)
    for t in [*threads, sampler]:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    after = httpx.get(f"{url}/metrics").text

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    batches = delta("translate_batch_sentences_count")
    return {
        "clients": clients,
        "wall_s": wall,
        "sent_per_s": len(lines) / wall,
        "tok_per_s": delta("translate_target_tokens_total") / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * percentile(latencies, 0.95),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "mean_batch_sentences": delta("translate_batch_sentences_sum") / max(1, batches),
        "mean_batch_requests": delta("translate_batch_requests_sum") / max(1, batches),
        "batches": int(batches),
        "mean_queued": statistics.fmean(q for q, _ in samples) if samples else float("nan"),
        "mean_in_flight": statistics.fmean(f for _, f in samples) if samples else float("nan"),
    }, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--lines", type=Path, default=REPO / "data" / "bible-en-es" / "test.en")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--batching", default="on,off", help="modes to measure: on (dynamic batching), off, or both")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--precision", default=None, help="fp32, bf16 or int8 for both (default: the checkpoint's)")
    args = ap.parse_args()
    extra = ["--precision", args.precision] if args.precision else []

    lines = [x.strip() for x in args.lines.read_text(encoding="utf-8").splitlines() if x.strip()][: args.n]
    info = cpu_info()
    sys.path.insert(0, str(REPO))
    from seq2seq_cli.precision import cpu_info as project_cpu_info

    info["described"] = project_cpu_info().describe()
    print(
        f"CPU: {info['cpu']}, {info['cpus']} logical CPUs available, ISA: {' '.join(info['isa']) or '-'}; "
        f"torch {info['torch']}, python {info['python']}"
    )
    print(f"as the project sees it: {info['described']}; decoding precision auto = fp32 on every CPU")
    print(
        f"{len(lines)} lines of {args.lines}, {args.threads} threads, checkpoint {args.checkpoint}, "
        f"precision {args.precision or 'of the checkpoint'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        offline, reference = offline_decode(args.checkpoint, lines, args.threads, Path(tmp), extra)
    print(
        f"offline: {offline['command']}: {offline['wall_s']:.1f} s wall with start-up "
        f"({offline['sent_per_s_wall']:.1f} sent/s); decode alone {offline['sent_per_s']:.1f} sent/s, "
        f"{offline['tok_per_s']:.0f} tok/s"
    )

    rows = []
    for mode in args.batching.split(","):
        if mode not in ("on", "off"):
            sys.exit(f"--batching: expected on, off or on,off (got {mode})")
        print(f"dynamic batching {mode}:")
        proc, url = start_server(args.checkpoint, args.threads, args.max_wait_ms, extra, batching=mode == "on")
        try:
            for line in lines[:8]:  # warm-up
                httpx.post(f"{url}/v1/translate", json={"text": line}, timeout=300).raise_for_status()
            for c in [int(x) for x in args.clients.split(",")]:
                row, answers = load(url, lines, c)
                row["batching"] = mode
                row["equal_to_decode"] = sum(a == b for a, b in zip(answers, reference))
                row["differ"] = [i for i, (a, b) in enumerate(zip(answers, reference)) if a != b]
                rows.append(row)
                print(
                    f"  {c:>2} clients: {row['sent_per_s']:.1f} sent/s, {row['tok_per_s']:.0f} tok/s, "
                    f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                    f"batch {row['mean_batch_sentences']:.1f} sentences ({row['batches']} batches), "
                    f"queued {row['mean_queued']:.1f}, in search or queue {row['mean_in_flight']:.1f}, "
                    f"equal to decode {row['equal_to_decode']}/{len(lines)} (differ: lines {row['differ'][:5]})",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        print(f"server exit status after SIGTERM: {code}")
    print()
    print(
        "| batching | clients | sent/s | tok/s | p50 ms | p95 ms | p99 ms | mean batch (sentences) | answers = decode |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['batching']} | {r['clients']} | {r['sent_per_s']:.1f} | {r['tok_per_s']:.0f} | {r['p50_ms']:.0f} | "
            f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch_sentences']:.1f} | "
            f"{r['equal_to_decode']}/{len(lines)} |"
        )
    print(f"| offline `translate decode` | | {offline['sent_per_s']:.1f} | {offline['tok_per_s']:.0f} | | | | | |")
    for c in sorted({r["clients"] for r in rows}):
        on = [r for r in rows if r["clients"] == c and r["batching"] == "on"]
        off = [r for r in rows if r["clients"] == c and r["batching"] == "off"]
        if on and off:
            ratio = on[0]["sent_per_s"] / off[0]["sent_per_s"]
            print(f"{c} clients: dynamic batching gives {ratio:.2f}x the throughput of no batching")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "offline": offline,
                    "serve": rows,
                    "lines": len(lines),
                    "threads": args.threads,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
