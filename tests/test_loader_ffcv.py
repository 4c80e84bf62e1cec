"""The ffcv backend: contract, crops against torchvision, order, sharding, resume, errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

# FFCV compiles fresh numba dispatchers per loader; when one with literal-typed arguments is
# collected, numba's finalizer raises a KeyError (stock FFCV loaders do the same).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from loader_helpers import (  # noqa: E402
    PER_TRAIN_BATCH,
    SIZE,
    assert_same,
    check_contract,
    epoch_tensors,
    folder_images,
    mean_abs,
    reference_center,
    view_errors,
    write_beton,
)

from fastsiam.data import build_loader  # noqa: E402

SEED, B = 7, 8


@pytest.fixture(scope="module")
def betons(toy_imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("beton")
    return {
        split: write_beton(toy_imagenet / split, out / f"{split}.beton")
        for split in ("train", "val")
    }


@pytest.fixture(scope="module")
def sources(toy_imagenet):
    return {split: folder_images(toy_imagenet / split) for split in ("train", "val")}


def ffcv(path, **kw):
    args = dict(batch_size=B, image_size=SIZE, workers=1, device="cpu", seed=SEED)
    return build_loader("ffcv", path, **{**args, **kw})


@pytest.fixture(scope="module")
def train_loader(betons):
    return ffcv(betons["train"])


def test_contract_crops_and_labels(train_loader, sources, toy_imagenet):
    images, labels = sources["train"]
    loader = train_loader
    loader.set_epoch(3)
    order = loader.sampler.rank_indices().tolist()
    batches = list(loader)
    assert len(batches) == len(loader) == len(images) // B
    assert loader.num_classes == 4
    assert loader.classes == sorted(p.name for p in (toy_imagenet / "train").iterdir())
    right, wrong = [], []
    for b, batch in enumerate(batches):
        check_contract(batch, B)
        indices = order[b * B : (b + 1) * B]
        assert batch.label.tolist() == [labels[i] for i in indices]
        assert not any(torch.equal(x, y) for x, y in zip(batch.view1, batch.view2))
        r, w = view_errors(batch, indices, images, SEED, 3)
        right += r
        wrong += w
    # The .beton holds JPEG re-encodings of the sources and FFCV resizes with OpenCV's
    # INTER_AREA: a few levels of difference; a wrong sample or box is an order more.
    assert max(right) < 5, max(right)
    assert min(wrong) > 15, min(wrong)
    # Every sample exactly once per epoch (drop_last cuts none here: 48 = 6 x 8).
    assert sorted(order) == list(range(len(images)))


def test_epochs_differ_and_repeat(train_loader, betons):
    train_loader.set_epoch(0)
    first = epoch_tensors(train_loader)
    again = ffcv(betons["train"])
    again.set_epoch(0)
    assert_same(first, epoch_tensors(again))
    again.set_epoch(1)
    second = epoch_tensors(again)
    assert not torch.equal(first[0], second[0])


def test_threads_and_copies_do_not_change_the_batches(train_loader, betons):
    train_loader.set_epoch(2)
    one = epoch_tensors(train_loader)
    two = ffcv(betons["train"], workers=2, copy=False)
    two.set_epoch(2)
    assert_same(one, epoch_tensors(two))  # each batch cloned as soon as it arrives


def test_kept_batches_stay_as_handed_out(train_loader):
    # copy=True: batches (or views of them) a consumer keeps never change, although FFCV
    # refills its own buffers a few batches later.
    train_loader.set_epoch(3)
    reference = epoch_tensors(train_loader)  # each batch cloned as it arrives
    kept = [batch.view1 if k % 4 == 0 else batch
            for k, batch in enumerate(train_loader) if k % 2 == 0]
    assert len(kept) >= 3
    for j, held in enumerate(kept):
        k = 2 * j
        expected = reference[PER_TRAIN_BATCH * k] if k % 4 else reference[PER_TRAIN_BATCH * k][: B]
        assert torch.equal(held.views if k % 4 else held, expected)


def test_mid_epoch_resume(train_loader, betons):
    train_loader.set_epoch(5)
    full = epoch_tensors(train_loader)
    it = iter(train_loader)
    next(it), next(it)
    state = train_loader.state_dict()
    del it
    assert state == {"epoch": 5, "start_batch": 2}
    resumed = ffcv(betons["train"])
    resumed.load_state_dict(state)
    rest = epoch_tensors(resumed)
    assert_same(full[2 * PER_TRAIN_BATCH :], rest)
    assert len(resumed) == len(train_loader)


def test_two_ranks_split_the_epoch(betons, sources):
    images, labels = sources["train"]
    seen = collections.Counter()
    for rank in (0, 1):
        loader = ffcv(betons["train"], rank=rank, world_size=2, batch_size=4, drop_last=False)
        loader.set_epoch(1)
        order = loader.sampler.rank_indices().tolist()
        got = [t for batch in loader for t in batch.label.tolist()]
        assert got == [labels[i] for i in order]
        seen.update(order)
    assert seen == collections.Counter(range(len(images)))


def test_val_center_crops(betons, sources):
    images, labels = sources["val"]
    loader = ffcv(betons["val"], split="val", batch_size=6, drop_last=False)
    batches = list(loader)
    assert [len(b.label) for b in batches] == [6, 6, 4]
    check_contract(batches[0], 6)
    views = torch.cat([b.view for b in batches])
    assert torch.cat([b.label for b in batches]).tolist() == labels
    errors = [mean_abs(v, reference_center(im)) for v, im in zip(views, images)]
    assert max(errors) < 3, errors


def test_quasi_random_order_resumes(betons):
    loader = ffcv(betons["train"], order="quasi_random", os_cache=False)
    loader.set_epoch(1)
    full = epoch_tensors(loader)
    labels = torch.cat(full[1::PER_TRAIN_BATCH]).tolist()
    assert sorted(labels) == sorted(np.repeat(range(4), 12).tolist())
    loader.load_state_dict({"epoch": 1, "start_batch": 4})
    assert_same(full[4 * PER_TRAIN_BATCH :], epoch_tensors(loader))


def test_errors(betons, tmp_path):
    with pytest.raises(ValueError, match=r"quasi_random.*world_size=2"):
        ffcv(betons["train"], order="quasi_random", world_size=2)
    with pytest.raises(ValueError, match=r"ffcv loader: 'data\.options\.order' must be one of random, quasi_random, got 'sequential'"):
        ffcv(betons["train"], order="sequential")
    with pytest.raises(ValueError, match=r"is a directory; expected an FFCV \.beton"):
        ffcv(tmp_path)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton at all" * 10)
    with pytest.raises(ValueError, match=r"is not an FFCV \.beton file"):
        ffcv(junk)
    with pytest.raises(ValueError, match=r"expected an RGBImageField 'img'"):
        ffcv(betons["train"], image_field="img")
