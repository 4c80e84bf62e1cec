"""Listing a converter's input: which images exist, in which order, with which labels.

``to_ffcv.py`` and ``to_dali.py`` read the same three kinds of input and must agree on them:

- an ImageFolder tree ``<src>/<class>/**/<image>``, with class indices exactly as
  ``torchvision.datasets.ImageFolder`` assigns them (sorted folder names, files sorted in
  ``os.walk`` order, torchvision's image extensions);
- a flat folder (ImageNet's validation set) plus a labels file: one label per line in sorted
  file-name order, or ``filename,label`` CSV lines;
- a file list: ``path label`` lines, in the listed order.

A label is a class index or a class name; ``--classes classes.json`` pins the mapping (reuse
train's for val). Listing follows symbolic links but visits each real folder once, and reports
what it cannot use instead of dropping it: link loops, unreadable folders, FIFOs and other
files that are not regular files (:attr:`Source.rejected`). Whether each listed image decodes
is :mod:`data_prep.images`' question.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.errors import ConversionError, file_kind
from data_prep.reports import shown

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder considers images.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


def _irregular(entry: os.DirEntry) -> str:
    """Why an entry that is neither a folder nor a regular file cannot be an image.

    Opening a FIFO for reading waits for a writer forever; devices and sockets are no images.
    """
    try:
        mode = entry.stat().st_mode
    except OSError:
        return "not a regular file (a broken symbolic link)"
    return f"not a regular file ({file_kind(mode)})"


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
