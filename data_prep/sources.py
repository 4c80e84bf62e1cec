"""What both offline converters share: listing the input, checking images, reporting bad files.

``to_ffcv.py`` and ``to_dali.py`` read the same three kinds of input and must agree on which
images exist, in which order, with which labels, and which files are skipped:

- an ImageFolder tree ``<src>/<class>/**/<image>``, with class indices exactly as
  ``torchvision.datasets.ImageFolder`` assigns them (sorted folder names, files sorted in
  ``os.walk`` order, torchvision's image extensions);
- a flat folder (ImageNet's validation set) plus a labels file: one label per line in sorted
  file-name order, or ``filename,label`` CSV lines;
- a file list: ``path label`` lines, in the listed order.

A label is a class index or a class name; ``--classes classes.json`` pins the mapping (reuse
train's for val). Every image is fully decoded once to check it: corrupt or truncated files,
zero-byte files and non-images are skipped and listed with the reason in a report beside the
output (``--strict`` turns the first one into an error). Listing follows symbolic links but
visits each real folder once, and reports what it cannot use instead of dropping it: link
loops, unreadable folders, FIFOs and other files that are not regular files. Work is spread
over worker processes with an ordered, bounded :func:`parallel_map`, so the output order never
depends on timing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import multiprocessing
import os
import re
import stat
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fastsiam import imageio

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder considers images.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# --verify compares decoded images with their source above this PSNR (dB). Re-encoding at
# quality 90 with 4:2:0 chroma scores >= 24 dB even on the toy set's saturated synthetic edges
# (its PNG file; photos typically 35-40 dB); an image at the wrong position scores <= 15 dB
# there (unrelated photos ~10-15 dB).
VERIFY_MIN_PSNR = 20.0

# Set by tests only: seconds to sleep per written sample, so that a test can kill a
# conversion part-way through and check what it leaves behind.
TEST_DELAY_ENV = "FASTSIAM_CONVERT_TEST_DELAY"


class ConversionError(Exception):
    """A user-facing problem (bad argument, bad input path, unusable source): one line."""


class BadFileError(ConversionError):
    """A bad input file or folder under ``--strict``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"bad input {shown(path)}: {reason} (--strict stops at the first bad "
                         f"input; drop --strict to skip and report such files)")
        self.path = path
        self.reason = reason


def check_options(out: Path, *, overwrite: bool, jpeg_quality: int,
                  minimums: Sequence[tuple[str, int | None, int]]) -> None:
    """The options both converters share, one line per problem (raises ConversionError):
    ``--jpeg-quality`` in 1..100, each ``(flag, value, least)`` of ``minimums`` at least
    ``least`` (None: not set), and no existing ``out`` unless ``overwrite``."""
    if not 1 <= jpeg_quality <= 100:
        raise ConversionError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    for name, value, low in minimums:
        if value is not None and value < low:
            raise ConversionError(f"{name} must be >= {low}, got {value}")
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} already exists; pass --overwrite to replace it")


def nothing_decodable(source: Source) -> ConversionError:
    """The error of a conversion whose every input was bad."""
    return ConversionError(f"none of the {len(source.items)} images in {source.root} could be "
                           f"decoded; nothing to write")


def skipped_line(count: int, report: str | os.PathLike[str]) -> str:
    """The converters' closing line about bad files, naming the report when there are any."""
    return f"skipped {count} files" + (f" (listed in {report})" if count else "")


def write_error(e: OSError, target: str | os.PathLike[str]) -> ConversionError:
    """The one-line error for a failed write of the output ``target``."""
    return ConversionError(f"cannot write {shown(target)}: {os_error_reason(e)}")


