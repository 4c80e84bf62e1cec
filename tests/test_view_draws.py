"""The augmentation's per-view draws carried by the batch (TwoViewBatch.draws): a function of
(seed, epoch, sample, view) alone on every backend that carries them, so a sample lands in
any batch, rank or world size with the same crop and the same flip, jitter, grey, blur and
solarize; and the augmentation uses them instead of its generator."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from loader_helpers import SIZE, write_beton, write_shards

from fastsiam.augment import DRAW_COLUMNS, SimSiamAugment
from fastsiam.data import TwoViewBatch, build_loader
from fastsiam.data.crops import sample_keys, uniforms, view_uniforms

SEED, EPOCH = 5, 2


def test_view_uniforms_are_a_function_of_the_sample_and_view_alone() -> None:
    u = view_uniforms(SEED, EPOCH, [7, 3, 11], DRAW_COLUMNS)
    assert u.shape == (6, DRAW_COLUMNS) and u.dtype == np.float32
    assert u.min() >= 0.0 and u.max() < 1.0
    alone = view_uniforms(SEED, EPOCH, [3], DRAW_COLUMNS)  # sample 3 in a batch of its own
    assert np.array_equal(alone, u[[1, 4]])  # view-major: row 1 its first view, row 4 its second
    assert not np.array_equal(u[1], u[4])  # the two views draw apart
    assert not np.array_equal(view_uniforms(SEED, EPOCH + 1, [3], DRAW_COLUMNS), alone)
    # their own stream: not the crop boxes' draws of the same key
    assert not np.allclose(uniforms(sample_keys(SEED, EPOCH, [3], 0), DRAW_COLUMNS)[0], alone[0], atol=1e-6)
    # and uniform: 20,000 draws per column within 4 sigma of the uniform's mean and spread
    many = view_uniforms(SEED, EPOCH, np.arange(10_000), DRAW_COLUMNS).astype(np.float64)
    assert np.abs(many.mean(axis=0) - 0.5).max() < 4 * np.sqrt(1 / 12 / 20_000)
    assert np.abs(many.var(axis=0) - 1 / 12).max() < 0.005


def _rows_by_sample(loader, batches: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """``(sample, view) -> (crop, draws)`` over the first ``batches`` batches of epoch EPOCH."""
    loader.set_epoch(EPOCH)
    order = loader.sampler.rank_indices().tolist()
    b = loader.sampler.batch_size
    rows = {}
    for k, batch in zip(range(batches), loader):
        for j, index in enumerate(order[k * b:(k + 1) * b]):
            for v in (0, 1):
                rows[(index, v)] = (batch.views[v * b + j].clone(), batch.draws[v * b + j].clone())
    return rows


@pytest.fixture(scope="module")
def data(toy_imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("draws")
    shards = write_shards(toy_imagenet / "train", out / "shards")
    found = {"pil": (toy_imagenet / "train", {"augment": "crop"}), "nvjpeg": (shards, {})}
    if importlib.util.find_spec("nvidia.dali") is not None:  # optional backends
        found["dali"] = (shards, {"reader": "index"})
    if importlib.util.find_spec("ffcv") is not None:
        found["ffcv"] = (write_beton(toy_imagenet / "train", out / "train.beton"), {})
    return found


@pytest.mark.parametrize("backend", ["pil", "ffcv", "nvjpeg", "dali"])
def test_one_and_two_ranks_carry_the_same_crops_and_draws_per_sample(backend: str, data) -> None:
    if backend not in data:
        pytest.skip(f"{backend} is not installed")
    path, options = data[backend]
    kw = dict(image_size=SIZE, workers=1, seed=SEED, view_draws=DRAW_COLUMNS, **options)
    one = _rows_by_sample(build_loader(backend, path, batch_size=8, **kw), batches=2)
    two = {}
    for rank in (0, 1):
        two.update(_rows_by_sample(build_loader(backend, path, batch_size=4, rank=rank, world_size=2, **kw),
                                   batches=2))
    assert set(one) == set(two) and len(one) == 2 * 16
    for (index, view), (crop, draws) in one.items():
        assert torch.equal(crop, two[(index, view)][0]), (index, view)
        assert torch.equal(draws, two[(index, view)][1]), (index, view)
        want = view_uniforms(SEED, EPOCH, [index], DRAW_COLUMNS)[view]
        assert torch.equal(draws, torch.from_numpy(want))


@pytest.mark.parametrize("backend", ["pil", "nvjpeg"])
def test_no_draws_unless_asked_for(backend: str, data) -> None:
    path, options = data[backend]
    loader = build_loader(backend, path, batch_size=4, image_size=SIZE, workers=1, **options)
    assert next(iter(loader)).draws.shape == (8, 0)


def test_dalis_webdataset_reader_carries_none(data) -> None:
    """It picks its samples in DALI (a shuffling buffer): the host cannot know them."""
    if "dali" not in data:
        pytest.skip("dali is not installed")
    loader = build_loader("dali", data["dali"][0], batch_size=4, image_size=SIZE, workers=1,
                          view_draws=DRAW_COLUMNS, reader="webdataset", initial_fill=16)
    assert next(iter(loader)).draws.shape == (8, 0)


def test_the_pil_recipe_in_pil_carries_none(toy_imagenet) -> None:
    """augment=full hands over views the device no longer augments: nothing to draw."""
    loader = build_loader("pil", toy_imagenet / "train", batch_size=4, image_size=SIZE, workers=0,
                          view_draws=DRAW_COLUMNS)
    assert next(iter(loader)).draws.shape == (8, 0)


def test_the_augmentation_takes_the_batch_draws_and_no_generator() -> None:
    aug = SimSiamAugment(blur_kernel_size=5)
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8, generator=g)
    draws = torch.from_numpy(view_uniforms(SEED, EPOCH, [4, 9, 1], DRAW_COLUMNS))
    batch = TwoViewBatch(u8, torch.zeros(3, dtype=torch.long), draws)
    a = torch.cat(aug(batch, generator=torch.Generator().manual_seed(1)))
    b = torch.cat(aug(batch, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(a, b)  # the generator is not consulted
    want = aug._normalize(aug.apply(u8, aug.params_from(draws)), aug._constants(u8.device))
    assert torch.allclose(a, want, atol=1e-6)
    # a sample augmented inside another batch, at another position, comes out the same
    other = TwoViewBatch(u8[[2, 0, 5, 3]], torch.zeros(2, dtype=torch.long), draws[[2, 0, 5, 3]])
    c = torch.cat(aug(other))
    assert torch.allclose(c[[1, 0, 3, 2]], a[[0, 2, 3, 5]], atol=1e-6)
    with pytest.raises(ValueError, match=rf"expected uniforms \[N, {DRAW_COLUMNS}\]"):
        aug(TwoViewBatch(u8, torch.zeros(3, dtype=torch.long), torch.rand(6, 3)))


def test_a_batch_refuses_misshapen_draws() -> None:
    u8 = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"expected float32 draws \[2B, k\] = \[4, k\], got torch.float32 \[3, 14\]"):
        TwoViewBatch(u8, torch.zeros(2, dtype=torch.long), torch.rand(3, 14))
    assert TwoViewBatch(u8, torch.zeros(2, dtype=torch.long)).draws.shape == (4, 0)
