"""`translate serve` (issue 17): the batcher, sentence splitting, the HTTP API against `translate decode`,
errors, shutdown and the web page in a real headless Chromium.

The server tests run a real uvicorn server (in a thread, or as a `translate serve` subprocess) on the
session's small checkpoint, served twice: as en-es (its recipe's pair) and, renamed, as es-en.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("pysbd")
httpx = pytest.importorskip("httpx")

from typer.testing import CliRunner  # noqa: E402

from seq2seq_cli.batcher import Batcher, BatcherClosed  # noqa: E402
from seq2seq_cli.cli import app as cli_app  # noqa: E402
from seq2seq_cli.segment import join_document, split_document  # noqa: E402

runner = CliRunner()
LINES = [
    "one two three",
    "the king and the queen",
    "water fire earth light dark day",
    "nine",
    "big red house",
    "old king",
    "seven eight nine ten one two three four five six",
    "good day",
    "black white big small",
    "red blue green",
]
DOCS = [
    "one two three. Red blue green! Big house.",
    "King queen house. Water fire.\n\nDay light. Nine ten.",
    "Old king.",
]


# ------------------------------------------------------------------------------ segment.py


def test_split_document_keeps_paragraphs_and_joins_translations() -> None:
    text = "Mr. Smith went to Washington. He said hi!\nThen he left.\n\n\nA new paragraph? Yes.\n  \nLast."
    seg = split_document(text, "en")
    assert seg.sentences == (
        "Mr. Smith went to Washington.",
        "He said hi!",
        "Then he left.",
        "A new paragraph?",
        "Yes.",
        "Last.",
    )
    assert seg.counts == (3, 2, 1)
    assert seg.separators == ("\n\n\n", "\n  \n")
    upper = join_document(seg, [s.upper() for s in seg.sentences])
    assert upper == "MR. SMITH WENT TO WASHINGTON. HE SAID HI! THEN HE LEFT.\n\n\nA NEW PARAGRAPH? YES.\n  \nLAST."
    assert split_document("   ", "en").sentences == ()
    assert join_document(split_document("\n\nx y.\n\n", "en"), ["z."]) == "\n\nz.\n\n"
    assert split_document("Hola. ¿Qué tal? Bien.", "xx").sentences == (
        "Hola.",
        "¿Qué tal?",
        "Bien.",
    )  # en rules
    with pytest.raises(ValueError):
        join_document(seg, ["too few"])


# ------------------------------------------------------------------------------ batcher.py


def test_batcher_merges_queued_requests_and_separates_settings() -> None:
    gate, calls = threading.Event(), []

    def run(sentences: list[str], key: str) -> list[str]:
        calls.append((key, list(sentences)))
        if len(calls) == 1:
            gate.wait(10)
        return [f"{key}:{s}" for s in sentences]

    records = []
    b = Batcher(run, max_wait=0.0, max_tokens=100, on_batch=records.append)
    first = b.submit(["a"], "k1", 1)
    for _ in range(200):  # the worker is now inside the first batch
        if calls:
            break
        time.sleep(0.01)
    later = [b.submit([f"s{i}", f"t{i}"], "k1" if i != 2 else "k2", 2) for i in range(5)]
    gate.set()
    assert first.result(10) == ["k1:a"]
    assert later[0].result(10) == ["k1:s0", "k1:t0"] and later[2].result(10) == ["k2:s2", "k2:t2"]
    assert [f.result(10) for f in later][4] == ["k1:s4", "k1:t4"]
    b.close()
    # call 2 merged the four queued k1 requests (8 sentences); k2 went alone
    assert calls[1] == ("k1", ["s0", "t0", "s1", "t1", "s3", "t3", "s4", "t4"])
    assert calls[2] == ("k2", ["s2", "t2"])
    assert [(r.requests, r.sentences) for r in records] == [(1, 1), (4, 8), (1, 2)]


@pytest.mark.parametrize("max_requests, expected", [(1, [1, 1, 1, 1, 1, 1]), (2, [1, 2, 2, 1])])
def test_batcher_max_requests_bounds_merging(max_requests, expected) -> None:
    """max_requests=1 is dynamic batching off (the serve --no-batching comparison): every request
    is searched alone, in arrival order, even when several are queued."""
    gate, calls = threading.Event(), []

    def run(sentences: list[str], key: str) -> list[str]:
        calls.append(list(sentences))
        if len(calls) == 1:
            gate.wait(10)
        return [s.upper() for s in sentences]

    records = []
    b = Batcher(run, max_wait=0.0, max_tokens=100, on_batch=records.append, max_requests=max_requests)
    first = b.submit(["a"], "k", 1)
    while not calls:
        time.sleep(0.01)
    later = [b.submit([f"s{i}"], "k", 1) for i in range(5)]
    gate.set()
    assert first.result(10) == ["A"] and [f.result(10) for f in later] == [[f"S{i}"] for i in range(5)]
    b.close()
    assert [r.requests for r in records] == expected
    assert [s for c in calls for s in c] == ["a"] + [f"s{i}" for i in range(5)]  # arrival order kept
    with pytest.raises(ValueError):
        Batcher(run, max_requests=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_search_threads_run_at_a_lower_priority_than_the_server() -> None:
    from seq2seq_cli.serve import Engine

    seen = {}

    def probe(nice: int) -> None:
        Engine.thread_share(1, nice)()  # what each search thread runs first
        seen[nice] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for nice in (0, 7):
        t = threading.Thread(target=probe, args=(nice,))
        t.start()
        t.join()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen[0] == mine  # 0: equal priority
    assert seen[7] == min(19, mine + 7)  # only that thread: this one is unchanged
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_batcher_budget_cancellation_errors_and_drain() -> None:
    gate, calls = threading.Event(), []

    def run(sentences: list[str], key: object) -> list[str]:
        calls.append(list(sentences))
        if len(calls) == 1:
            gate.wait(10)
        if "boom" in sentences:
            raise RuntimeError("search failed")
        return [s.upper() for s in sentences]

    b = Batcher(run, max_wait=0.0, max_tokens=4)
    blocker = b.submit(["x"], 0, 1)
    while not calls:
        time.sleep(0.01)
    f1, f2, f3 = b.submit(["a", "b"], 0, 3), b.submit(["c"], 0, 3), b.submit(["d"], 0, 1)
    gone = b.submit(["e"], 0, 1)
    assert gone.cancel()  # its client went away before the batch started: skipped
    gate.set()
    assert blocker.result(10) == ["X"] and f1.result(10) == ["A", "B"] and f2.result(10) == ["C"]
    assert f3.result(10) == ["D"]
    assert ["e"] not in calls and ["E"] not in calls
    assert calls[1] == ["a", "b"]  # 3 + 3 tokens > 4: f2 waits for the next batch, in order
    boom = b.submit(["boom"], 0, 1)
    with pytest.raises(RuntimeError, match="search failed"):
        boom.result(10)
    assert b.submit(["after"], 0, 1).result(10) == ["AFTER"]  # the worker survived
    queued = [b.submit([f"q{i}"], i % 2, 1) for i in range(6)]
    b.close(drain=True)
    assert [f.result(0) for f in queued] == [[f"Q{i}"] for i in range(6)]
    with pytest.raises(BatcherClosed):
        b.submit(["late"], 0, 1)


# ------------------------------------------------------------------------- the HTTP server


class ThreadServer:
    """A real uvicorn server for an app, in a background thread, on a free port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.02)
        assert self.server.started, "the test server did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def served(e2e):
    from seq2seq_cli.serve import ModelSpec, ServeConfig, create_app, load_engine

    config = ServeConfig(device="cpu", threads=1, workers=1, max_wait_ms=100, max_chars=2000, max_sentences=40)
    engines = [
        load_engine(ModelSpec((e2e.last,)), config),
        load_engine(ModelSpec((e2e.last,), "es", "en"), config),
    ]
    server = ThreadServer(create_app(engines, config))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cli_out(e2e, tmp_path_factory):
    """`translate decode` outputs of LINES and DOCS (the reference for the server's answers)."""
    d = tmp_path_factory.mktemp("serve_cli")
    src, docs = d / "lines.en", d / "docs.en"
    src.write_text("".join(x + "\n" for x in LINES), encoding="utf-8")
    docs.write_text("".join(x.replace("\n\n", " ") + "\n" for x in DOCS), encoding="utf-8")

    def decode(path: Path, *args: str) -> list[str]:
        r = runner.invoke(cli_app, ["decode", str(e2e.last), "-i", str(path), "--threads", "1", *args])
        assert r.exit_code == 0, r.output
        return r.stdout.split("\n")[:-1]

    return {
        "plain": decode(src),
        "beam3": decode(src, "--beam", "3", "--n-best", "3", "--alpha", "1.0"),
        "split": decode(docs, "--split-sentences"),
        "docs_plain": decode(docs),
    }


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