def os_error_reason(e: OSError) -> str:
    """The reason part of a one-line error about ``e`` (a full disk says so plainly)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    return e.strerror or str(e)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside the output ``out`` for the block, or refuse in one line.

    Two conversions to one output would destroy each other's temporary files; the second is
    refused, naming the first one's PID. The kernel drops the lock when its holder dies
    (``kill -9`` included), so a lock file left behind never blocks a later run.
    """
    from fastsiam.files import LockedError, exclusive_lock

    with contextlib.ExitStack() as stack:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(out.parent / f".{out.name}.lock",
                                               f"output {shown(out)}"))
        except LockedError as e:
            raise ConversionError(str(e)) from None
        except OSError as e:
            raise write_error(e, out) from None
        yield


# ----------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class Item:
    """One candidate image: absolute ``path``, ``rel`` (as reports show it), class ``label``."""

    path: str
    rel: str
    label: int


@dataclass
class Source:
    """The listed input, in output order.

    Attributes:
        items: image candidates in output order (not yet checked).
        classes: class names in label order.
        layout: ``imagefolder``, ``flat`` or ``filelist``.
        root: the folder ``rel`` paths are relative to.
        rejected: ``(rel, reason)`` of files rejected while listing (non-image extensions).
        labels_file: the labels file or file list, if any.
    """

    items: list[Item]
    classes: list[str]
    layout: str
    root: str
    rejected: list[tuple[str, str]] = field(default_factory=list)
    labels_file: str | None = None

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the input (deterministic: no timestamps)."""
        return {"layout": self.layout, "root": self.root, "labels_file": self.labels_file,
                "candidates": len(self.items) + len(self.rejected)}


def read_classes(path: str | os.PathLike[str]) -> list[str]:
    """Class names in index order from ``classes.json``.

    Accepts what :func:`write_classes` writes (``{"classes": [...]}``), a plain JSON list, or
    torchvision's ``class_to_idx`` dict (``{name: index}``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"--classes {path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"--classes {path}: not readable JSON ({e})") from None
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if isinstance(data, dict):
        if sorted(data.values()) != list(range(len(data))):
            raise ConversionError(f"--classes {path}: class_to_idx values must be 0..{len(data) - 1}")
        data = sorted(data, key=data.__getitem__)
    if not isinstance(data, list) or not data or not all(isinstance(c, str) for c in data):
        raise ConversionError(f"--classes {path}: expected a non-empty list of class names, "
                              f'{{"classes": [...]}} or a {{name: index}} dict')
    if len(set(data)) != len(data):
        raise ConversionError(f"--classes {path}: class names must be unique")
    return data


def classes_json(classes: Sequence[str]) -> str:
    """``{"classes": [...], "class_to_idx": {...}}``, what :func:`read_classes` reads."""
    return json.dumps({"classes": list(classes),
                       "class_to_idx": {c: i for i, c in enumerate(classes)}}, indent=1) + "\n"


def write_classes(path: str | os.PathLike[str], classes: Sequence[str]) -> None:
    """Write :func:`classes_json` atomically."""
    from fastsiam.files import atomic_open

    with atomic_open(path, "w") as f:
        f.write(classes_json(classes))


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _non_image(rel: str) -> tuple[str, str]:
    ext = os.path.splitext(rel)[1] or "(none)"
    return rel, f"not an image (extension {ext}; images are {', '.join(IMG_EXTENSIONS)})"


