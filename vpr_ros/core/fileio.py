"""Crash-safe file writing (temporary file beside the target, fsync, rename) and path confinement.

:func:`confined_path` resolves a path that comes from untrusted input (a ROS service request, a
file's manifest) inside a configured directory and refuses anything that would land outside it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it atomically replaces ``path``, on error it is removed.

    Readers see either the old complete file or the new complete one, never a partial file,
    even if the process is killed mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes of ``path`` killed mid-way (SIGKILL, power loss) left
    beside it; return them. Call only where no other process is writing ``path``."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def confined_path(root: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """``rel`` resolved inside directory ``root``; :class:`ConfigError` if it would land outside.

    ``rel`` may be relative to ``root`` or absolute; ``..`` components and symbolic links are
    resolved first, so neither can lead out of ``root``. ``root`` itself is not a valid target
    (a path must name something inside it). Nothing is created.
    """
    text = os.fspath(rel)
    if not text or "\x00" in text:
        raise ConfigError(f"invalid path {text!r}: empty or containing a NUL byte")
    base = Path(root).resolve()
    target = (base / text).resolve()  # an absolute rel replaces base, then must still lie inside it
    if target == base or not target.is_relative_to(base):
        raise ConfigError(f"path {text!r} leaves the directory {base} (only paths inside it are allowed)")
    return target
