"""A checkpoint's hash is remembered across processes by path, size and mtime."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raiox_cli import embedding
from raiox_cli.embedding import checkpoints

HASH_IN_A_PROCESS = (
    "import sys; from pathlib import Path; from raiox_cli.embedding import checkpoints;"
    "print(checkpoints.file_sha256(Path(sys.argv[1])))"
)


def _hash_elsewhere(path: Path, home: Path) -> str:
    env = {**os.environ, "RAIOX_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-c", HASH_IN_A_PROCESS, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return proc.stdout.strip()


def _rewrite_keeping_size_and_mtime(path: Path, content: bytes) -> None:
    stat = path.stat()
    assert len(content) == stat.st_size
    path.write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_second_process_does_not_reread_the_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"a" * 4096)
    first = _hash_elsewhere(weights, home)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()
    cached = json.loads((home / checkpoints.HASH_CACHE).read_text())
    assert cached[str(weights.resolve())]["sha256"] == first
    # Same size and mtime, other bytes: only a process that reads the file would notice.
    _rewrite_keeping_size_and_mtime(weights, b"b" * 4096)
    assert _hash_elsewhere(weights, home) == first


def test_a_touched_file_is_hashed_again(tmp_path: Path) -> None:
    home = tmp_path / "home"
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"a" * 100)
    first = _hash_elsewhere(weights, home)
    _rewrite_keeping_size_and_mtime(weights, b"c" * 100)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = _hash_elsewhere(weights, home)
    assert second == hashlib.sha256(b"c" * 100).hexdigest() != first
    weights.write_bytes(b"c" * 101)  # a changed size re-hashes too
    assert _hash_elsewhere(weights, home) == hashlib.sha256(b"c" * 101).hexdigest()


@pytest.mark.parametrize("garbage", [b"{not json", b"[1, 2]", b'{"x": 1', b"\xff\xfe\x00"])
def test_a_corrupt_cache_is_ignored_and_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, garbage: bytes
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("RAIOX_HOME", str(home))
    cache = home / checkpoints.HASH_CACHE
    cache.parent.mkdir(parents=True)
    cache.write_bytes(garbage)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    spec = embedding.ModelSpec("raiox-tiny", "x", weights, "cpu")
    expected = hashlib.sha256(b"weights").hexdigest()
    assert embedding.model_id(spec) == f"raiox-tiny:file:{expected[:16]}"
    assert json.loads(cache.read_text())[str(weights.resolve())]["sha256"] == expected


def test_concurrent_writers_keep_every_entry(tmp_path: Path) -> None:
    home = tmp_path / "home"
    files = []
    for i in range(4):
        path = tmp_path / f"w{i}.pt"
        path.write_bytes(bytes([i]) * 1000)
        files.append(path)
    env = {**os.environ, "RAIOX_HOME": str(home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", HASH_IN_A_PROCESS, str(p)], env=env) for p in files
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    entries = json.loads((home / checkpoints.HASH_CACHE).read_text())
    for path in files:
        expected = hashlib.sha256(path.read_bytes()).hexdigest()
        assert entries[str(path.resolve())]["sha256"] == expected
    assert not list((home / "cache").glob(".hashes-*"))  # no temporary file left behind
