"""The converters' one-line errors: what stops a conversion, and how an OS error reads.

Every problem a user can fix (a bad argument, an unusable input path, a full disk) is a
:class:`ConversionError` whose message is the whole story on one line; the converters' ``main``
prints it and exits 2.
"""

from __future__ import annotations

import errno
import os
import stat

from data_prep.reports import shown


class ConversionError(Exception):
    """A user-facing problem (bad argument, bad input path, unusable source): one line."""


class BadFileError(ConversionError):
    """A bad input file or folder under ``--strict``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"bad input {shown(path)}: {reason} (--strict stops at the first bad "
                         f"input; drop --strict to skip and report such files)")
        self.path = path
        self.reason = reason


def write_error(e: OSError, target: str | os.PathLike[str]) -> ConversionError:
    """The one-line error for a failed write of the output ``target``."""
    return ConversionError(f"cannot write {shown(target)}: {os_error_reason(e)}")


def os_error_reason(e: OSError) -> str:
    """The reason part of a one-line error about ``e`` (a full disk says so plainly)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    return e.strerror or str(e)


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for a report."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"
