"""Checkpoint files: their content hash, remembered across processes.

A model id for RAIOX_WEIGHTS names the file's sha256, and hashing a 350-600 MB
checkpoint costs seconds on every start. The hash is kept in
$RAIOX_HOME/cache/checkpoint-hashes.json keyed by the resolved path, with the
size and mtime_ns it was computed for: a changed size or mtime re-hashes. The
cache is only an optimisation: an unreadable or corrupt file is ignored and
rewritten, a read-only home only costs the re-hash.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from raiox_cli import config
from raiox_cli.files import atomic_write_json, locked, sha256_of

log = logging.getLogger(__name__)

HASH_CACHE = Path("cache") / "checkpoint-hashes.json"

_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def hash_cache_path() -> Path:
    return config.home_dir() / HASH_CACHE


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), read from the file only when neither this process
    nor the on-disk cache knows it for the file's current size and mtime."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    cache = hash_cache_path()
    digest = _lookup(cache, key)
    if digest is None:
        digest = sha256_of(resolved)
        _remember(cache, key, digest)
    with _memo_lock:
        _memo[key] = digest
    return digest


def _read(cache: Path) -> dict[str, dict]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.info("ignoring unreadable checkpoint hash cache %s (%s)", cache, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _lookup(cache: Path, key: tuple[str, int, int]) -> str | None:
    entry = _read(cache).get(key[0])
    if not isinstance(entry, dict):
        return None
    digest = entry.get("sha256")
    if entry.get("size") != key[1] or entry.get("mtime_ns") != key[2]:
        return None
    if not isinstance(digest, str) or len(digest) != 64:
        return None
    return digest


def _remember(cache: Path, key: tuple[str, int, int], digest: str) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with locked(cache.with_suffix(".lock")):
            # Read-modify-replace under the lock, so two processes hashing different
            # files both keep their entry; the replace keeps readers off half-written files.
            entries = _read(cache)
            entries[key[0]] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
            atomic_write_json(cache, entries)
    except OSError as exc:
        log.info("could not remember the checkpoint hash in %s (%s)", cache, exc)
