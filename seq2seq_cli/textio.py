"""Text in and out for the commands: line chunks from a file or stdin, and atomic output files.

`stdin_chunks` reads whatever is available on a pipe or terminal and hands over the complete
lines it has as soon as reading would block, so a writer that sends one line and waits for
its answer gets it at once, while a fast pipe still yields large chunks for batching.
`AtomicOutput` writes to a temporary file beside the target and renames it into place only
when the command completes: an interrupted decode leaves the output absent, never half-written.

Public names: file_chunks, stdin_chunks, AtomicOutput.
"""

from __future__ import annotations

import os
import select
import sys
from pathlib import Path
from typing import IO, Iterator, Optional

from .atomic import AtomicFile
from .data import DataError, decode_bytes, iter_lines

__all__ = ["file_chunks", "stdin_chunks", "AtomicOutput"]


def file_chunks(path: Path, size: int, errors: str, counts: dict) -> Iterator[list[str]]:
    """Lists of at most `size` lines of a file (line ends stripped)."""
    chunk: list[str] = []
    for line in iter_lines(path, errors, counts):
        chunk.append(line)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ready(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):  # not selectable (e.g. some Windows handles): behave as a pipe with data
        return True


def stdin_chunks(max_lines: int, errors: str, counts: dict, stream: IO[bytes] | None = None) -> Iterator[list[str]]:
    """Complete lines from stdin, chunked by availability (see module docstring)."""
    fd = (stream or sys.stdin.buffer).fileno()
    pending = b""
    lines: list[str] = []
    line_no = 0
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        pending += data
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            line_no += 1
            lines.append(decode_bytes(raw, "<stdin>", line_no, errors, counts).rstrip("\r"))
            if len(lines) >= max_lines:
                yield lines
                lines = []
        if lines and not _ready(fd):
            yield lines
            lines = []
    if pending:
        line_no += 1
        lines.append(decode_bytes(pending, "<stdin>", line_no, errors, counts).rstrip("\r"))
    if lines:
        yield lines


class AtomicOutput:
    """A text output: stdout (line-flushed when asked), or a file that appears only on success."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.file: Optional[AtomicFile] = None
        if target == "-":
            self.handle: IO[str] = sys.stdout
            return
        path = Path(target)
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected an output file path")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise DataError(f"{path}: output directory {parent} does not exist")
        try:
            self.file = AtomicFile(path, text=True, suffix=".partial")
        except OSError as exc:
            raise DataError(f"{path}: cannot write output ({exc.strerror})") from None
        self.handle = self.file.handle

    def write_lines(self, lines: list[str], flush: bool = False) -> None:
        self.handle.write("".join(x + "\n" for x in lines))
        if flush:
            self.handle.flush()

    def commit(self) -> None:
        """Finish: flush stdout, or fsync the temp file and rename it over the target."""
        if self.file is None:
            self.handle.flush()
        else:
            self.file.commit()

    def abort(self) -> None:
        """Drop the partial file (on error or interruption)."""
        if self.file is not None:
            self.file.abort()
