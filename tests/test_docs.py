"""The README and docs say what is true: the files they cite exist, the Python example runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines()]


def test_docs_and_code_cite_only_documents_the_project_has() -> None:
    tracked = _tracked_files()
    names = {p.name for p in tracked}
    cited = re.compile(r"\b([\w-]+\.md)\b")
    missing = set()
    for path in tracked:
        # tests make up file names of their own
        if path.suffix in (".md", ".py", ".sh", ".yaml") and path.is_file() and path.parts[len(REPO.parts)] != "tests":
            missing |= {(path.relative_to(REPO).as_posix(), m) for m in cited.findall(path.read_text())
                        if m not in names}
    assert not missing, sorted(missing)


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_python_example_runs_as_written(toy_imagenet: Path, tmp_path: Path) -> None:
    """In a folder holding what ``make demo`` and the README's linear command leave (weights
    untrained here: the example's calls and paths are what is tested)."""
    from fastsiam.api import build_model, resolve
    from fastsiam.weights import save_linear_checkpoint

    code = _readme_python()
    (tmp_path / "configs").symlink_to(REPO / "configs")
    demo, _, _ = resolve(str(REPO / "configs" / "simsiam_resnet18_toy-demo.yaml"))
    ckpt = tmp_path / "work_dirs" / "toy_demo" / "epoch_0024.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": build_model(demo, "pretrain").state_dict(), "config": demo.to_dict(), "epoch": 24}, ckpt)
    classes = sorted(p.name for p in (toy_imagenet / "train").iterdir())
    linear, _, _ = resolve(str(REPO / "configs" / "simsiam_resnet18_toy-demo-linear.yaml"))
    linear.model.num_classes = len(classes)
    clf = build_model(linear, "linear")
    save_linear_checkpoint(tmp_path / "work_dirs" / "simsiam_resnet18_toy-demo-linear" / "last.pt", clf,
                           config=linear.to_dict(), classes=classes, top1=None, top5=None, epoch=10)
    image = re.search(r'"(data/toy_imagenet/val/[^"]+)"', code)
    assert image is not None
    (tmp_path / image[1]).parent.mkdir(parents=True)
    shutil.copy(sorted((toy_imagenet / "val").glob("*/*.JPEG"))[0], tmp_path / image[1])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    name, score = proc.stdout.split()
    assert name in classes and 0 < float(score) <= 1
