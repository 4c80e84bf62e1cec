"""Crash-safe file output shared by converters, checkpoints and benchmark results.

A reader must never see a half-written file under its final name: everything is written to a
temporary sibling, flushed and fsync'ed, then renamed over the destination (rename is atomic
within one filesystem). If anything fails, the temporary file is removed and an existing file
under the final name is left untouched. A process killed mid-write leaves its temporary file
behind (``.<name>.<random>.partial``): :func:`remove_partials` clears them once no other
writer can be using the folder, which :func:`exclusive_lock` establishes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success, fsync it and rename it to ``path``.

    For writers that take a file name rather than a file object (ffcv's DatasetWriter,
    ``torch.save``). The temporary name starts with ``.`` and ends with ``.partial`` so that
    globbing for the final pattern never matches it.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` only if the block completes."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open: mode must be a write mode, got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LockedError(RuntimeError):
    """Another live process holds the lock (the message names it and its PID)."""


def atomic_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Make ``dst`` a hard link to ``src`` (replacing ``dst`` atomically), so a second name for
    the same bytes costs no disk; where the filesystem has no hard links, an atomic copy."""
    src, dst = Path(src), Path(dst)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(src, tmp)
    return dst


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    A second process asking for it is refused at once with :class:`LockedError`, naming
    ``what`` and the holder's PID (written into the file). The kernel drops the lock when its
    holder dies, kill -9 included, so a lock file left behind never blocks a later run.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockedError(f"{what} is in use by another process (PID {holder}, lock {path})") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_partials(directory: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete the temporary files (:func:`atomic_path`'s ``.<name>.<random>.partial``) that
    killed writers left in ``directory``, of ``name`` only or of every name; returns them.

    Only safe while no live writer of them exists (hold :func:`exclusive_lock` first).
    """
    pattern = f".{glob.escape(name) if name is not None else '*'}.*.partial"
    removed = []
    for p in Path(directory).glob(pattern):
        if p.is_file():  # never a folder (to_dali's staging folder ends in .partial too)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (converters record it, verify checks it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