def _kind(mode: int) -> str:
    """What a file that is not a regular file is, for a report."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"


def _irregular(entry: os.DirEntry) -> str:
    """Why an entry that is neither a folder nor a regular file cannot be an image.

    Opening a FIFO for reading waits for a writer forever; devices and sockets are no images.
    """
    try:
        mode = entry.stat().st_mode
    except OSError:
        return "not a regular file (a broken symbolic link)"
    return f"not a regular file ({_kind(mode)})"


def _scan(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _dir_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_class(top: str, root: str, seen: dict[tuple[int, int], str]
                ) -> tuple[list[tuple[str, list[os.DirEntry]]], list[tuple[str, str]]]:
    """``os.walk(top, followlinks=True)`` that visits each real folder once.

    Returns ``(dirpath, file entries)`` per visited folder and the rejected ``(rel, reason)``:
    a link back to a folder being walked (a loop, which ``os.walk`` follows ~40 levels deep),
    a second name for a folder already listed (its images would be listed twice), a folder
    that cannot be read (``os.walk`` drops those silently). ``seen`` maps the real folders
    already listed, by (st_dev, st_ino), to their path; folders are entered in sorted order,
    so which name of a folder is kept does not depend on the file system.
    """
    visited: list[tuple[str, list[os.DirEntry]]] = []
    rejected: list[tuple[str, str]] = []
    stack: list[tuple[str, frozenset[tuple[int, int]]]] = [(top, frozenset(seen))]
    while stack:
        dirpath, ancestors = stack.pop()
        rel = os.path.relpath(dirpath, root)
        try:
            key = _dir_key(dirpath)
            entries = _scan(dirpath)
        except OSError as e:
            rejected.append((rel, f"folder not readable ({e.strerror or e})"))
            continue
        if key in seen:
            first = os.path.relpath(seen[key], root)
            first = "the --src folder" if first == "." else first
            reason = (f"symbolic link loop (leads back to {first}); not followed" if key in ancestors
                      else f"same folder as {first}, already listed; not followed")
            rejected.append((rel, reason))
            continue
        seen[key] = dirpath
        visited.append((dirpath, [e for e in entries if not e.is_dir()]))
        below = ancestors | {key}
        stack.extend((e.path, below) for e in reversed(entries) if e.is_dir())
    return visited, rejected


def list_image_folder(src: str | os.PathLike[str], *, classes: Sequence[str] | None = None,
                      limit: int | None = None) -> Source:
    """List ``<src>/<class>/**/<file>`` the way torchvision's ImageFolder does.

    Symbolic links are followed, but each real folder is listed once per class (see
    :func:`_walk_class`); what cannot be used is rejected with the reason instead.

    Args:
        src: the root folder; every sub-folder is a class (sorted names give the indices).
        classes: a fixed mapping (e.g. train's ``classes.json`` for val); every class folder
            must be in it. Default: the sorted folder names.
        limit: keep the first ``limit`` images of each class.
    """
    root = Path(src)
    # torchvision.datasets.folder.find_classes: every sub-directory, sorted by name.
    try:
        folders = [e.name for e in _scan(str(root)) if e.is_dir()]
    except OSError as e:
        raise ConversionError(f"cannot list --src {shown(root)}: {e.strerror or e}") from None
    if not folders:
        raise ConversionError(f"--src {root} has no class folders; for a flat folder of images "
                              f"pass --labels, for a list of files --file-list")
    if classes is None:
        classes = folders
    index = {c: i for i, c in enumerate(classes)}
    missing = [f for f in folders if f not in index]
    if missing:
        raise ConversionError(f"class folder {root / missing[0]} is not in the class mapping "
                              f"(--classes has {len(classes)} classes; {len(missing)} folders missing)")
    items: list[Item] = []
    rejected: list[tuple[str, str]] = []
    root_key = {_dir_key(str(root)): str(root)}
    for name in folders:
        kept = 0
        visited, bad_folders = _walk_class(str(root / name), str(root), dict(root_key))
        rejected += bad_folders
        # torchvision.datasets.folder.make_dataset: sorted(os.walk(...)), sorted file names.
        for _, entries in sorted(visited, key=lambda v: v[0]):
            for entry in entries:
                rel = os.path.relpath(entry.path, root)
                if not _is_image_name(entry.name):
                    rejected.append(_non_image(rel))
                elif not entry.is_file():
                    rejected.append((rel, _irregular(entry)))
                elif limit is None or kept < limit:
                    items.append(Item(os.path.abspath(entry.path), rel, index[name]))
                    kept += 1
    return Source(items, list(classes), "imagefolder", str(root.absolute()), rejected)


def _label_index(token: str, classes: dict[str, int] | None, where: str) -> int | str:
    """An int index for numeric tokens (checked against ``classes``), else the name."""
    if token.lstrip("-").isdigit():
        value = int(token)
        if value < 0 or (classes is not None and value >= len(classes)):
            bound = f"0..{len(classes) - 1}" if classes is not None else ">= 0"
            raise ConversionError(f"{where}: label {value} out of range (expected {bound})")
        return value
    if classes is not None and token not in classes:
        raise ConversionError(f"{where}: class {token!r} is not in the class mapping")
    return token


def _resolve_labels(raw: list[tuple[Item, int | str]], classes: Sequence[str] | None,
                    labels_path: Path) -> tuple[list[Item], list[str]]:
    """Turn per-item label tokens into indices; derive the classes when not given."""
    kinds = {type(label) for _, label in raw}
    if kinds == {int, str}:
        raise ConversionError(f"{labels_path}: mixes class indices and class names")
    if classes is None:
        if kinds == {str}:
            classes = sorted({label for _, label in raw})  # type: ignore[type-var]
        else:
            classes = [str(i) for i in range(max(int(label) for _, label in raw) + 1)]
    index = {c: i for i, c in enumerate(classes)}
    items = [Item(it.path, it.rel, label if isinstance(label, int) else index[label])
             for it, label in raw]
    return items, list(classes)


def _limit_per_class(items: list[Item], limit: int | None) -> list[Item]:
    if limit is None:
        return items
    seen: dict[int, int] = {}
    kept = []
    for it in items:
        if seen.get(it.label, 0) < limit:
            seen[it.label] = seen.get(it.label, 0) + 1
            kept.append(it)
    return kept


def _content_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConversionError(f"labels file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"labels file {path} is not readable text ({e})") from None
    return [(n, s.strip()) for n, s in enumerate(text.splitlines(), 1)
            if s.strip() and not s.lstrip().startswith("#")]


def list_flat_folder(src: str | os.PathLike[str], labels: str | os.PathLike[str], *,
                     classes: Sequence[str] | None = None, limit: int | None = None) -> Source:
    """List a flat folder of images labelled by a labels file.

    The labels file is either one label per line, matching the folder's image files in sorted
    name order (ImageNet's devkit style), or ``filename,label`` CSV lines (a file name may omit
    its extension; a first line naming no file is a header; only the first whitespace-separated
    token of the label field is used, so ``LOC_val_solution.csv`` works). Labels are indices
    or class names.
    """
    root, labels_path = Path(src), Path(labels)
    try:
        entries = [e for e in _scan(str(root)) if not e.is_dir()]
    except OSError as e:
        raise ConversionError(f"cannot list --src {shown(root)}: {e.strerror or e}") from None
    images = [e.name for e in entries if _is_image_name(e.name) and e.is_file()]
    rejected = [_non_image(e.name) if not _is_image_name(e.name) else (e.name, _irregular(e))
                for e in entries if not (_is_image_name(e.name) and e.is_file())]
    if not images:
        raise ConversionError(f"--src {root} contains no image files "
                              f"(extensions {', '.join(IMG_EXTENSIONS)})")
    lines = _content_lines(labels_path)
    cls_index = {c: i for i, c in enumerate(classes)} if classes is not None else None
    raw: list[tuple[Item, int | str]] = []
    if lines and all("," in s for _, s in lines):
        by_name = {n: n for n in images}
        by_stem: dict[str, str] = {}
        for n in images:
            by_stem.setdefault(os.path.splitext(n)[0], n)
        table: dict[str, int | str] = {}
        for k, (lineno, s) in enumerate(lines):
            name, _, label_field = (x.strip() for x in s.partition(","))
            fname = by_name.get(name) or by_stem.get(name)
            where = f"{labels_path}:{lineno}"
            if fname is None:
                if k == 0:
                    continue  # a header line such as "ImageId,PredictionString"
                raise ConversionError(f"{where}: no image {name!r} in {root}")
            if not label_field:
                raise ConversionError(f"{where}: missing label for {name!r}")
            table[fname] = _label_index(label_field.split()[0], cls_index, where)
        unlabelled = [n for n in images if n not in table]
        if unlabelled:
            raise ConversionError(f"labels file {labels_path} has no label for {root / unlabelled[0]} "
                                  f"({len(unlabelled)} images unlabelled)")
        raw = [(Item(str((root / n).absolute()), n, 0), table[n]) for n in images]
    else:
        if len(lines) != len(images):
            raise ConversionError(f"labels file {labels_path} has {len(lines)} labels for "
                                  f"{len(images)} images in {root} (one label per line, in "
                                  f"sorted file-name order)")
        for n, (lineno, s) in zip(images, lines):
            token = s.split()[0]
            raw.append((Item(str((root / n).absolute()), n, 0),
                        _label_index(token, cls_index, f"{labels_path}:{lineno}")))
    items, class_list = _resolve_labels(raw, classes, labels_path)
    return Source(_limit_per_class(items, limit), class_list, "flat", str(root.absolute()),
                  rejected, str(labels_path.absolute()))


def list_file_list(file_list: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                   classes: Sequence[str] | None = None, limit: int | None = None) -> Source:
    """List ``path label`` lines (paths relative to ``root``, default the list's folder)."""
    list_path = Path(file_list)
    base = Path(root) if root is not None else list_path.parent
    cls_index = {c: i for i, c in enumerate(classes)} if classes is not None else None
    raw: list[tuple[Item, int | str]] = []
    rejected = []
    for lineno, s in _content_lines(list_path):
        parts = s.rsplit(None, 1)
        if len(parts) != 2:
            raise ConversionError(f"{list_path}:{lineno}: expected 'path label', got {s!r}")
        rel, token = parts
        if not _is_image_name(rel):
            rejected.append(_non_image(rel))
            continue
        path = Path(rel) if os.path.isabs(rel) else base / rel
        raw.append((Item(str(path.absolute()), rel, 0),
                    _label_index(token, cls_index, f"{list_path}:{lineno}")))
    if not raw:
        raise ConversionError(f"file list {list_path} lists no image files")
    items, class_list = _resolve_labels(raw, classes, list_path)
    return Source(_limit_per_class(items, limit), class_list, "filelist", str(base.absolute()),
                  rejected, str(list_path.absolute()))


# ----------------------------------------------------------------------------- command line


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where X tells the reader something: not after flags (False)
    or options whose absence means "not used" (None), nor where the help states it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The input options both converters share."""
    g = parser.add_argument_group("input")
    g.add_argument("--src", help="ImageFolder root (<src>/<class>/<image>), a flat image folder "
                                 "with --labels, or the root of --file-list's relative paths")
    g.add_argument("--labels", help="labels for a flat --src: one label per line in sorted "
                                    "file-name order, or 'filename,label' CSV lines")
    g.add_argument("--file-list", help="'path label' lines, in output order")
    g.add_argument("--classes", help="class mapping to reuse (e.g. train's classes.json for val); "
                                     "default: sorted class folder names / label names")
    g.add_argument("--limit", type=int, help="keep the first N images of each class (for trials)")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first bad file instead of skipping and reporting it")


def source_from_args(args: argparse.Namespace) -> Source:
    """Build the :class:`Source` the options describe, or raise a one-line ConversionError."""
    if args.limit is not None and args.limit < 1:
        raise ConversionError(f"--limit must be >= 1, got {args.limit}")
    classes = read_classes(args.classes) if args.classes else None
    if args.file_list:
        if args.labels:
            raise ConversionError("--labels and --file-list are alternatives; pass one")
        if args.src and not Path(args.src).is_dir():
            raise ConversionError(f"--src {args.src} is not a folder")
        if not Path(args.file_list).is_file():
            raise ConversionError(f"--file-list {args.file_list} is not a file")
        source = list_file_list(args.file_list, root=args.src, classes=classes, limit=args.limit)
    else:
        if not args.src:
            raise ConversionError("pass --src (an ImageFolder or a flat folder with --labels) "
                                  "or --file-list")
        if not Path(args.src).is_dir():
            raise ConversionError(f"--src {args.src} is not a folder")
        if args.labels:
            source = list_flat_folder(args.src, args.labels, classes=classes, limit=args.limit)
        else:
            source = list_image_folder(args.src, classes=classes, limit=args.limit)
    if not source.items:
        raise ConversionError(f"no images found in {source.root} ({source.layout} layout; "
                              f"{len(source.rejected)} non-image files)")
    if args.strict and source.rejected:
        rel, reason = source.rejected[0]
        raise BadFileError(os.path.join(source.root, rel), reason)
    return source


# ----------------------------------------------------------------------------- images


class BadImage(Exception):
    """The file is not a usable image; the message is the reason for the report."""


@contextlib.contextmanager
def _open_regular(path: str) -> Iterator[io.BufferedReader]:
    """``path`` opened for reading if it is a regular file (raises BadImage).

    Opened non-blocking and checked with ``fstat`` before reading: a FIFO named ``.JPEG`` (in
    a file list, or swapped in after listing) would otherwise block the reader forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise BadImage(f"cannot read ({e.strerror or e})") from None
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadImage(f"not a regular file ({_kind(mode)})")
        try:
            yield f
        except OSError as e:
            raise BadImage(f"cannot read ({e.strerror or e})") from None


def read_file(path: str) -> bytes:
    """The bytes of the regular file ``path`` (raises BadImage)."""
    with _open_regular(path) as f:
        return f.read()


def probe_image(path: str) -> tuple[str | None, tuple[int, int]]:
    """``(None, (width, height))`` when ``path``'s header is an image's, else ``(reason, (0, 0))``.

    Reads only the header: what :func:`check_image` finds without decoding (unreadable, empty,
    not an image, no pixels), at a fraction of a decode's cost. Runs in worker processes.
    """
    try:
        with _open_regular(path) as f:
            return None, _header(f, os.fstat(f.fileno()).st_size).size
    except BadImage as e:
        return str(e), (0, 0)


@contextlib.contextmanager
def _pil_errors() -> Iterator[None]:
    """PIL's failures on bad data as BadImage, with the reasons the report shows."""
    with warnings.catch_warnings():
        # Odd EXIF blocks and large images warn; only failures to decode matter here.
        warnings.simplefilter("ignore")
        try:
            yield
        except Image.UnidentifiedImageError:
            raise BadImage("not an image (unrecognised format)") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            raise BadImage(f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def _header(f: Any, nbytes: int) -> Image.Image:
    """``Image.open`` of the ``nbytes`` bytes in ``f``: header read, pixels not decoded."""
    if nbytes == 0:
        raise BadImage("empty file (0 bytes)")
    with _pil_errors():
        image = Image.open(f)
    if image.width < 1 or image.height < 1:
        raise BadImage(f"image has no pixels ({image.width}x{image.height})")
    return image


def read_header(data: bytes) -> Image.Image:
    """The PIL image of ``data`` with its header read and its pixels not decoded (raises
    BadImage: empty, not an image, no pixels)."""
    return _header(io.BytesIO(data), len(data))


def decode_image(data: bytes) -> Image.Image:
    """Fully decode ``data`` (the corruption check) and return the loaded PIL image.

    Raises:
        BadImage: empty, not an image, truncated or corrupt.
    """
    image = read_header(data)
    with _pil_errors():
        image.load()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by fastsiam's one rule (:func:`fastsiam.imageio.to_rgb`: 16-bit and float
    images rescaled, not clipped); an image without an 8-bit form raises BadImage."""
    try:
        return imageio.to_rgb(image)
    except imageio.UnsupportedImage as e:
        raise BadImage(str(e)) from None


def load_rgb(path: str) -> np.ndarray:
    """Read, check and decode one file to a ``uint8 [H, W, 3]`` array (raises BadImage)."""
    return np.asarray(to_rgb(decode_image(read_file(path))))


def check_image(path: str) -> tuple[str | None, tuple[int, int]]:
    """``(None, (width, height))`` when ``path`` decodes to RGB, else ``(reason, (0, 0))``.

    Runs in worker processes.
    """
    try:
        image = decode_image(read_file(path))
        to_rgb(image)
    except BadImage as e:
        return str(e), (0, 0)
    return None, image.size


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def verify_indices(n: int, k: int) -> list[int]:
    """``k`` evenly spread sample indices out of ``n`` (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


# ----------------------------------------------------------------------------- reports


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


# ----------------------------------------------------------------------------- parallelism


def _apply_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(x) for x in chunk]


def start_method() -> str:
    """``fork`` while this process runs a single Python thread, else ``spawn``.

    Forked workers start in milliseconds and need no re-imports; forking while other threads
    run (a progress bar's monitor, DALI's Python workers) can deadlock the child, so then the
    workers are spawned (fresh interpreters: ~0.2-0.5 s each to import numpy and PIL).
    """
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int,
                 chunksize: int = 16, window: int | None = None,
                 inline: bool = True) -> Iterator[Any]:
    """``map(fn, items)`` over ``workers`` processes, results in input order.

    The worker processes start right away (create the map before a progress bar, whose
    monitor thread would rule out ``fork``; see :func:`start_method`). At most ``window``
    chunks (default ``4 * workers``) are in flight, so memory stays bounded when the consumer
    (a writer) is slower than the workers; results never depend on timing. ``workers == 1``
    runs in this process unless ``inline`` is False. ``fn`` must be picklable (a module-level function or a
    ``functools.partial`` of one).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 and inline:
        return (fn(x) for x in items)
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method()))
    executor.submit(os.getpid).result()  # launches every worker now
    results = _ordered(executor, fn, items, chunksize, window or 4 * workers)
    next(results)  # inside its try: closing it now shuts the pool down even before a result
    return results


def _ordered(executor: ProcessPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any],
             chunksize: int, window: int) -> Iterator[Any]:
    pending: deque = deque()
    try:
        yield  # the priming step of parallel_map
        chunk: list[Any] = []
        for x in items:
            chunk.append(x)
            if len(chunk) == chunksize:
                pending.append(executor.submit(_apply_chunk, fn, chunk))
                chunk = []
                if len(pending) >= window:
                    yield from pending.popleft().result()
        if chunk:
            pending.append(executor.submit(_apply_chunk, fn, chunk))
        while pending:
            yield from pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def progress(total: int, desc: str, quiet: bool = False):
    """A progress bar showing images/s and the ETA (tqdm, on stderr)."""
    from tqdm import tqdm

    class Bar(tqdm):
        # No monitor thread: it outlives the bar, and a second thread rules out forking
        # the next worker pool (start_method); the bar is updated for every image anyway.
        monitor_interval = 0

    return Bar(total=total, desc=desc, unit="img", disable=quiet, mininterval=0.5,
               dynamic_ncols=True, smoothing=0.1)


def make_readable(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Give output files the usual permissions (0666 minus the umask).

    Files written through ``fastsiam.files.atomic_path`` start as private ``mkstemp`` files
    (0600); a dataset is meant to be read by other users and jobs.
    """
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)


def injected_delay() -> float:
    """Seconds to sleep per written sample (only tests set it, see ``TEST_DELAY_ENV``)."""
    return float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
