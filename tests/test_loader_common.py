"""Pieces shared by the loader backends (crop boxes, JPEG headers, batched resize), the
synthetic and pil backends' contract, and build_loader's errors."""

from __future__ import annotations

import io
import math
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from loader_helpers import PER_TRAIN_BATCH, SIZE, assert_same, check_contract, epoch_tensors
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from fastsiam.data import TwoViewBatch, build_loader
from fastsiam.data.crops import (
    center_crop_boxes,
    epoch_key,
    eval_crop_fraction,
    random_crop_boxes,
    sample_keys,
    scalar_kernels,
    uniforms,
)
from fastsiam.data.jpeg import JPEGHeaderError, jpeg_size
from fastsiam.data.resample import crop_resize

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


# ----------------------------------------------------------------------------- crop boxes


def test_uniforms_are_uniform_and_keys_independent():
    u = uniforms(sample_keys(0, 0, np.arange(20000), 0), 4)
    assert u.min() >= 0 and u.max() < 1
    # Mean 1/2 and variance 1/12 within a few standard errors; draws uncorrelated.
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    a, b = sample_keys(0, 0, [5], 0), sample_keys(0, 0, [5], 1)
    c, d = sample_keys(0, 1, [5], 0), sample_keys(1, 0, [5], 0)
    assert len({int(x[0]) for x in (a, b, c, d)}) == 4


def test_boxes_follow_torchvision_distribution():
    """Same distribution as torchvision's RandomResizedCrop.get_params (two-sample checks)."""
    h, w, n = 300, 400, 4000
    ours = random_crop_boxes(sample_keys(3, 0, np.arange(n), 0), [h] * n, [w] * n, SCALE, RATIO)
    torch.manual_seed(0)
    img = torch.empty(3, h, w)
    ref = np.array([RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(n)])
    for col in range(4):
        a, b = np.sort(ours[:, col]), np.sort(ref[:, col])
        # Kolmogorov-Smirnov statistic; 1.95 * sqrt(2/n) is the 0.1% critical value.
        grid = np.union1d(a, b)
        ks = np.abs(np.searchsorted(a, grid, "right") - np.searchsorted(b, grid, "right")).max() / n
        assert ks < 1.95 * math.sqrt(2 / n), (col, ks)
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    area = ours[:, 2] * ours[:, 3] / (h * w)
    assert area.min() >= 0.19 and area.max() <= 1.0


