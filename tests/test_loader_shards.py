"""The shard backends, nvjpeg (torchvision, CPU here) and dali (CPU mode): contract, crops
against torchvision, order and coverage, sharding, determinism, resume, errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from loader_helpers import (
    PER_TRAIN_BATCH,
    SIZE,
    assert_same,
    check_contract,
    epoch_tensors,
    mean_abs,
    reference_center,
    shard_images,
    view_errors,
    write_shards,
)

from fastsiam.data import build_loader

SEED, B = 11, 8
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False

# (backend, options): every variant whose crop boxes come from fastsiam.data.crops.
INDEXED = [
    ("nvjpeg", {}),
    ("nvjpeg", {"resize": "batched"}),
    pytest.param("dali", {}, marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI")),
    pytest.param(
        "dali", {"decode": "twice"}, marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI")
    ),
]
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="DALI is not installed")


@pytest.fixture(scope="module")
def shards(toy_imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    # Shards of 16 samples: several tars, so reads cross shard boundaries.
    return {split: write_shards(toy_imagenet / split, out / split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def sources(shards):
    return {split: shard_images(root) for split, root in shards.items()}


def load(backend, path, **kw):
    args = dict(batch_size=B, image_size=SIZE, workers=2, device="cpu", seed=SEED)
    return build_loader(backend, path, **{**args, **kw})


@pytest.mark.parametrize(("backend", "options"), INDEXED)
def test_contract_crops_labels_and_coverage(backend, options, shards, sources):
    images, labels = sources["train"]
    loader = load(backend, shards["train"], **options)
    assert loader.num_classes == 4 and len(loader.classes) == 4
    loader.set_epoch(2)
    order = loader.sampler.rank_indices().tolist()
    batches = list(loader)
    assert len(batches) == len(loader) == len(images) // B
    right, wrong = [], []
    for b, batch in enumerate(batches):
        check_contract(batch, B)
        indices = order[b * B : (b + 1) * B]
        assert batch.label.tolist() == [labels[i] for i in indices]
        assert not any(torch.equal(x, y) for x, y in zip(batch.view1, batch.view2))
        r, w = view_errors(batch, indices, images, SEED, 2)
        right += r
        wrong += w
    # Same JPEG bytes as the reference, same boxes: only resampling differences remain.
    assert max(right) < 2, max(right)
    assert min(wrong) > 15, min(wrong)
    assert sorted(order) == list(range(len(images)))


@pytest.mark.parametrize(("backend", "options"), INDEXED)
def test_determinism_and_resume(backend, options, shards):
    a = load(backend, shards["train"], **options)
    a.set_epoch(4)
    full = epoch_tensors(a)
    b = load(backend, shards["train"], **options)
    b.set_epoch(4)
    it = iter(b)
    next(it)
    state = b.state_dict()
    del it
    assert state == {"epoch": 4, "start_batch": 1}
    c = load(backend, shards["train"], **options)
    c.load_state_dict(state)
    assert_same(full[PER_TRAIN_BATCH:], epoch_tensors(c))
    c.set_epoch(5)
    assert not torch.equal(full[0], epoch_tensors(c)[0])


@pytest.mark.parametrize("backend", ["nvjpeg", pytest.param("dali", marks=needs_dali)])
def test_two_ranks_split_the_epoch(backend, shards, sources):
    images, labels = sources["train"]
    seen = collections.Counter()
    for rank in (0, 1):
        loader = load(
            backend, shards["train"], rank=rank, world_size=2, batch_size=5, drop_last=False
        )
        loader.set_epoch(1)
        order = loader.sampler.rank_indices().tolist()
        batches = list(loader)
        assert [len(b.label) for b in batches] == [5, 5, 5, 5, 4]
        assert [t for b in batches for t in b.label.tolist()] == [labels[i] for i in order]
        right, _ = view_errors(batches[0], order[:5], images, SEED, 1)
        assert max(right) < 2
        seen.update(order)
    assert seen == collections.Counter(range(len(images)))


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("nvjpeg", {}),
        ("nvjpeg", {"resize": "batched"}),
        pytest.param("dali", {}, marks=needs_dali),
        pytest.param("dali", {"reader": "webdataset"}, marks=needs_dali),
    ],
)
def test_val_center_crops(backend, options, shards, sources):
    images, labels = sources["val"]
    loader = load(backend, shards["val"], split="val", batch_size=6, drop_last=False, **options)
    batches = list(loader)
    assert [len(b.label) for b in batches] == [6, 6, 4]
    check_contract(batches[0], 6)
    assert torch.cat([b.label for b in batches]).tolist() == labels
    views = torch.cat([b.view for b in batches])
    errors = [mean_abs(v, reference_center(im)) for v, im in zip(views, images)]
    assert max(errors) < 2, errors


@needs_dali
@pytest.mark.parametrize("n", [4, 3])
def test_dali_outputs_become_one_view_major_tensor(shards, n):
    """Both views' outputs are copied into the rows of one tensor, also when DALI padded its
    batch of 4 past the n real samples (the webdataset reader's pad_last_batch)."""
    from nvidia.dali.backend import TensorListCPU

    rng = np.random.default_rng(0)
    outputs = [rng.integers(0, 256, (4, 2, 3, 3), dtype=np.uint8) for _ in range(2)]
    views = load("dali", shards["train"])._to_torch([TensorListCPU(o) for o in outputs], n)
    expected = torch.from_numpy(np.concatenate([o[:n] for o in outputs])).permute(0, 3, 1, 2)
    assert torch.equal(views, expected)
    assert views.is_contiguous(memory_format=torch.channels_last)


@needs_dali
def test_dali_webdataset_reader(shards, sources):
    """DALI's own reader: shard_id/num_shards, a shuffle buffer, pad_last_batch."""
    _, labels = sources["train"]
    counts = collections.Counter(labels)
    for drop_last, per_rank in ((False, 10), (True, 8)):
        seen = collections.Counter()
        for rank in range(5):  # 48 samples over 5 ranks: shards of 9 or 10 samples
            loader = load(
                "dali",
                shards["train"],
                reader="webdataset",
                rank=rank,
                world_size=5,
                batch_size=4,
                drop_last=drop_last,
                initial_fill=16,
            )
            loader.set_epoch(3)
            batches = list(loader)
            assert len(batches) == len(loader)
            check_contract(batches[0], 4)
            check_contract(batches[-1], len(batches[-1].label))  # a padded batch, cut
            got = [t for b in batches for t in b.label.tolist()]
            assert len(got) == per_rank
            seen.update(got)
        if not drop_last:  # every sample, plus one repeat on each of the 2 short shards
            assert all(seen[c] >= counts[c] for c in counts)
            assert sum(seen.values()) == 48 + 2
    # Reproducible for (seed, epoch, rank), different across epochs; resume replays exactly.
    a = load("dali", shards["train"], reader="webdataset", initial_fill=16)
    a.set_epoch(1)
    full = epoch_tensors(a)
    a.set_epoch(2)
    assert not torch.equal(full[0], epoch_tensors(a)[0])
    b = load("dali", shards["train"], reader="webdataset", initial_fill=16)
    b.load_state_dict({"epoch": 1, "start_batch": 3})
    assert_same(full[3 * PER_TRAIN_BATCH :], epoch_tensors(b))


@pytest.mark.parametrize("backend", ["nvjpeg", pytest.param("dali", marks=needs_dali)])
def test_errors(backend, shards, tmp_path):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"\0" * 64)
    with pytest.raises(
        ValueError, match=f"{backend} loader: .* is not a directory; expected a shard"
    ):
        load(backend, beton)
    with pytest.raises(ValueError, match=f"{backend} loader: .*manifest.json not found"):
        load(backend, tmp_path)
    option = {"nvjpeg": {"resize": "bicubic"}, "dali": {"reader": "files"}}[backend]
    with pytest.raises(ValueError, match="must be one of"):
        load(backend, shards["train"], **option)


