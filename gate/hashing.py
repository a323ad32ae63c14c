"""Content hashes of files and folders, with an optional cache keyed by (path, size, mtime).

Hashes identify what was scored: the results store is keyed by them, so a re-run recognises
unchanged weights and data without trusting file names.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

_CHUNK = 1 << 20


class HashCache(Protocol):
    """Remembers file hashes so large unchanged weight files are not re-read on every run."""

    def get(self, path: str, size: int, mtime_ns: int) -> str | None: ...

    def put(self, path: str, size: int, mtime_ns: int, sha256: str) -> None: ...


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(value: object) -> str:
    """Hash of a JSON-serialisable value, independent of dict key order."""
    return sha256_bytes(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def sha256_file(path: Path, cache: HashCache | None = None) -> str:
    """sha256 of a file's bytes; reuses ``cache`` when size and mtime are unchanged."""
    st = path.stat()
    key = str(path.resolve())
    if cache is not None:
        hit = cache.get(key, st.st_size, st.st_mtime_ns)
        if hit is not None:
            return hit
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    after = path.stat()
    # A file that changed while we read it is being written: never cache its hash.
    if cache is not None and (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
        cache.put(key, st.st_size, st.st_mtime_ns, value)
    return value


def sha256_files(files: list[Path], root: Path, cache: HashCache | None = None) -> str:
    """One hash over several files, by their paths relative to ``root`` and their contents."""
    lines = [f"{f.relative_to(root).as_posix()}:{sha256_file(f, cache)}" for f in sorted(files)]
    return sha256_bytes("\n".join(lines).encode())


def file_fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each file; two equal fingerprints mean nothing was rewritten."""
    out = []
    for f in sorted(files):
        st = os.stat(f)
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return out
