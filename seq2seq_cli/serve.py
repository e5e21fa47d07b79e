"""`translate serve`: an HTTP translation server (FastAPI + uvicorn) with dynamic batching.

Models are loaded once; each is known by its language pair (the checkpoint recipe's
`data.src_lang`/`data.tgt_lang`, or `source`/`target` in a models YAML file). Each model has one
`Batcher` (batcher.py) whose worker thread is the only thread searching that model: sentences
of concurrent requests with the same search settings share a search batch. Search is
batch-invariant per sentence, so every answer equals `translate decode` of the same line with the
same settings (`translate decode --split-sentences` for multi-sentence texts).

Endpoints:
  POST /v1/translate          {"text": str | [str], "source", "target", "beam", "n_best", "alpha", ...}
  POST /translate             LibreTranslate: q, source, target, format text|html, alternatives
  GET  /languages             LibreTranslate: [{"code", "name", "targets"}]
  POST /translator/translate  OpenNMT-py server: [{"src", "id"}] -> [[{"src", "tgt", "n_best", "pred_score"}]]
  GET  /translator/models     OpenNMT-py server: the loaded models
  GET  /v1/models, /health, /metrics (Prometheus text format), / (the web page)

Errors are JSON `{"error": message, "code": code}` with status 400 (malformed JSON, invalid
UTF-8, empty text, unknown language pair), 413 (over --max-chars / --max-sentences / body size),
422 (wrong types or values, unknown fields in /v1) and never log a traceback. Sampling is not
served (its random draws depend on the batch); a checkpoint whose decode default is sampling is
served with beam search.

Public names: ServeConfig, ModelSpec, Engine, load_engine, load_model_specs, create_app, run_server,
lower_thread_priority.
"""

import asyncio
import contextlib
import html
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Literal, Optional, Sequence, Union
from urllib.parse import parse_qsl

from .batcher import Batcher, BatcherClosed, BatchRecord
from .data import DataError
from .recipe import UserError
from .segment import Segmented, join_document, split_document

__all__ = [
    "lower_thread_priority",
    "ServeConfig",
    "ModelSpec",
    "Engine",
    "load_engine",
    "load_model_specs",
    "create_app",
    "run_server",
]

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {
    "ar": "Arabic",
    "ca": "Catalan",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "eu": "Basque",
    "fr": "French",
    "gl": "Galician",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "la": "Latin",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "zh": "Chinese",
}


