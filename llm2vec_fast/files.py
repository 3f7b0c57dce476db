"""Writing files so that a crash never leaves half of one (a temporary sibling, fsynced, renamed over), and
reading one by content."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Write through ``write(handle)`` (a binary handle) into ``path.tmp``, fsync, rename onto ``path``."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    with contextlib.suppress(OSError):  # the rename itself made durable, where the platform allows it
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def sha256(path: Path) -> str:
    """The SHA-256 of a file's content, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
