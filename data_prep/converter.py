"""What both converters' command lines share: the input options, option checks, the output.

:func:`add_source_arguments` and :func:`source_from_args` turn ``--src``, ``--labels``,
``--file-list``, ``--classes``, ``--limit`` and ``--strict`` into a listed
:class:`~data_prep.listing.Source`; :func:`check_options` refuses bad shared options and an
existing output; :func:`output_lock` keeps two conversions off one output; the outputs are
made readable to other users once written (:func:`make_readable`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from data_prep.errors import BadFileError, ConversionError, write_error
from data_prep.listing import (
    Source,
    list_file_list,
    list_flat_folder,
    list_image_folder,
    read_classes,
)
from data_prep.reports import shown


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


def make_readable(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Give output files the usual permissions (0666 minus the umask).

    Files written through ``fastsiam.files.atomic_path`` start as private ``mkstemp`` files
    (0600); a dataset is meant to be read by other users and jobs.
    """
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)