def test_concurrent_requests_equal_cli_and_share_batches(served, cli_out) -> None:
    before = httpx.get(f"{served.url}/metrics").text
    barrier = threading.Barrier(len(LINES))

    def ask(line: str) -> dict:
        barrier.wait(10)
        r = httpx.post(f"{served.url}/v1/translate", json={"text": line, "source": "en", "target": "es"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(LINES)) as pool:
        answers = list(pool.map(ask, LINES))
    assert [a["translations"][0]["text"] for a in answers] == cli_out["plain"]
    assert all(a["source"] == "en" and a["target"] == "es" for a in answers)
    after = httpx.get(f"{served.url}/metrics").text
    pair = {"pair": "en-es"}
    batches = _metric(after, "translate_batch_requests_count", **pair) - _metric(
        before, "translate_batch_requests_count", **pair
    )
    merged = _metric(after, "translate_batch_requests_sum", **pair) - _metric(
        before, "translate_batch_requests_sum", **pair
    )
    assert merged == len(LINES)
    assert batches < len(LINES), "no two concurrent requests shared a search batch"
    singles = _metric(after, "translate_batch_requests_bucket", le="1.0", **pair) - _metric(
        before, "translate_batch_requests_bucket", le="1.0", **pair
    )
    assert singles < batches or batches == 1
    assert _metric(after, "translate_sentences_total", **pair) - _metric(
        before, "translate_sentences_total", **pair
    ) == len(LINES)
    assert _metric(after, "translate_target_tokens_total", **pair) > 0
    assert _metric(after, "translate_requests_total", endpoint="/v1/translate", status="200") >= len(LINES)


def test_no_batching_searches_each_request_alone(e2e, cli_out) -> None:
    """serve --no-batching (the load test's comparison): concurrent requests never share a search
    batch, and the answers are the same."""
    from seq2seq_cli.serve import ModelSpec, ServeConfig, create_app, load_engine

    config = ServeConfig(device="cpu", threads=1, workers=1, max_wait_ms=100, batching=False)
    server = ThreadServer(create_app([load_engine(ModelSpec((e2e.last,)), config)], config))
    try:
        barrier = threading.Barrier(len(LINES))

        def ask(line: str) -> str:
            barrier.wait(10)
            r = httpx.post(f"{server.url}/v1/translate", json={"text": line}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["translations"][0]["text"]

        with ThreadPoolExecutor(len(LINES)) as pool:
            assert list(pool.map(ask, LINES)) == cli_out["plain"]
        after = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    pair = {"pair": "en-es"}
    assert _metric(after, "translate_batch_requests_count", **pair) == len(LINES)
    assert _metric(after, "translate_batch_requests_sum", **pair) == len(LINES)


def test_batch_tokens_option_bounds_each_search_batch(e2e) -> None:
    from seq2seq_cli.serve import ModelSpec, ServeConfig, create_app, load_engine

    for given, expected in ((None, None), (7, 7)):
        config = ServeConfig(device="cpu", threads=2, workers=2, batch_tokens=given)
        engine = load_engine(ModelSpec((e2e.last,)), config)
        app = create_app([engine], config)
        (s,) = app.state.served
        try:
            assert s.batcher.max_tokens == (expected or engine.search_tokens)  # not x workers: one per search
            assert len(s.batcher._threads) == 2 and engine.translator.workers == 1
        finally:
            s.batcher.close()


def test_list_input_and_n_best_equal_cli(served, cli_out) -> None:
    r = httpx.post(
        f"{served.url}/v1/translate",
        json={"text": LINES, "beam": 3, "n_best": 3, "alpha": 1.0, "source": "en"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    rows = [line.split("\t") for line in cli_out["beam3"]]
    got = r.json()["translations"]
    assert len(got) == len(LINES)
    for i, t in enumerate(got):
        expected = [(float(score), text) for idx, score, text in rows if int(idx) == i]
        nbest = t["sentences"][0]["n_best"]
        assert [(round(c["score"], 4), c["text"]) for c in nbest] == [(round(s, 4), x) for s, x in expected]
        assert t["text"] == expected[0][1] and t["score"] == pytest.approx(expected[0][0], abs=1e-4)


def test_documents_are_split_and_equal_cli_split_sentences(served, cli_out) -> None:
    r = httpx.post(f"{served.url}/v1/translate", json={"text": DOCS, "target": "es"}, timeout=60)
    assert r.status_code == 200, r.text
    got = [t["text"] for t in r.json()["translations"]]
    assert [g.replace("\n\n", " ") for g in got] == cli_out["split"]
    assert cli_out["split"] != cli_out["docs_plain"]  # decode --split-sentences did split
    assert got[1].count("\n\n") == 1  # the paragraph break survives
    assert [len(t["sentences"]) for t in r.json()["translations"]] == [3, 4, 1]
    r = httpx.post(f"{served.url}/v1/translate", json={"text": [DOCS[2], " "], "target": "es"}, timeout=60)
    assert [(t["text"], t["sentences"]) for t in r.json()["translations"]][1] == ("", [])  # an empty item
    assert r.json()["translations"][0]["text"] == cli_out["split"][2]
    r = httpx.post(
        f"{served.url}/v1/translate",
        json={"text": DOCS[0], "split_sentences": False, "target": "es"},
        timeout=60,
    )
    assert r.json()["translations"][0]["text"] == cli_out["docs_plain"][0]


def test_decode_split_sentences_refuses_n_best(e2e, tmp_path) -> None:
    src = tmp_path / "x.en"
    src.write_text("one two. three\n", encoding="utf-8")
    r = runner.invoke(cli_app, ["decode", str(e2e.last), "-i", str(src), "--split-sentences", "--n-best", "2"])
    assert r.exit_code == 2 and "--split-sentences" in r.stderr


def test_libretranslate_endpoints(served, cli_out) -> None:
    langs = httpx.get(f"{served.url}/languages").json()
    assert sorted(langs, key=lambda x: x["code"]) == [
        {"code": "en", "name": "English", "targets": ["es"]},
        {"code": "es", "name": "Spanish", "targets": ["en"]},
    ]
    r = httpx.post(f"{served.url}/translate", json={"q": LINES[0], "source": "en", "target": "es"})
    assert r.status_code == 200 and r.json() == {"translatedText": cli_out["plain"][0]}
    r = httpx.post(
        f"{served.url}/translate", json={"q": LINES[:3], "source": "en", "target": "es", "api_key": "ignored"}
    )
    assert r.json() == {"translatedText": cli_out["plain"][:3]}
    r = httpx.post(f"{served.url}/translate", data={"q": LINES[1], "source": "en", "target": "es"})
    assert r.status_code == 200 and r.json() == {"translatedText": cli_out["plain"][1]}
    r = httpx.post(
        f"{served.url}/translate",
        json={
            "q": f"<p class='x'>{LINES[4]} <b>{LINES[5]}</b></p>",
            "source": "en",
            "target": "es",
            "format": "html",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["translatedText"] == f"<p class='x'>{cli_out['plain'][4]} <b>{cli_out['plain'][5]}</b></p>"
    r = httpx.post(f"{served.url}/translate", json={"q": LINES[0], "source": "en", "target": "es", "alternatives": 2})
    body = r.json()
    v1 = httpx.post(
        f"{served.url}/v1/translate",
        json={"text": LINES[0], "source": "en", "target": "es", "beam": 3, "n_best": 3},
    ).json()["translations"][0]
    nbest = [c["text"] for c in v1["sentences"][0]["n_best"]]
    assert body == {"translatedText": nbest[0], "alternatives": nbest[1:]} and len(nbest) == 3
    r = httpx.post(f"{served.url}/translate", json={"q": LINES[0], "source": "en", "target": "fr"})
    assert r.status_code == 400 and "en-es" in r.json()["error"]
    r = httpx.post(f"{served.url}/translate", json={"q": LINES[0], "source": "auto", "target": "es"})
    assert r.json() == {
        "translatedText": cli_out["plain"][0],
        "detectedLanguage": {"language": "en", "confidence": 100.0},
    }


def test_opennmt_endpoint(served, cli_out) -> None:
    r = httpx.post(f"{served.url}/translator/translate", json=[{"src": LINES[0], "id": 0}, {"src": LINES[3]}])
    assert r.status_code == 200, r.text
    rows = r.json()
    assert len(rows) == 1 and [x["tgt"] for x in rows[0]] == [cli_out["plain"][0], cli_out["plain"][3]]
    assert all(set(x) == {"src", "tgt", "n_best", "pred_score"} and x["n_best"] == 1 for x in rows[0])
    assert rows[0][0]["src"] == LINES[0] and isinstance(rows[0][0]["pred_score"], float)
    assert httpx.post(f"{served.url}/translator/translate", json=[{"src": "x", "id": 7}]).status_code == 400
    assert [m["model_id"] for m in httpx.get(f"{served.url}/translator/models").json()] == [0, 1]


BAD = [  # (body bytes, content type, status, error code)
    (b'{"text": "one two', "application/json", 400, "malformed_json"),
    (b'{"text": "one \xff two"}', "application/json", 400, "invalid_utf8"),
    (b'{"text": "one \\ud800 two", "target": "es"}', "application/json", 400, "invalid_utf8"),
    (
        json.dumps({"text": "one", "source": "en", "target": "de"}).encode(),
        "application/json",
        400,
        "unsupported_pair",
    ),
    (json.dumps({"text": "one"}).encode(), "application/json", 400, "ambiguous_pair"),
    (json.dumps({"text": 5, "target": "es"}).encode(), "application/json", 422, "invalid_request"),
    (json.dumps({"text": ["a", 1], "target": "es"}).encode(), "application/json", 422, "invalid_request"),
    (
        json.dumps({"text": "one", "target": "es", "beam": "5"}).encode(),
        "application/json",
        422,
        "invalid_request",
    ),
    (
        json.dumps({"text": "one", "target": "es", "beem": 5}).encode(),
        "application/json",
        422,
        "invalid_request",
    ),
    (
        json.dumps({"text": "one", "target": "es", "beam": 2, "n_best": 3}).encode(),
        "application/json",
        422,
        "invalid_request",
    ),
    (
        json.dumps({"text": "one", "target": "es", "beam": 99}).encode(),
        "application/json",
        422,
        "invalid_request",
    ),
    (json.dumps(["not", "an", "object"]).encode(), "application/json", 422, "invalid_request"),
    (json.dumps({"text": "  ", "target": "es"}).encode(), "application/json", 400, "empty_text"),
    (json.dumps({"text": [], "target": "es"}).encode(), "application/json", 400, "empty_text"),
    (json.dumps({"text": "one " * 600, "target": "es"}).encode(), "application/json", 413, "too_large"),
    (json.dumps({"text": "One. " * 41, "target": "es"}).encode(), "application/json", 413, "too_large"),
    (b"x" * 200000, "application/json", 413, "too_large"),
    (json.dumps({"text": ["one"] * 41, "target": "es"}).encode(), "application/json", 413, "too_large"),
    (b'{"text": "one", "target": "es", "max_len_a": Infinity}', "application/json", 422, "invalid_request"),
]


@pytest.mark.parametrize("body,ctype,status,code", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_json_errors_without_tracebacks(served, caplog, body, ctype, status, code) -> None:
    with caplog.at_level(logging.DEBUG):
        r = httpx.post(f"{served.url}/v1/translate", content=body, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["code"] == code and r.json()["error"]
    assert not [rec for rec in caplog.records if rec.exc_info or "Traceback" in rec.getMessage()]


def test_health_metrics_page_and_404(served) -> None:
    h = httpx.get(f"{served.url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["models"] == ["en-es", "es-en"]
    assert h.json()["in_flight_requests"] == 0 and h.json()["queued_requests"] == 0
    assert httpx.post(f"{served.url}/v1/translate", json={"text": "one", "target": "es"}).status_code == 200
    m = httpx.get(f"{served.url}/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in (
        "translate_searches_in_flight",
        "translate_requests_total",
        "translate_request_seconds_bucket",
        "translate_batch_sentences_bucket",
        "translate_source_tokens_total",
    ):
        assert name in m.text
    page = httpx.get(f"{served.url}/")
    assert page.status_code == 200 and "<textarea" in page.text and "http" not in page.text.split("<script>")[1]
    missing = httpx.get(f"{served.url}/nope")
    assert missing.status_code == 404 and missing.json()["code"] == "http_404"


def test_client_disconnect_does_not_break_its_batch(served, cli_out, caplog, monkeypatch) -> None:
    """A client gives up while its sentences are being searched; the others in the batch get their answers.

    The search is gated so that the order of events is fixed: a first request holds the worker, the
    impatient request and four others queue up, their batch starts, the impatient client times out
    while it runs, then the batch ends."""
    engine = served.app.state.served[0].engine
    original = engine.translate
    gates = [threading.Event(), threading.Event()]
    calls: list[list[str]] = []

    def gated(sentences: list[str], opts):
        calls.append(list(sentences))
        if len(calls) <= len(gates):
            gates[len(calls) - 1].wait(30)
        return original(sentences, opts)

    monkeypatch.setattr(engine, "translate", gated)
    long_text = [LINES[i % len(LINES)] for i in range(30)]
    outcome: dict = {}

    def impatient() -> None:
        try:
            httpx.post(f"{served.url}/v1/translate", json={"text": long_text, "target": "es"}, timeout=3.0)
            outcome["impatient"] = "answered"
        except httpx.TimeoutException:
            outcome["impatient"] = "gave up"

    def ask(i: int) -> str:
        r = httpx.post(f"{served.url}/v1/translate", json={"text": LINES[i], "target": "es"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["translations"][0]["text"]

    def wait_for(condition, what: str) -> None:
        for _ in range(1000):
            if condition():
                return
            time.sleep(0.01)
        pytest.fail(f"timed out waiting for {what}")

    before = httpx.get(f"{served.url}/metrics").text
    with caplog.at_level(logging.INFO), ThreadPoolExecutor(6) as pool:
        holder = pool.submit(ask, 6)
        wait_for(lambda: len(calls) == 1, "the first batch")
        gone = pool.submit(impatient)
        wait_for(lambda: httpx.get(f"{served.url}/health").json()["queued_requests"] == 1, "the impatient request")
        others = [pool.submit(ask, i) for i in range(4)]
        wait_for(lambda: httpx.get(f"{served.url}/health").json()["queued_requests"] == 5, "five queued requests")
        gates[0].set()
        wait_for(lambda: len(calls) == 2, "the second batch")
        gone.result(30)  # the client timed out while its sentences were being searched
        gates[1].set()
        answers = [f.result(60) for f in others]
        assert holder.result(60) == cli_out["plain"][6]
    assert outcome["impatient"] == "gave up"
    # one batch held the impatient request and the four others (those in their order of arrival)
    assert calls[1][:30] == long_text and sorted(calls[1][30:]) == sorted(LINES[:4])
    assert answers == cli_out["plain"][:4]
    after = httpx.get(f"{served.url}/metrics").text
    batches = _metric(after, "translate_batch_requests_count", pair="en-es") - _metric(
        before, "translate_batch_requests_count", pair="en-es"
    )
    assert batches == 2
    monkeypatch.undo()
    assert httpx.get(f"{served.url}/health").json() == {
        "status": "ok",
        "models": ["en-es", "es-en"],
        "queued_requests": 0,
        "in_flight_requests": 0,
    }
    r = httpx.post(f"{served.url}/v1/translate", json={"text": LINES[5], "target": "es"}, timeout=60)
    assert r.json()["translations"][0]["text"] == cli_out["plain"][5]
    assert not [rec for rec in caplog.records if rec.exc_info or "Traceback" in rec.getMessage()]


def test_models_file(tmp_path, e2e) -> None:
    from seq2seq_cli.data import DataError
    from seq2seq_cli.serve import load_model_specs

    (tmp_path / "m.yaml").write_text(
        f"models:\n  - {{path: {e2e.last}, source: es, target: en}}\n  - {{path: rel.pt}}\n", encoding="utf-8"
    )
    specs = load_model_specs(tmp_path / "m.yaml")
    assert specs[0].paths == (e2e.last,) and (specs[0].source, specs[0].target) == ("es", "en")
    assert specs[1].paths == (tmp_path / "rel.pt",) and specs[1].source is None
    (tmp_path / "bad.yaml").write_text("models:\n  - {path: a.pt, sourse: en}\n", encoding="utf-8")
    with pytest.raises(DataError, match="sourse"):
        load_model_specs(tmp_path / "bad.yaml")


# ----------------------------------------------------------------- the `translate serve` process


def _start_cli_server(e2e, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*e2e.cli(), "serve", str(e2e.last), "--port", "0", "--threads", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e2e.env(),
    )
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
            for _ in range(200):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        return proc, url
                except httpx.TransportError:
                    time.sleep(0.05)
    proc.kill()
    pytest.fail("translate serve did not start:\n" + "".join(seen) + proc.stderr.read())


def test_sigterm_drains_in_flight_requests_and_exits_0(e2e, cli_out) -> None:
    proc, url = _start_cli_server(e2e, "--max-wait-ms", "1", "--no-access-log")
    text = LINES * 20
    answer: dict = {}

    def ask() -> None:
        r = httpx.post(f"{url}/v1/translate", json={"text": text, "beam": 4}, timeout=120)
        answer["status"], answer["body"] = r.status_code, r.json()

    asker = threading.Thread(target=ask)
    asker.start()
    for _ in range(600):  # until the request's 200 sentences are being searched
        if httpx.get(f"{url}/health", timeout=5).json()["in_flight_requests"] == 1:
            break
        time.sleep(0.01)
    assert not answer, "the request was answered before SIGTERM: make it longer"
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("translate serve did not stop after SIGTERM")
    asker.join(60)
    assert proc.returncode == 0, err
    assert answer.get("status") == 200, (answer, err)
    assert len(answer["body"]["translations"]) == len(text)
    assert "Traceback" not in err
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_serve_cli_errors(e2e, tmp_path) -> None:
    r = runner.invoke(cli_app, ["serve"])
    assert r.exit_code == 2 and "no model to serve" in r.stderr
    r = runner.invoke(cli_app, ["serve", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2 and "not found" in r.stderr
    r = runner.invoke(cli_app, ["serve", str(e2e.last), str(e2e.last), "--device", "cpu"])
    assert r.exit_code == 2 and "two models serve en-es" in r.stderr
    (tmp_path / "m.yaml").write_text(f"models:\n  - {{path: {e2e.last}, source: en, target: es}}\n")
    r = runner.invoke(cli_app, ["serve", str(e2e.last), "--models", str(tmp_path / "m.yaml"), "--device", "cpu"])
    assert r.exit_code == 2 and "two models serve en-es" in r.stderr  # the models file was read
    r = runner.invoke(cli_app, ["serve", "--models", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and "cannot read models file" in r.stderr


# ------------------------------------------------------------------------ the web page (Chromium)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install -y chromium)")
def test_web_page_in_headless_chromium(served, cli_out) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(served.url + "/")
            page.locator("#pair option").nth(1).wait_for(state="attached", timeout=15000)  # (CSP: no eval)
            assert page.locator("#pair option").all_inner_texts() == ["en \u2192 es", "es \u2192 en"]
            page.select_option("#pair", "en|es")
            page.select_option("#nbest", "2")
            page.fill("#source", LINES[0])
            page.press("#source", "Control+Enter")
            page.wait_for_selector("#output:not(:empty)", timeout=30000)
            items = page.locator("#alternatives li").count()
            assert items == 2  # the n-best list
            # the 1-best with the page's settings (beam max(2, default), n_best 2) equals the API's
            api = httpx.post(
                f"{served.url}/v1/translate",
                json={"text": LINES[0], "source": "en", "target": "es", "n_best": 2, "beam": 2},
            ).json()
            assert page.inner_text("#output") == api["translations"][0]["text"]
            page.select_option("#nbest", "1")
            page.fill("#source", LINES[2])
            page.click("#go")
            sync_api.expect(page.locator("#output")).to_have_text(cli_out["plain"][2], timeout=30000)
            assert page.locator("#alternatives li").count() == 0
            assert "sentence(s)" in page.inner_text("#status")
            assert not errors, errors
        finally:
            browser.close()


def test_missing_serve_extra_is_a_one_line_error(monkeypatch, e2e) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the `serve` extra were not installed
    r = runner.invoke(cli_app, ["serve", str(e2e.last)])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: translate serve needs fastapi: pip install 'seq2seq-cli[serve]'"


def test_batcher_with_two_workers_searches_a_new_batch_while_one_is_running() -> None:
    """workers=2: a request that arrives while a (slow) batch is being searched is searched at once
    by the other worker, not after it; each worker ran on_start first."""
    release = threading.Event()
    started: list[str] = []

    def run(sentences: list[str], key: object) -> list[str]:
        if sentences == ["slow"]:
            assert release.wait(30), "the slow batch was never released"
        return [s.upper() for s in sentences]

    batcher = Batcher(run, max_wait=0.0, workers=2, on_start=lambda: started.append(threading.current_thread().name))
    try:
        slow = batcher.submit(["slow"], "k", 1)
        time.sleep(0.2)  # the slow batch is now running in one worker
        fast = batcher.submit(["fast"], "k", 1)
        assert fast.result(timeout=10) == ["FAST"]  # answered while the slow one still runs
        assert not slow.done()
        release.set()
        assert slow.result(timeout=10) == ["SLOW"]
        assert len(started) == 2 and len(set(started)) == 2
    finally:
        release.set()
        batcher.close()
    with pytest.raises(ValueError, match="workers"):
        Batcher(run, workers=0)
