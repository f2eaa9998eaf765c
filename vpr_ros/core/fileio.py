"""Crash-safe file writing (temporary file beside the target, fsync, rename), path confinement,
and printable path names.

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

from vpr_ros.core.errors import ConfigError, OutputError


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


def write_file_checked(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and check that every byte reached the file.

    Any failure (disk full, file size limit, a parent that is not a folder, no permission) raises
    :class:`OutputError` naming the path and the reason; the temporary file is removed and whatever
    was at ``path`` before is left as it was, so a failed write never leaves an empty or partial file.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                written = f.write(data)
                f.flush()
                size = os.fstat(f.fileno()).st_size
            if written != len(data) or size != len(data):
                raise OutputError(f"{display_path(path)}: short write ({size} of {len(data)} bytes)")
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{display_path(path)}: cannot write ({exc.strerror or exc})") from None
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check that folder ``path`` can be created (if missing) and written, creating nothing.

    Commands call it before any work, so an unwritable ``--out`` is reported at once rather than
    after a long run: ``path`` (or its nearest existing parent) must be a folder in which a file can
    be made (a probe file is created and removed). Raises :class:`OutputError`.
    """
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        why = "not a folder" if probe_dir == path else f"{display_path(probe_dir)} is not a folder"
        raise OutputError(f"{display_path(path)}: output folder cannot be created ({why})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or exc
        raise OutputError(f"{display_path(path)}: output folder is not writable ({reason})") from None
    return path


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as text that is always valid UTF-8: printable on a strict UTF-8 stream, storable in
    a ROS string field. Bytes of a name that are not UTF-8 (a Latin-1 ``caf\\xe9.png``) appear as
    ``\\xNN`` escapes; every valid name is returned unchanged."""
    text = os.fsdecode(path)
    try:
        raw = text.encode("utf-8", "surrogateescape")  # undecodable bytes back as they were
    except UnicodeEncodeError:  # surrogates that never were bytes of a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


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
