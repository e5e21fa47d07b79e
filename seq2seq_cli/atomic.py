"""Files that appear whole or not at all: the one atomic-write mechanism of the package.

`AtomicFile(path)` opens a temporary file beside `path` (same directory, so the final rename
stays on one file system). `commit()` flushes, fsyncs, renames it over `path` and fsyncs the
directory; `abort()` (or an exception inside `with`) removes it and leaves `path` untouched.
A crash, a Ctrl-C or a full disk therefore never leaves a half-written checkpoint, tokenizer
model, translation or report.

This room imports nothing of the package. Public names: AtomicFile, atomic_write, set_default_mode.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Optional

__all__ = ["AtomicFile", "atomic_write", "set_default_mode"]


def set_default_mode(fd: int) -> None:
    """Give a mkstemp file (mode 0600) the permissions a plainly created file would have (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file beside `path`, renamed over it by `commit()` (binary, or UTF-8 text with "\\n")."""

    def __init__(self, path: Path | str, text: bool = False, suffix: str = ".tmp") -> None:
        self.path = Path(path)
        parent = self.path.parent if str(self.path.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=suffix, dir=parent)
        self.tmp: Optional[Path] = Path(tmp)
        try:
            set_default_mode(fd)
            self.handle: IO[Any] = os.fdopen(fd, "w", encoding="utf-8", newline="\n") if text else os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> None:
        """Flush, fsync and rename into place (then fsync the directory)."""
        if self.tmp is None:
            return
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.tmp = None
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Drop the temporary file; the target keeps its previous content (or stays absent)."""
        if self.tmp is not None:
            try:
                self.handle.close()
            except OSError:
                pass
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    def __enter__(self) -> IO[Any]:
        return self.handle

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write(path: Path | str, data: bytes | str) -> None:
    """Write bytes or text to path atomically."""
    with AtomicFile(path, text=isinstance(data, str)) as f:
        f.write(data)
