"""The report of skipped files, and how paths are shown in it and in messages.

A bad input file is skipped and listed with its reason in a tab-separated report beside the
output (:class:`Skipped`). Names are escaped (:func:`escape_field`) so that a file name that is
not UTF-8, or holds a tab or a newline, stays one row and reads back exactly
(:func:`read_skip_report`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path


def skipped_line(count: int, report: str | os.PathLike[str]) -> str:
    """The converters' closing line about bad files, naming the report when there are any."""
    return f"skipped {count} files" + (f" (listed in {report})" if count else "")


# Escaped in reports and messages: the backslash itself, control characters (tab and
# newline included), line separators that text tools split on, lone surrogates (the bytes of
# a file name that is not UTF-8, as os.fsdecode's surrogateescape gives them).
_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|(.))", re.DOTALL)


_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(m: re.Match) -> str:
    c = m.group()
    code = ord(c)
    if c in _SHORT:
        return _SHORT[c]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def _unescape_char(m: re.Match) -> str:
    byte, code, char = m.groups()
    if byte is not None:
        value = int(byte, 16)
        return chr(value if value < 0x80 else 0xDC00 + value)
    if code is not None:
        return chr(int(code, 16))
    return {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}.get(char, "\\" + char)


def escape_field(text: str) -> str:
    """``text`` as one line of valid UTF-8 that :func:`unescape_field` turns back into it.

    Ordinary names are unchanged; a backslash becomes ``\\\\``, tab, newline and carriage
    return ``\\t``, ``\\n``, ``\\r``, other control characters and undecodable file-name
    bytes ``\\xNN``, lone surrogates and line separators ``\\uNNNN``.
    """
    return _UNSAFE.sub(_escape_char, text)


def unescape_field(text: str) -> str:
    return _ESCAPE.sub(_unescape_char, text)


def shown(path: str | os.PathLike[str]) -> str:
    """A path as an error message shows it: on one line, whatever bytes its name holds."""
    return escape_field(os.fspath(path))


@dataclass
class Skipped:
    """Files left out of the output, with the reason (kept in output order)."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, rel: str, reason: str) -> None:
        self.entries.append((rel, reason))

    def __len__(self) -> int:
        return len(self.entries)

    def text(self, root: str) -> str:
        """A tab-separated report: a comment header, then ``path<TAB>reason`` lines.

        Fields are escaped (:func:`escape_field`): a name that is not UTF-8 or holds a tab or
        a newline stays one row and reads back exactly (:func:`read_skip_report`).
        """
        rows = "".join(f"{escape_field(rel)}\t{escape_field(reason)}\n" for rel, reason in self.entries)
        return (f"# {len(self.entries)} files skipped; paths are relative to {escape_field(root)}\n"
                f"# path\treason\n{rows}")

    def write(self, path: str | os.PathLike[str], root: str) -> None:
        from fastsiam.files import atomic_open

        with atomic_open(path, "wb") as f:
            f.write(self.text(root).encode("utf-8"))


def read_skip_report(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The ``(path, reason)`` rows of a report written by :meth:`Skipped.write`."""
    rows = []
    for line in Path(path).read_bytes().decode("utf-8").split("\n"):
        if line and not line.startswith("#"):
            rel, _, reason = line.partition("\t")
            rows.append((unescape_field(rel), unescape_field(reason)))
    return rows