def serve_dependencies_missing() -> Optional[str]:
    """None if fastapi, uvicorn, pysbd and prometheus_client import; else a one-line install hint."""
    missing = []
    for name in ("fastapi", "uvicorn", "pysbd", "prometheus_client"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if not missing:
        return None
    return f"translate serve needs {', '.join(missing)}: pip install 'seq2seq-cli[serve]'"


# ------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: checkpoint(s) (several = an ensemble) and, optionally, its language pair."""

    paths: tuple[Path, ...]
    source: Optional[str] = None
    target: Optional[str] = None


@dataclass(frozen=True)
class ServeConfig:
    """Server settings (the `translate serve` options)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_chars: int = 20000  # characters per request, all texts together
    max_sentences: int = 256  # sentences per request, after splitting
    max_wait_ms: float = 5.0  # how long a batch waits for more requests
    batching: bool = True  # False: each request is searched on its own (for comparison)
    search_nice: int = 10  # how much lower the search threads' scheduling priority is (0: equal)
    batch_tokens: Optional[int] = None  # a search batch's budget, beam rows x source tokens; None: the model's
    max_beam: int = 16
    device: str = "auto"
    threads: int = 0
    precision: Optional[str] = None
    workers: Optional[int] = None
    access_log: bool = True


def load_model_specs(path: Path) -> list[ModelSpec]:
    """Read a models YAML file: `models: [{path: CKPT or [CKPT, ...], source: en, target: es}, ...]`
    (or the list alone); relative paths are relative to the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read models file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    entries = data.get("models") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a list of models under 'models:'")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry:
            raise DataError(f"{path}: models[{i}]: expected a mapping with 'path' (and optional source, target)")
        unknown = set(entry) - {"path", "source", "target"}
        if unknown:
            raise DataError(f"{path}: models[{i}]: unknown key(s) {', '.join(sorted(unknown))}")
        raw = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
        paths = tuple((Path(path).parent / str(p)) if not Path(str(p)).is_absolute() else Path(str(p)) for p in raw)
        for key in ("source", "target"):
            if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
                raise DataError(f"{path}: models[{i}].{key}: expected a language code")
        specs.append(ModelSpec(paths, entry.get("source"), entry.get("target")))
    return specs


# ------------------------------------------------------------ the adapter over the Translator


@dataclass(frozen=True)
class Candidate:
    """One hypothesis of one sentence: detokenised text and its final search score."""

    text: str
    score: float


class Engine:
    """The only code of the server that touches `translate.Translator` and `recipe.DecodeConfig`.

    The batcher calls `translate` from its worker thread; the request handlers call `options` and
    `cost`. Merging a new decoding API means adapting this class (and `load_engine`) alone.
    """

    def __init__(self, translator: Any, source: str, target: str, batch_tokens: Optional[int]) -> None:
        self.translator = translator
        self.source = source
        self.target = target
        self.search_tokens = int(translator.config.batch_tokens)  # budget of one search batch (per beam row)
        self.batch_tokens = batch_tokens or self.search_tokens  # one search batch's budget (--batch-tokens)
        self.defaults = self.options({})

    def options(self, overrides: dict[str, Any]) -> Hashable:
        """Search settings (a frozen, hashable DecodeConfig): the checkpoint's decode defaults, then the
        request's non-None values, validated as a whole. Never sampling. Raises ValueError (a
        RecipeError) for a bad value, e.g. n_best above beam."""
        return self.translator.options(**{**overrides, "sample": False})

    def describe(self, opts: Hashable) -> dict[str, Any]:
        """The settings as JSON-ready values (for /v1/models)."""
        return {
            k: getattr(opts, k) for k in ("beam", "n_best", "alpha", "beta", "length_penalty", "max_len_a", "max_len_b")
        }

    def take_workers(self) -> int:
        """Hand the Translator's worker count to the batcher: it then runs that many batches at once,
        one search thread each (a batch forms while another is searched), and each search is one
        batch (the Translator's own worker pool is turned off) of at most `batch_tokens`. Returns
        the count."""
        workers = max(1, int(self.translator.workers))
        self.translator.workers = 1
        return workers

    @staticmethod
    def thread_share(workers: int, nice: int = 0) -> Callable[[], None]:
        """What each search thread runs first: take its share of the CPU threads (torch reads the
        count per thread), as `translate decode --workers` does, and lower its scheduling priority
        by `nice` (see `lower_thread_priority`)."""
        import torch

        share = max(1, torch.get_num_threads() // workers)

        def start() -> None:
            torch.set_num_threads(share)
            lower_thread_priority(nice)

        return start

    def cost(self, sentence: str, opts: Hashable) -> int:
        """Padded-token cost of a sentence in a search batch: (source pieces + EOS) x beam rows."""
        return (len(self.translator.tokenizer.encode_src(sentence)) + 1) * max(1, opts.beam)

    def translate(self, sentences: list[str], opts: Hashable) -> tuple[list[list[Candidate]], int]:
        """n-best candidates per sentence (empty for an empty sentence), and the 1-best target tokens."""
        t = self.translator
        hyps = t.translate_window(sentences, opts)
        tokens = sum(len(h[0].tokens) for h in hyps if h)
        t.stats.truncated_lines.clear()  # a long-running server must not accumulate them
        return [[Candidate(t.detok(x), float(x.score)) for x in h[: opts.n_best]] for h in hyps], tokens


INLINE_CHARS = 1000  # texts up to this many characters are split and tokenized on the event loop


def lower_thread_priority(nice: int) -> bool:
    """Raise the calling thread's nice value by `nice` (Linux: the priority is per thread; elsewhere
    nothing happens). Returns whether it did.

    Why the search threads run at a lower priority: with every core busy searching, the event loop
    thread (which reads requests, hands them to the batcher and writes the answers) otherwise gets
    a core only for its fair share, so finished answers and new requests wait behind the searches,
    fewer requests are queued when a search thread takes the next batch, and the batches stay
    small (measured: 32 clients, 2 vCPUs, mean 4.5 sentences per batch at equal priority, 7.1 with
    the search threads at nice +10; see README "Serving"). The search threads still get all the CPU
    the event loop does not use. Threads they start (torch's intra-op pool) inherit the value.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # e.g. a seccomp profile forbids it: serve at equal priority
        log.warning("could not lower the search threads' priority: %s", exc)
        return False
    return True


def load_engine(spec: ModelSpec, config: ServeConfig) -> Engine:
    """Load one model (or ensemble) for serving; the language pair comes from the spec or the recipe."""
    from .distributed import pick_device
    from .translate import Translator

    translator = Translator(
        list(spec.paths),
        str(pick_device(config.device)),
        config.threads,
        {"precision": config.precision, "workers": config.workers},
    )
    data = translator.recipe.data
    return Engine(translator, spec.source or data.src_lang, spec.target or data.tgt_lang, config.batch_tokens)


# ------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses: HTTP status, a short machine code and a message."""

    def __init__(self, status: int, code: str, message: str, detail: Optional[list] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail


def _validation_error(exc: Any) -> ApiError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    first = detail[0]
    where = ".".join(str(x) for x in first["loc"]) or "body"
    return ApiError(422, "invalid_request", f"{where}: {first['msg']}", detail)


# ------------------------------------------------------------------------ request models


def _request_models() -> tuple[type, type, type]:
    """The pydantic request schemas (built lazily: pydantic is imported with the server)."""
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

    class V1Request(BaseModel):
        """POST /v1/translate."""

        model_config = ConfigDict(strict=True, extra="forbid")
        text: Union[StrictStr, list[StrictStr]]
        source: Optional[StrictStr] = None
        target: Optional[StrictStr] = None
        beam: Optional[int] = Field(None, ge=1)
        n_best: Optional[int] = Field(None, ge=1)
        alpha: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
        beta: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
        length_penalty: Optional[Literal["gnmt", "power"]] = None
        max_len_a: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
        max_len_b: Optional[int] = Field(None, ge=0)
        split_sentences: bool = True

    class LibreRequest(BaseModel):
        """POST /translate (LibreTranslate; its other fields, e.g. api_key, are ignored)."""

        model_config = ConfigDict(strict=True, extra="ignore")
        q: Union[StrictStr, list[StrictStr]]
        source: StrictStr = "auto"
        target: Optional[StrictStr] = None
        format: Literal["text", "html"] = "text"
        alternatives: int = Field(0, ge=0)

    class OnmtItem(BaseModel):
        """One element of POST /translator/translate (OpenNMT-py server)."""

        model_config = ConfigDict(strict=True, extra="ignore")
        src: StrictStr
        id: Optional[StrictInt] = None

    return V1Request, LibreRequest, OnmtItem


# ---------------------------------------------------------------------------- HTML text


class _HtmlSplitter(HTMLParser):
    """Cut HTML into markup (kept verbatim) and text nodes (translated); script/style are markup."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[bool, str]] = []  # (is_text, content)
        self._raw = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.parts.append((False, self.get_starttag_text() or ""))
        if tag in ("script", "style"):
            self._raw += 1

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.parts.append((False, self.get_starttag_text() or ""))

    def handle_endtag(self, tag: str) -> None:
        self.parts.append((False, f"</{tag}>"))
        if tag in ("script", "style") and self._raw:
            self._raw -= 1

    def handle_data(self, data: str) -> None:
        if self._raw:
            self.parts.append((False, data))
        elif self.parts and self.parts[-1][0]:
            self.parts[-1] = (True, self.parts[-1][1] + data)
        else:
            self.parts.append((True, data))

    def handle_comment(self, data: str) -> None:
        self.parts.append((False, f"<!--{data}-->"))

    def handle_decl(self, decl: str) -> None:
        self.parts.append((False, f"<!{decl}>"))


def html_parts(markup: str) -> list[tuple[bool, str]]:
    """(is_text, content) pieces of an HTML fragment; text is unescaped."""
    parser = _HtmlSplitter()
    parser.feed(markup)
    parser.close()
    return parser.parts


# ----------------------------------------------------------------------------- the app


@dataclass
class _Served:
    """A loaded model with its batcher."""

    index: int
    engine: Engine
    batcher: Batcher = field(init=False)

    @property
    def pair(self) -> str:
        return f"{self.engine.source}-{self.engine.target}"


@dataclass
class _Doc:
    """One text of a request: its segmentation and where its sentences are in the request."""

    segmented: Segmented
    start: int


class _Metrics:
    """The Prometheus metrics of one app (its own registry, so several apps can coexist)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("translate_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "translate_request_seconds",
            "request latency",
            ["endpoint"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.sentences = Counter("translate_sentences", "sentences translated", ["pair"], registry=r)
        self.src_tokens = Counter("translate_source_tokens", "source tokens (pieces + EOS)", ["pair"], registry=r)
        self.tgt_tokens = Counter(
            "translate_target_tokens",
            "1-best target pieces (EOS not counted, as translate decode counts them)",
            ["pair"],
            registry=r,
        )
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        self.batch_sentences = Histogram(
            "translate_batch_sentences", "sentences per search batch", ["pair"], registry=r, buckets=sizes
        )
        self.batch_requests = Histogram(
            "translate_batch_requests",
            "requests merged per search batch",
            ["pair"],
            registry=r,
            buckets=sizes,
        )
        self.batch_wait = Histogram(
            "translate_batch_wait_seconds",
            "first request's wait for its batch",
            ["pair"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.in_flight = 0  # changed on the event loop only
        Gauge(
            "translate_searches_in_flight",
            "requests whose sentences are queued or being searched",
            registry=r,
        ).set_function(lambda: self.in_flight)


ENDPOINTS = (
    "/",
    "/v1/translate",
    "/v1/models",
    "/translate",
    "/languages",
    "/translator/translate",
    "/translator/models",
    "/health",
    "/metrics",
)


def create_app(engines: Sequence[Engine], config: ServeConfig = ServeConfig()) -> Any:
    """The FastAPI app serving `engines`; batchers start now and are drained at shutdown."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    V1Request, LibreRequest, OnmtItem = _request_models()
    metrics = _Metrics()
    served = [_Served(i, e) for i, e in enumerate(engines)]
    by_pair: dict[tuple[str, str], _Served] = {}
    for s in served:
        key = (s.engine.source, s.engine.target)
        if key in by_pair:
            raise DataError(f"two models serve {s.pair}: give one of them another pair in --models")
        by_pair[key] = s

    def make_run(s: _Served):
        def run(sentences: list[str], opts: Hashable) -> list[list[Candidate]]:
            results, tokens = s.engine.translate(sentences, opts)
            metrics.tgt_tokens.labels(s.pair).inc(tokens)
            return results

        return run

    def make_record(s: _Served):
        def record(b: BatchRecord) -> None:
            metrics.batch_sentences.labels(s.pair).observe(b.sentences)
            metrics.batch_requests.labels(s.pair).observe(b.requests)
            metrics.batch_wait.labels(s.pair).observe(b.wait_s)

        return record

    for s in served:
        workers = s.engine.take_workers()
        s.batcher = Batcher(
            make_run(s),
            config.max_wait_ms / 1000,  # with max_requests=1 a batch is full at once: no wait
            s.engine.batch_tokens,
            1 << 30,
            make_record(s),
            name=f"search-{s.pair}",
            workers=workers,
            on_start=s.engine.thread_share(workers, config.search_nice),
            max_requests=1 << 30 if config.batching else 1,
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        # uvicorn has finished the in-flight requests; let queued batches (if any) finish too
        for s in served:
            await run_in_threadpool(s.batcher.close, True)
        log.info("all batches done; server stopped")

    app = FastAPI(title="translate serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.metrics = metrics
    app.state.served = served

    # ---------------------------------------------------------------- errors

    def error_response(exc: ApiError) -> JSONResponse:
        body: dict[str, Any] = {"error": exc.message, "code": exc.code}
        if exc.detail is not None:
            body["detail"] = exc.detail
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(
            ApiError(
                422,
                "invalid_request",
                "invalid request",
                [
                    {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                    for e in exc.errors()
                ],
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, f"http_{exc.status_code}", str(exc.detail)))

    @app.exception_handler(Exception)
    async def on_crash(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(ApiError(500, "internal_error", f"internal error: {type(exc).__name__}"))

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Any:
        start = time.perf_counter()
        path = request.url.path
        endpoint = path if path in ENDPOINTS else "other"
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint != "/metrics":
                metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    # ---------------------------------------------------------------- helpers

    max_body = config.max_chars * 6 + 65536  # JSON escapes (\uXXXX) of max_chars characters, plus fields

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise ApiError(413, "too_large", f"request body over {max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise ApiError(413, "too_large", f"request body over {max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def decode_utf8(body: bytes) -> str:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, "invalid_utf8", f"the request body is not valid UTF-8 (byte {exc.start})") from None

    async def read_json(request: Request) -> Any:
        text = decode_utf8(await read_body(request))
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ApiError(
                400, "malformed_json", f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from None

    def validate(model: type, data: Any) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def pick(source: Optional[str], target: Optional[str]) -> _Served:
        """The model for a pair; source/target may be omitted when that leaves one model."""
        found = [
            s
            for s in served
            if (source in (None, "auto") or s.engine.source == source) and (target is None or s.engine.target == target)
        ]
        if len(found) == 1:
            return found[0]
        pairs = ", ".join(s.pair for s in served)
        if not found:
            raise ApiError(
                400,
                "unsupported_pair",
                f"no model translates {source or '?'} to {target or '?'} (available: {pairs})",
            )
        raise ApiError(400, "ambiguous_pair", f"several models match; give source and target (available: {pairs})")

    def check_texts(texts: list[str]) -> None:
        if not texts or all(not t.strip() for t in texts):
            raise ApiError(400, "empty_text", "nothing to translate: the text is empty")
        if len(texts) > config.max_sentences:
            raise ApiError(413, "too_large", f"{len(texts)} texts; the limit is {config.max_sentences} per request")
        chars = sum(len(t) for t in texts)
        if chars > config.max_chars:
            raise ApiError(413, "too_large", f"{chars} characters; the limit is {config.max_chars} per request")
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(
                    400,
                    "invalid_utf8",
                    f"the text holds an unpaired surrogate (\\u{ord(t[exc.start]):04x}), not a Unicode character",
                ) from None

    def segment(texts: list[str], lang: str, split: bool) -> tuple[list[_Doc], list[str]]:
        docs: list[_Doc] = []
        sentences: list[str] = []
        for t in texts:
            seg = (
                split_document(t, lang) if split else Segmented((t,) if t.strip() else (), (1 if t.strip() else 0,), ())
            )
            docs.append(_Doc(seg, len(sentences)))
            sentences.extend(seg.sentences)
        if len(sentences) > config.max_sentences:
            raise ApiError(
                413,
                "too_large",
                f"{len(sentences)} sentences; the limit is {config.max_sentences} per request",
            )
        return docs, sentences

    async def translate(
        s: _Served, texts: list[str], overrides: dict[str, Any], split: bool = True
    ) -> tuple[list[_Doc], list[list[Candidate]]]:
        """Split, batch and search: the documents and the n-best candidates of each sentence."""
        check_texts(texts)
        if (overrides.get("beam") or 0) > config.max_beam or (overrides.get("n_best") or 0) > config.max_beam:
            raise ApiError(422, "invalid_request", f"beam and n_best are limited to {config.max_beam} here")
        try:
            opts = s.engine.options(overrides)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None

        def prepare() -> tuple[list[_Doc], list[str], list[int]]:
            docs, sentences = segment(texts, s.engine.source, split)
            return docs, sentences, [s.engine.cost(x, opts) for x in sentences]

        # a short text is split and tokenized right here (~1 ms): a hop through the thread pool would
        # cost more, since that thread must win the GIL from the search threads and then wake the loop
        if sum(map(len, texts)) <= INLINE_CHARS:
            docs, sentences, costs = prepare()
        else:
            docs, sentences, costs = await run_in_threadpool(prepare)
        if not sentences:
            return docs, []
        try:
            future = s.batcher.submit(sentences, opts, sum(costs))
        except BatcherClosed:
            raise ApiError(503, "shutting_down", "the server is shutting down") from None
        metrics.in_flight += 1
        try:
            results = await asyncio.wrap_future(future)
        finally:
            metrics.in_flight -= 1
        metrics.sentences.labels(s.pair).inc(len(sentences))
        metrics.src_tokens.labels(s.pair).inc(sum(costs) // max(1, opts.beam))
        return docs, results

    def joined(doc: _Doc, results: list[list[Candidate]]) -> str:
        n = len(doc.segmented.sentences)
        return join_document(doc.segmented, [r[0].text if r else "" for r in results[doc.start : doc.start + n]])

    # ---------------------------------------------------------------- endpoints

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        text = resources.files("seq2seq_cli").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(
            text,
            headers={
                "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
            },
        )

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "models": [s.pair for s in served],
            "queued_requests": sum(s.batcher.queued for s in served),
            "in_flight_requests": metrics.in_flight,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def v1_models() -> list:
        return [
            {
                "id": s.index,
                "source": s.engine.source,
                "target": s.engine.target,
                "defaults": s.engine.describe(s.engine.defaults),
            }
            for s in served
        ]

    @app.post("/v1/translate")
    async def v1_translate(request: Request) -> dict:
        req = validate(V1Request, await read_json(request))
        s = pick(req.source, req.target)
        texts = [req.text] if isinstance(req.text, str) else list(req.text)
        overrides = req.model_dump(
            include={"beam", "n_best", "alpha", "beta", "length_penalty", "max_len_a", "max_len_b"}
        )
        docs, results = await translate(s, texts, overrides, req.split_sentences)
        out = []
        for doc in docs:
            n = len(doc.segmented.sentences)
            sentences = [
                {
                    "source": src,
                    "text": r[0].text if r else "",
                    "score": r[0].score if r else 0.0,
                    "n_best": [{"text": c.text, "score": c.score} for c in r],
                }
                for src, r in zip(doc.segmented.sentences, results[doc.start : doc.start + n])
            ]
            out.append(
                {
                    "text": joined(doc, results),
                    "score": sum(x["score"] for x in sentences),
                    "sentences": sentences,
                }
            )
        return {"source": s.engine.source, "target": s.engine.target, "translations": out}

    @app.post("/translate")
    async def libre_translate(request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/x-www-form-urlencoded"):
            pairs = parse_qsl(decode_utf8(await read_body(request)), keep_blank_values=True)
            data: Any = {k: v for k, v in pairs}
            if "alternatives" in data:
                data["alternatives"] = int(data["alternatives"]) if data["alternatives"].isdigit() else -1
        else:
            data = await read_json(request)
        req = validate(LibreRequest, data)
        s = pick(req.source, req.target)
        texts = [req.q] if isinstance(req.q, str) else list(req.q)
        n = req.alternatives + 1
        overrides: dict[str, Any] = {"n_best": n} if n > 1 else {}
        if n > 1 and n > s.engine.defaults.beam:
            overrides["beam"] = n
        if req.format == "html":
            translated, alternatives = await translate_html(s, texts, overrides)
        else:
            docs, results = await translate(s, texts, overrides)
            translated = [joined(d, results) for d in docs]
            alternatives = [alternatives_of(d, results) for d in docs]
        body: dict[str, Any] = {"translatedText": translated[0] if isinstance(req.q, str) else translated}
        if req.alternatives:
            body["alternatives"] = alternatives[0] if isinstance(req.q, str) else alternatives
        if req.source == "auto":
            detected = {"language": s.engine.source, "confidence": 100.0}
            body["detectedLanguage"] = detected if isinstance(req.q, str) else [detected] * len(texts)
        return body

    def alternatives_of(doc: _Doc, results: list[list[Candidate]]) -> list[str]:
        """n-best alternatives of a one-sentence text (LibreTranslate gives none for longer ones)."""
        if len(doc.segmented.sentences) != 1:
            return []
        return [c.text for c in results[doc.start][1:]]

    async def translate_html(
        s: _Served, texts: list[str], overrides: dict[str, Any]
    ) -> tuple[list[str], list[list[str]]]:
        """Translate the text nodes of HTML fragments; markup is kept as it is."""
        parsed = [html_parts(t) for t in texts]
        nodes = [c for parts in parsed for is_text, c in parts if is_text and c.strip()]
        if not nodes:
            check_texts([""])
        docs, results = await translate(s, nodes, overrides)
        out, k = [], 0
        for parts in parsed:
            pieces = []
            for is_text, content in parts:
                if is_text and content.strip():
                    lead = content[: len(content) - len(content.lstrip())]
                    trail = content[len(content.rstrip()) :]
                    pieces.append(lead + html.escape(joined(docs[k], results), quote=False) + trail)
                    k += 1
                else:
                    pieces.append(html.escape(content, quote=False) if is_text else content)
            out.append("".join(pieces))
        return out, [[] for _ in texts]

    @app.get("/languages")
    async def languages() -> list:
        targets: dict[str, list[str]] = {}
        for s in served:
            targets.setdefault(s.engine.source, []).append(s.engine.target)
        return [{"code": c, "name": LANGUAGE_NAMES.get(c, c), "targets": sorted(t)} for c, t in targets.items()]

    @app.post("/translator/translate")
    async def onmt_translate(request: Request) -> list:
        data = await read_json(request)
        if not isinstance(data, list):
            raise ApiError(422, "invalid_request", 'expected a JSON list of {"src": ..., "id": ...}')
        items = [validate(OnmtItem, x) for x in data]
        by_model: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            model = 0 if item.id is None else item.id
            if not 0 <= model < len(served):
                raise ApiError(400, "unsupported_pair", f"no model with id {model} (ids 0-{len(served) - 1})")
            by_model.setdefault(model, []).append(i)
        out: list[list[dict]] = [[] for _ in items]
        jobs = [translate(served[m], [items[i].src for i in idx], {}, split=True) for m, idx in by_model.items()]
        for (m, idx), (docs, results) in zip(by_model.items(), await asyncio.gather(*jobs)):
            n_best = served[m].engine.defaults.n_best
            for i, doc in zip(idx, docs):
                text = joined(doc, results)
                score = sum(r[0].score for r in results[doc.start : doc.start + len(doc.segmented.sentences)] if r)
                out[i] = [{"src": items[i].src, "tgt": text, "n_best": n_best, "pred_score": score}]
        return [[row for rows in out for row in rows]]

    @app.get("/translator/models")
    async def onmt_models() -> list:
        return [
            {"model_id": s.index, "source": s.engine.source, "target": s.engine.target, "loaded": True} for s in served
        ]

    return app


# --------------------------------------------------------------------------- the process


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM that drained the requests ends with status 0
        (uvicorn re-raises the signal after a graceful shutdown, which would end it with 143)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

    return Server


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DataError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(checkpoints: Sequence[Path], models_file: Optional[Path], config: ServeConfig) -> None:
    """`translate serve`: load the models, bind, serve until SIGTERM/SIGINT (drains in-flight requests)."""
    missing = serve_dependencies_missing()
    if missing:
        raise UserError(missing)
    import uvicorn

    specs = [ModelSpec((Path(p),)) for p in checkpoints]
    if models_file is not None:
        specs += load_model_specs(models_file)
    if not specs:
        raise DataError("no model to serve: give checkpoint paths or --models FILE")
    if config.max_chars < 1 or config.max_sentences < 1:
        raise DataError("--max-chars and --max-sentences must be at least 1")
    engines = [load_engine(spec, config) for spec in specs]
    app = create_app(engines, config)
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    uv = uvicorn.Config(
        app, log_config=None, access_log=config.access_log, timeout_graceful_shutdown=None, lifespan="on"
    )
    server = _server_class()(uv)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d", ", ".join(f"{e.source}-{e.target}" for e in engines), shown, port)
    server.run(sockets=[sock])
    if not server.started:
        raise UserError("the server failed to start (see the log above)")
