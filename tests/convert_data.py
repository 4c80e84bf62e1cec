"""Test data for the converter tests: the toy ImageNet with planted bad files, and the reference.

The reference listing is torchvision's ImageFolder (``allow_empty=True``: an empty class folder
keeps its index) minus the planted bad files, which the converters must skip and report.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

EMPTY_CLASS = "n00000001"  # sorts first: every real class index shifts by one


def plant_bad_files(toy_root: Path, dst: Path) -> dict[str, str]:
    """Copy the toy train split to ``dst`` and plant bad files; returns {kind: relative path}."""
    shutil.copytree(toy_root / "train", dst)
    classes = sorted(p.name for p in dst.iterdir())
    quirks = {q: set(v) for q, v in json.loads((toy_root / "toy_imagenet.json").read_text())["quirks"].items()}
    odd = {Path(p).name for paths in quirks.values() for p in paths}
    donor = next(p for p in sorted((dst / classes[0]).iterdir()) if p.name not in odd)
    data = donor.read_bytes()
    bad = {
        "truncated": f"{classes[0]}/zz_truncated.JPEG",
        "empty": f"{classes[1]}/zz_empty.JPEG",
        "text": f"{classes[2]}/notes.txt",
        "garbage": f"{classes[3]}/zz_garbage.JPEG",
    }
    (dst / bad["truncated"]).write_bytes(data[: len(data) * 6 // 10])
    (dst / bad["empty"]).write_bytes(b"")
    (dst / bad["text"]).write_text("not an image\n")
    (dst / bad["garbage"]).write_bytes(b"this is not a JPEG file " * 8)
    (dst / EMPTY_CLASS).mkdir()
    return bad


def imagefolder_reference(root: Path, bad: dict[str, str]) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """torchvision ImageFolder's (path, label) list without the bad files, and its class_to_idx."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root), allow_empty=True)
    skip = {os.path.normpath(root / rel) for rel in bad.values()}
    samples = [(p, y) for p, y in folder.samples if os.path.normpath(p) not in skip]
    return samples, folder.class_to_idx


def quirk_paths(toy_root: Path) -> dict[str, list[str]]:
    """Train-split quirky files by kind, relative to the train folder."""
    quirks = json.loads((toy_root / "toy_imagenet.json").read_text())["quirks"]
    return {q: [p.split("/", 1)[1] for p in paths if p.startswith("train/")] for q, paths in quirks.items()}
