"""The one set of file helpers: hash a file, hold a lock file, replace a file atomically.

Every cache, checkpoint, model card and stored object goes through these, so a
reader always sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    """The file's sha256 (hex), read now in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(path: Path, *, best_effort: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the duration.

    Windows has no flock: callers rely on atomic replaces alone there. With
    `best_effort`, a lock file that cannot be opened (its folder deleted under us)
    is not an error either: the caller has another guard."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = path.open("a")
    except OSError:
        if not best_effort:
            raise
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(
    path: Path,
    write: Callable[[IO[bytes]], Any],
    *,
    mode: int | None = None,
    durable: bool = True,
) -> None:
    """Write `path` through `write(fh)` into a temporary file beside it, then rename.

    `mode` None gives what a plain open() would (0666 less the umask; mkstemp's 0600
    would hide a model from other users); pass 0o600 for private files. `durable`
    fsyncs the file and its folder, so the rename itself survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def atomic_write_json(path: Path, data: Any, *, durable: bool = False) -> None:
    """`data` as indented, key-sorted JSON, replaced atomically (see atomic_write)."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), mode=0o600, durable=durable)
