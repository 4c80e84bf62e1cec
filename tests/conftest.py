"""Shared fixtures: the toy ImageNet (made once per session) and the CUDA marker's skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One intra-op thread: on a small shared CPU, OpenMP's spinning threads oversubscribe the cores
# (loader workers, other processes) and a 0.1 ms op can take 50 ms. Tests are small anyway.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy ImageNet (4 classes x 12 train / 4 val images, with the quirky files).

    Layout: ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``. Read-only for
    tests: copy it before planting bad files.
    """
    from data_prep.make_toy_imagenet import make_toy_imagenet

    root = tmp_path_factory.mktemp("toy_imagenet")
    make_toy_imagenet(root, num_classes=4, train_per_class=12, val_per_class=4, seed=0,
                      min_side=64, max_side=160)
    return root