def test_nvjpeg_stops_its_threads_when_the_consumer_stops_early(shards):
    """Breaking out of an epoch ends the loader's reader and decoder threads at once (the
    decoder used to block on its input queue until a 10 s join gave up)."""
    import threading

    it = iter(load("nvjpeg", shards["train"], workers=1))
    next(it)
    it.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("fastsiam-nvjpeg")]
    assert alive == []


def test_nvjpeg_resize_paths_keep_to_their_devices(shards):
    with pytest.raises(ValueError, match="per_image' is the CPU path"):
        load("nvjpeg", shards["train"], resize="per_image", device="cuda")
    with pytest.raises(ValueError, match="kernel' is a CUDA kernel; device is cpu"):
        load("nvjpeg", shards["train"], resize="kernel", device="cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("resize", ["kernel", "batched"])
def test_nvjpeg_on_the_gpu_matches_the_cpu(shards, sources, resize):
    """nvJPEG decode + either GPU resize: the same samples and boxes as on the CPU (nvJPEG's
    IDCT and the batched path's float16 products differ from libjpeg-turbo by a level or so)."""
    images, labels = sources["train"]
    gpu = load("nvjpeg", shards["train"], device="cuda", resize=resize)
    gpu.set_epoch(1)
    order = gpu.sampler.rank_indices().tolist()
    batches = list(gpu)
    for b, batch in enumerate(batches):
        assert batch.view1.device.type == "cuda" and batch.label.device.type == "cuda"
        assert batch.view1.is_contiguous(memory_format=torch.channels_last)
        cpu_batch = type(batch)(*(t.cpu() for t in batch))
        indices = order[b * B : (b + 1) * B]
        assert cpu_batch.label.tolist() == [labels[i] for i in indices]
        right, wrong = view_errors(cpu_batch, indices, images, SEED, 1)
        assert max(right) < 3 and min(wrong) > 15
    assert gpu.resize == resize  # the kernel compiled and passed its check: no fallback
    val = load("nvjpeg", shards["val"], device="cuda", split="val", batch_size=6, drop_last=False,
               resize=resize)
    view = torch.cat([b.view.cpu() for b in val])
    errors = [mean_abs(v, reference_center(im)) for v, im in zip(view, sources["val"][0])]
    assert max(errors) < 3
