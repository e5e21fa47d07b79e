"""Dynamic batching for `translate serve`: sentences of concurrent requests share search batches.

One `Batcher` per model owns its worker threads (`workers`), the only threads that run that
model's search. Requests `submit(sentences, key, tokens)` and get a `concurrent.futures.Future`. A free worker takes
the oldest waiting request, then waits at most `max_wait` seconds (counted from that request's
arrival) for more requests with the same `key` (the search settings: requests with different
settings never share a batch), until `max_tokens` (the sum of the requests' token counts),
`max_sentences` or `max_requests` is reached, and runs them as one call of `run(sentences, key)`
(`max_requests=1` turns dynamic batching off: each request is searched on its own). Requests are
taken in arrival order per key and are never split; a single request larger than the budget runs
alone. Since search is batch-invariant per sentence, each result equals what the sentence gets
on its own.

A future cancelled before its batch starts is skipped; one cancelled later (its client went
away) cannot be cancelled any more, and its result is simply dropped: the other requests of the
batch are not affected. `close()` stops accepting requests and, by default, finishes every queued
request before the worker exits (graceful shutdown).

This module knows nothing of models or HTTP: `run` is any callable.

Public names: Batcher, BatchRecord, BatcherClosed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

__all__ = ["Batcher", "BatchRecord", "BatcherClosed"]

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class _Request:
    sentences: Sequence[str]
    key: Hashable
    tokens: int
    future: Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchRecord:
    """What one run of the search held: for metrics and tests."""

    requests: int
    sentences: int
    tokens: int
    wait_s: float  # from the first request's arrival to the start of the search
    run_s: float


class Batcher:
    """Collect concurrent requests into batches and run them on `workers` worker threads.

    With several workers, a batch forms and is searched while another is being searched (each
    worker takes the oldest queued requests when it is free), so a slow search does not hold the
    next requests back; `on_start()` runs first in each worker thread (e.g. to give it its share
    of the CPU threads)."""

    def __init__(
        self,
        run: Callable[[list[str], Any], list[Any]],
        max_wait: float = 0.005,
        max_tokens: int = 4096,
        max_sentences: int = 256,
        on_batch: Optional[Callable[[BatchRecord], None]] = None,
        name: str = "batcher",
        workers: int = 1,
        on_start: Optional[Callable[[], None]] = None,
        max_requests: int = 1 << 30,
    ) -> None:
        if max_wait < 0 or min(max_tokens, max_sentences, workers, max_requests) < 1:
            raise ValueError("max_wait must be >= 0, max_tokens, max_sentences, workers and max_requests >= 1")
        self._run = run
        self.max_wait = max_wait
        self.max_tokens = max_tokens
        self.max_sentences = max_sentences
        self.max_requests = max_requests
        self._on_batch = on_batch
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._on_start = on_start
        self._threads = [threading.Thread(target=self._worker, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, sentences: Sequence[str], key: Hashable, tokens: int) -> Future:
        """Queue one request's sentences (searched with settings `key`); the future gets the
        list of `run` results, one per sentence, in order."""
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise BatcherClosed("the server is shutting down")
            self._queue.append(_Request(list(sentences), key, max(1, tokens), future))
            self._cond.notify()
        return future

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not counting the one being searched)."""
        with self._cond:
            return len(self._queue)

    def close(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Take no more requests; finish the queued ones (drain) or cancel them; wait for the worker."""
        with self._cond:
            self._closing = True
            if not drain:
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # ------------------------------------------------------------------ worker thread

    def _take(self) -> Optional[list[_Request]]:
        """Wait for the next batch: requests with the oldest request's key (None: closed and empty)."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue[0]
            deadline = first.arrived + self.max_wait
            while True:
                group, tokens, sentences = self._fill(first.key)
                full = tokens >= self.max_tokens or sentences >= self.max_sentences or len(group) >= self.max_requests
                remaining = deadline - time.monotonic()
                if full or remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            for r in group:
                self._queue.remove(r)
            return group

    def _fill(self, key: Hashable) -> tuple[list[_Request], int, int]:
        """The queued requests with `key` that fit in the budget, oldest first (at least one)."""
        group: list[_Request] = []
        tokens = sentences = 0
        for r in self._queue:
            if r.key != key:
                continue
            if group and (
                tokens + r.tokens > self.max_tokens
                or sentences + len(r.sentences) > self.max_sentences
                or len(group) >= self.max_requests
            ):
                break
            group.append(r)
            tokens += r.tokens
            sentences += len(r.sentences)
        return group, tokens, sentences

    def _worker(self) -> None:
        if self._on_start is not None:
            self._on_start()
        self._loop()

    def _loop(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            live = [r for r in group if r.future.set_running_or_notify_cancel()]  # skip cancelled ones
            if not live:
                continue
            sentences = [s for r in live for s in r.sentences]
            start = time.monotonic()
            try:
                results = self._run(sentences, live[0].key)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests
                for r in live:
                    r.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            end = time.monotonic()
            at = 0
            for r in live:
                r.future.set_result(results[at : at + len(r.sentences)])
                at += len(r.sentences)
            if self._on_batch is not None:
                try:
                    self._on_batch(
                        BatchRecord(
                            len(live),
                            len(sentences),
                            sum(r.tokens for r in live),
                            start - live[0].arrived,
                            end - start,
                        )
                    )
                except Exception:  # noqa: BLE001 - metrics must never stop the worker
                    log.exception("batch callback failed")