def test_fallback_is_torchvisions_central_crop():
    # A 1000x10 strip admits no box with ratio in [3/4, 4/3] and area >= 20%: the fallback.
    boxes = random_crop_boxes(sample_keys(0, 0, range(5), 0), [1000] * 5, [10] * 5, SCALE, RATIO)
    assert (boxes == [(1000 - 13) // 2, 0, 13, 10]).all()  # h = round(10 / (3/4))
    boxes = random_crop_boxes(sample_keys(0, 0, range(5), 0), [10] * 5, [1000] * 5, SCALE, RATIO)
    assert (boxes == [0, (1000 - 13) // 2, 10, 13]).all()  # w = round(10 * 4/3)


def test_numba_kernels_equal_numpy():
    """The FFCV decoder's compiled kernels and the vectorized numpy version agree exactly."""
    numba = pytest.importorskip("numba")
    step, crop_box = scalar_kernels(numba.njit)

    @numba.njit
    def boxes(ek, idx, hs, ws, view, s_lo, s_hi, l_lo, l_hi, r_lo, r_hi):
        out = np.empty((len(idx), 4), np.int64)
        for k in range(len(idx)):
            key = step(step(ek, np.uint64(idx[k])), np.uint64(view))
            out[k] = crop_box(key, hs[k], ws[k], s_lo, s_hi, l_lo, l_hi, r_lo, r_hi)
        return out

    rng = np.random.default_rng(0)
    n = 3000
    idx, hs, ws = rng.integers(0, 10**7, n), rng.integers(1, 700, n), rng.integers(1, 700, n)
    for scale, ratio in ((SCALE, RATIO), ((0.9, 1.0), (2.0, 3.0))):
        expect = random_crop_boxes(sample_keys(9, 4, idx, 1), hs, ws, scale, ratio)
        logs = (math.log(ratio[0]), math.log(ratio[1]))
        got = boxes(epoch_key(9, 4), idx, hs, ws, 1, *scale, *logs, min(ratio), max(ratio))
        assert (got == expect).all()


def test_center_box_is_resize_then_center_crop_region():
    """resize(short side -> S/0.875) + center_crop(S) covers the central square of side
    short * S / round(S / 0.875); the integer box is that square to within a pixel."""
    for h, w in ((375, 500), (500, 333), (64, 64), (100, 37)):
        top, left, side, side2 = center_crop_boxes([h], [w], 224)[0]
        exact = min(h, w) * eval_crop_fraction(224)
        assert side == side2 and exact - 1 < side <= exact
        assert abs(top - (h - exact) / 2) <= 1 and abs(left - (w - exact) / 2) <= 1


# ----------------------------------------------------------------------------- JPEG, resize


def _jpeg(h: int, w: int, **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "JPEG", **save)
    return buf.getvalue()


def test_jpeg_size_reads_the_frame_header():
    assert jpeg_size(_jpeg(37, 61)) == (37, 61)
    assert jpeg_size(_jpeg(300, 20, progressive=True)) == (300, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: an APP1 segment before the frame
    assert jpeg_size(_jpeg(50, 70, exif=exif.tobytes())) == (50, 70)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with pytest.raises(JPEGHeaderError, match=r"x\.png: not a JPEG"):
        jpeg_size(buf.getvalue(), "x.png")
    with pytest.raises(JPEGHeaderError, match="no JPEG frame header"):
        jpeg_size(_jpeg(10, 10)[:20])


def test_batched_crop_resize_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    images = []
    for h, w in ((50, 80), (120, 90), (33, 33), (300, 200)):
        base = torch.rand(3, h // 4 + 2, w // 4 + 2, generator=g)[None]
        smooth = torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic")[0]
        images.append((smooth.clamp(0, 1) * 255).round().to(torch.uint8))
    source = np.array([0, 0, 1, 1, 2, 3, 3, 2])
    boxes = np.array([
        [0, 0, 50, 80], [10, 20, 30, 40], [5, 5, 100, 60], [0, 0, 12, 9],
        [1, 2, 30, 31], [17, 3, 250, 190], [100, 100, 40, 50], [0, 0, 33, 33],
    ])  # fmt: skip
    for budget in (1 << 24, 5000):  # one chunk, or one crop per chunk
        out = crop_resize(images, source, boxes, SIZE, budget=budget)
        assert out.shape == (8, SIZE, SIZE, 3) and out.dtype == torch.uint8
        for k, (s, box) in enumerate(zip(source, boxes)):
            ref = TF.resized_crop(images[s], *(int(x) for x in box), [SIZE, SIZE], antialias=True)
            assert (out[k].permute(2, 0, 1).int() - ref.int()).abs().max() <= 1


# ----------------------------------------------------------------------------- the batch


def test_two_view_batch_holds_both_views_in_one_tensor():
    u8 = torch.randint(0, 256, (6, 3, 4, 5), dtype=torch.uint8)
    u8 = u8.contiguous(memory_format=torch.channels_last)
    label = torch.arange(3)
    batch = TwoViewBatch(u8, label)
    # view1 / view2 are the halves of views, not copies, and stay channels_last.
    assert batch.view1.data_ptr() == u8.data_ptr() and batch.view2.data_ptr() == u8[3:].data_ptr()
    assert batch.view1.shape == batch.view2.shape == (3, 3, 4, 5)
    halves = (batch.view1, batch.view2)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in halves)
    pair = TwoViewBatch.from_pair(u8[:3], u8[3:], label)
    assert torch.equal(pair.views, u8)
    assert pair.views.is_contiguous(memory_format=torch.channels_last)
    moved = TwoViewBatch(u8.contiguous(), label).to("cpu")
    assert moved.views.is_contiguous(memory_format=torch.channels_last)
    for views, labels in ((u8[:5], label), (u8[0], label), (u8, label[:2]), (u8, label[:, None])):
        with pytest.raises(ValueError, match=r"expected views \[2B, C, H, W\]"):
            TwoViewBatch(views, labels)


# ----------------------------------------------------------------------------- synthetic, pil


def test_synthetic_contract_and_resume():
    kw = dict(batch_size=4, image_size=SIZE, workers=0, device="cpu", num_samples=40, num_classes=7)
    loader = build_loader("synthetic", "", seed=1, **kw)
    assert len(loader) == 10 and loader.num_classes == 7
    batches = list(loader)
    check_contract(batches[0], 4)
    assert not torch.equal(batches[0].view1, batches[0].view2)
    assert all(0 <= y < 7 for b in batches for y in b.label.tolist())
    full = [t for b in batches for t in b]
    again = build_loader("synthetic", "", seed=1, **kw)
    again.load_state_dict({"epoch": 0, "start_batch": 6})
    assert_same(full[6 * PER_TRAIN_BATCH :], epoch_tensors(again))
    again.set_epoch(1)
    assert not torch.equal(full[0], next(iter(again)).views)
    val = build_loader("synthetic", "", split="val", drop_last=False, **kw)
    check_contract(next(iter(val)), 4)


def test_pil_crop_mode_contract(toy_imagenet):
    from torchvision.datasets import ImageFolder

    targets = ImageFolder(str(toy_imagenet / "train")).targets
    loader = build_loader(
        "pil", toy_imagenet / "train", batch_size=8, image_size=SIZE, workers=0, augment="crop"
    )
    batch = next(iter(loader))
    check_contract(batch, 8)
    order = loader.sampler.rank_indices()[:8].tolist()
    assert batch.label.tolist() == [targets[i] for i in order]
    for k, i in enumerate(order):  # every first view, then every second view
        first, second, *_ = loader.dataset[(i, 0)]
        assert torch.equal(batch.view1[k], first) and torch.equal(batch.view2[k], second)


# ----------------------------------------------------------------------------- errors


def test_build_loader_errors(tmp_path):
    kw = dict(batch_size=2, image_size=SIZE, workers=0)
    with pytest.raises(
        ValueError, match="unknown loader backend 'ffvc'; expected one of dali, ffcv"
    ):
        build_loader("ffvc", tmp_path, **kw)
    with pytest.raises(FileNotFoundError, match=r"nvjpeg loader: data path .*nope does not exist"):
        build_loader("nvjpeg", tmp_path / "nope", **kw)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        build_loader("synthetic", "", split="test", **kw)


@pytest.mark.parametrize(
    ("backend", "module", "library", "hint"),
    [
        ("ffcv", "fastsiam.data.ffcv_loader", "ffcv", "pip install 'fastsiam\\[ffcv\\]'"),
        ("dali", "fastsiam.data.dali_loader", "nvidia.dali", "pip install 'fastsiam\\[dali\\]'"),
    ],
)
def test_missing_library_gives_the_install_hint(
    backend, module, library, hint, tmp_path, monkeypatch
):
    monkeypatch.delitem(sys.modules, module, raising=False)
    # None makes `import <library>` fail; its submodules too, which an earlier test in this
    # process may have imported (`import nvidia.dali.fn` would find those cached).
    for name in [m for m in sys.modules if m == library or m.startswith(f"{library}.")] or [library]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=f"backend '{backend}' needs {library}.*{hint}"):
        build_loader(backend, tmp_path, batch_size=2, workers=0)


@pytest.mark.cuda
def test_batched_crop_resize_on_the_gpu():
    """float16 tensor-core products: within a level or two of torchvision on the CPU."""
    g = torch.Generator().manual_seed(1)
    images = [
        torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        for h, w in ((64, 90), (200, 150))
    ]
    images = [TF.gaussian_blur(im, [5, 5]) for im in images]  # smooth, like photographs
    source, boxes = (
        np.array([0, 1, 1]),
        np.array([[0, 0, 64, 90], [10, 5, 150, 120], [3, 3, 20, 25]]),
    )
    out = crop_resize([im.cuda() for im in images], source, boxes, SIZE).cpu()
    for k, (s, box) in enumerate(zip(source, boxes)):
        ref = TF.resized_crop(images[s], *(int(x) for x in box), [SIZE, SIZE], antialias=True)
        assert (out[k].permute(2, 0, 1).int() - ref.int()).abs().max() <= 2


@pytest.mark.cuda
def test_synthetic_on_the_gpu():
    loader = build_loader(
        "synthetic", "", batch_size=4, image_size=SIZE, workers=0, device="cuda", num_samples=8
    )
    batch = next(iter(loader))
    assert batch.view1.device.type == "cuda" and batch.view1.dtype == torch.uint8
    assert batch.view1.is_contiguous(memory_format=torch.channels_last)


def test_config_built_synthetic_loader_needs_no_path():
    from fastsiam.config import DataConfig
    from fastsiam.data import build_loader_from_config

    cfg = DataConfig(
        backend="synthetic", batch_size=4, image_size=16, workers=0, options={"num_samples": 8}
    )
    assert next(iter(build_loader_from_config(cfg))).view1.shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match=r"config key 'data\.train_path' is empty"):
        build_loader_from_config(DataConfig(backend="nvjpeg"))
