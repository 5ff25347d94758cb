"""Atomic file and directory writes, and file hashes: the one place every package writes through.

A failed or interrupted write must never leave a file that looks complete, so every
artifact, checkpoint, metrics file and bundle is written under a temporary name in the
same directory and renamed into place (a rename within one filesystem is atomic).

    atomic_write_text(run_dir / "metrics.json", text)
    with atomic_path(run_dir / "teacher.safetensors") as tmp:   # a library writes `tmp`
        save_file(tensors, tmp)
    with atomic_dir(out) as tmp:                                # build a whole bundle in `tmp`
        ...
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path` (with `mode`), on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)  # mkstemp creates 0600; most are ordinary shared files (a private key is not)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temp file in the same directory (fsynced), then rename over `path`."""
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it replaces `dest`
    (when `replace`, else it must not exist yet), on failure it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp creates 0700
        if dest.exists() and replace:
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
