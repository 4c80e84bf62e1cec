"""Evaluation of a representation by weighted kNN, and the feature extraction it shares with
linear evaluation (:mod:`fastsiam.linear`).

The kNN classifier is the weighted k-nearest-neighbour one of Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination" (CVPR 2018), as used by MoCo and
the SimSiam paper's monitor: cosine similarity on l2-normalized pooled features, the k nearest
training images vote for their class with weight ``exp(sim / T)`` (k=200, T=0.07).

The train-set "memory bank" for kNN is the training folder read in ``split="val"`` mode
(resize and center crop, no augmentation), as in the InstDisc/MoCo monitors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsiam import dist
from fastsiam.augment import to_normalized
from fastsiam.classifier import LinearClassifier
from fastsiam.config import IMAGENET_MEAN, IMAGENET_STD, Config
from fastsiam.data import EvalBatch, build_loader_from_config
from fastsiam.dist import DistInfo
from fastsiam.run_log import progress
from fastsiam.runtime import AMP_DTYPES, memory_format
from fastsiam.weights import load_pretrained

FeatureFn = Callable[[Tensor], Tensor]


def normalize_view(view: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[B,3,H,W]`` in [0, 255] -> float32 normalized by ``mean``/``std`` (in [0, 1]
    units, :func:`fastsiam.augment.to_normalized`); floating views are taken as already
    normalized by their loader (the PIL reference's ``full`` mode)."""
    if view.is_floating_point():
        return view.float()
    return to_normalized(view, tuple(mean), tuple(std))


def _feature_fn(model_or_fn: nn.Module | FeatureFn) -> FeatureFn:
    extract = getattr(model_or_fn, "extract_feat", None)
    if callable(extract):
        return extract
    if callable(model_or_fn):
        return model_or_fn
    raise TypeError(f"expected a model with extract_feat(x) or a callable, got {type(model_or_fn).__name__}")


@torch.no_grad()
def extract_features(
    model_or_backbone_fn: nn.Module | FeatureFn,
    loader: Iterable[EvalBatch],
    device: str | torch.device,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    desc: str = "features",
    amp: str = "none",
    show_progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Pooled features of every image of ``loader`` (an :class:`EvalBatch` loader).

    Args:
        model_or_backbone_fn: a model with ``extract_feat(x)`` (SimSiam, a linear classifier)
            or any callable mapping a normalized ``[B,3,H,W]`` batch to ``[B, D]``. Put the
            model in eval mode first (BatchNorm must use its running statistics).
        loader: yields ``EvalBatch(view, label)``; uint8 views are normalized here.
        device: where the forward passes run.
        mean, std: normalization in [0, 1] units (the config's ``aug.mean`` / ``aug.std``).
        desc: progress-bar label (the bar counts images, so its rate reads as images/s).
        amp: ``bf16`` / ``fp16`` autocast on CUDA (``none``: float32); see :func:`autocast`.
        show_progress: show the tqdm bar.

    Returns:
        ``(features [N, D] float32, labels [N] int64)``, both on ``device``.
    """
    device = torch.device(device)
    fn = _feature_fn(model_or_backbone_fn)
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    total = _num_images(loader)
    with progress(total or 0, 0, desc, enabled=show_progress) as bar:
        for batch in loader:
            view = batch.view.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            x = normalize_view(view, mean, std)
            with autocast(device, amp):
                f = fn(x)
            if f.dim() != 2:
                raise ValueError(f"feature extractor returned shape {tuple(f.shape)}; expected [B, D] pooled features")
            feats.append(f.float())
            labels.append(batch.label.to(device, non_blocking=True).long())
            bar.update(len(x))
    if not feats:
        raise ValueError("the loader yielded no batches; is the dataset empty?")
    return torch.cat(feats), torch.cat(labels)


def _num_images(loader: object) -> int | None:
    """Images per epoch when the loader can tell (for the progress bar's total)."""
    sampler = getattr(loader, "sampler", None)
    n = getattr(sampler, "num_samples", None)
    if not isinstance(n, int):
        return None
    return -(-n // int(getattr(sampler, "world_size", 1)))  # this rank's share, padding included


def _check_bank(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int) -> None:
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D]; got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}")
    if len(train_labels) != len(train_feats):
        raise ValueError(f"{len(train_feats)} training features but {len(train_labels)} labels")
    if train_labels.numel() and int(train_labels.max()) >= num_classes:
        raise ValueError(f"label {int(train_labels.max())} out of range for num_classes={num_classes}")


@torch.no_grad()
def knn_neighbours(bank: Tensor, bank_labels: Tensor, queries: Tensor, k: int,
                   chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(similarity, label)`` of each query's ``k`` most cosine-similar bank rows, ``[M, k]``
    each, most similar first (fewer columns when the bank is smaller). Queries go
    ``chunk_size`` at a time, so the ``[chunk, N]`` similarity matrix bounds memory."""
    k = min(k, len(bank))
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(bank.device).long()
    sims, labels = [], []
    for start in range(0, len(queries), chunk_size):
        q = F.normalize(queries[start:start + chunk_size].to(bank.device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        sims.append(sim)
        labels.append(bank_labels[idx])
    if not sims:
        return torch.zeros(0, k, device=bank.device), torch.zeros(0, k, dtype=torch.long, device=bank.device)
    return torch.cat(sims), torch.cat(labels)


def knn_vote(sim: Tensor, labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores ``[M, num_classes]``: each neighbour votes for its label with weight
    ``exp(sim / temperature)`` (InstDisc); ``-inf`` similarities (no neighbour) weigh 0."""
    votes = torch.zeros(len(sim), num_classes, device=sim.device)
    return votes.scatter_add_(1, labels, (sim / temperature).exp())


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> Tensor:
    """Class scores ``[M, num_classes]`` of the weighted kNN vote (InstDisc weighting).

    Each test feature's ``k`` most cosine-similar training features vote for their label
    with weight ``exp(sim / temperature)``. Test features are processed ``chunk_size`` at a
    time so the ``[chunk, N]`` similarity matrix bounds memory (N = 1.28 M for ImageNet).
    """
    _check_bank(train_feats, train_labels, test_feats, num_classes)
    sim, labels = knn_neighbours(train_feats, train_labels, test_feats, k, chunk_size)
    return knn_vote(sim, labels, num_classes, temperature)


def topk_hits(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """How many rows have their label among the ``k`` highest scores, for each ``k`` (capped at
    the number of classes): an int64 tensor ``[len(ks)]`` on the scores' device."""
    labels = labels.to(scores.device)
    order = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = order == labels[:, None]
    return torch.stack([hit[:, : min(k, scores.shape[1])].any(dim=1).sum() for k in ks])


@torch.no_grad()
def score_logits(
    logits_fn: FeatureFn,
    loader: Iterable[EvalBatch],
    device: str | torch.device,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    info: DistInfo | None = None,
    desc: str = "test",
    show_progress: bool = True,
) -> dict[str, float]:
    """Top-1 / top-5 (percent) of ``logits_fn`` (a normalized batch -> class scores; the model
    already in eval mode) over an :class:`EvalBatch` loader, and the number of images scored
    (``num_samples``). Under torchrun (``info`` of several ranks) the loader is this rank's
    shard: its sampler's padding is not scored and the ranks' hits are summed, so every image
    counts once and every rank gets the result."""
    info = info or DistInfo()
    logits, labels = extract_features(logits_fn, loader, device, mean=mean, std=std, desc=desc,
                                      show_progress=show_progress and info.is_main)
    if info.enabled:
        real = dist.shard_rows(loader).to(logits.device)
        logits, labels = logits[real], labels[real]
    counts = torch.cat([topk_hits(logits, labels, (1, 5)), torch.tensor([len(labels)], device=logits.device)])
    hits1, hits5, n = dist.all_reduce_sum(counts, info).tolist()
    if n == 0:
        raise ValueError("no samples to score")
    return {"top1": hits1 * 100.0 / n, "top5": hits5 * 100.0 / n, "num_samples": n}


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percent of rows whose label is among the ``k`` highest scores, for each ``k``
    (``k`` is capped at the number of classes, so top-5 of a 4-class problem is 100)."""
    if len(labels) == 0:
        raise ValueError("no samples to score")
    return [h * 100.0 / len(labels) for h in topk_hits(scores, labels, ks).tolist()]


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 accuracy (percent) of ``test_feats`` against the bank."""
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    top1, top5 = topk_accuracy(scores, test_labels, (1, 5))
    return top1, top5


def sharded_knn_classify(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, query_real: Tensor,
    num_classes: int, k: int, temperature: float, info: DistInfo,
) -> tuple[float, float]:
    """:func:`knn_classify` when every rank holds a shard of the bank and of the queries (with
    ``query_real`` False on its sampler's padding rows; the bank holds real rows only).

    The queries are gathered (they are the small split); each rank finds every query's ``k``
    nearest rows of its own bank shard, and the ranks' candidates are merged by similarity, so
    no rank ever holds the whole bank and the result is one process's on the same features.
    """
    _check_bank(bank, bank_labels, queries, num_classes)
    real = dist.all_gather(query_real.to(queries.device), info).flatten()
    q = dist.all_gather(queries.float(), info).flatten(0, 1)[real]
    q_labels = dist.all_gather(query_labels.to(queries.device), info).flatten()[real]
    sim, labels = knn_neighbours(bank, bank_labels, q, k)
    if sim.shape[1] < k:  # a bank shard smaller than k: pad with neighbours that weigh nothing
        pad = k - sim.shape[1]
        sim = F.pad(sim, (0, pad), value=float("-inf"))
        labels = F.pad(labels, (0, pad))
    sims = dist.all_gather(sim, info).permute(1, 0, 2).flatten(1)      # [M, world x k]
    labs = dist.all_gather(labels, info).permute(1, 0, 2).flatten(1)
    total = int(dist.all_reduce_sum(torch.tensor([len(bank)], device=bank.device), info).item())
    sim, pick = sims.topk(min(k, total), dim=1)
    scores = knn_vote(sim, labs.gather(1, pick), num_classes, temperature)
    top1, top5 = topk_accuracy(scores, q_labels, (1, 5))
    return top1, top5


def knn_evaluate(
    model: nn.Module | FeatureFn,
    train_loader: Iterable[EvalBatch],
    val_loader: Iterable[EvalBatch],
    *,
    k: int = 200,
    temperature: float = 0.07,
    device: str | torch.device = "cpu",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_classes: int | None = None,
    amp: str = "none",
    show_progress: bool = True,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """kNN accuracy of ``model.extract_feat`` features: ``{"top1": %, "top5": %}``.

    ``train_loader`` is the memory bank (the training folder read with ``split="val"``),
    ``val_loader`` the images to classify. The model is switched to eval mode for the
    duration and restored after. ``num_classes`` defaults to the loader's, else the largest
    label + 1. ``amp`` autocasts the forward passes on CUDA (features are kept in float32).
    Under torchrun (``info`` of several ranks) the loaders are this rank's shards and every
    rank gets the result (:func:`sharded_knn_classify`).
    """
    info = info or DistInfo()
    show_progress = show_progress and info.is_main
    was_training = getattr(model, "training", None)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        bank, bank_labels = extract_features(model, train_loader, device, mean=mean, std=std,
                                             desc="kNN bank", amp=amp, show_progress=show_progress)
        feats, labels = extract_features(model, val_loader, device, mean=mean, std=std,
                                         desc="kNN val", amp=amp, show_progress=show_progress)
    finally:
        if isinstance(model, nn.Module) and was_training is not None:
            model.train(was_training)
    if num_classes is None:
        num_classes = getattr(train_loader, "num_classes", None)
    if num_classes is None:
        top = torch.stack([bank_labels.max(), labels.max()]).max()
        num_classes = int(dist.all_reduce_max(top, info).item()) + 1
    if not info.enabled:
        top1, top5 = knn_classify(bank, bank_labels, feats, labels, num_classes, k, temperature)
    else:
        query_real = dist.shard_rows(val_loader)
        keep = dist.shard_rows(train_loader).to(bank.device)
        top1, top5 = sharded_knn_classify(bank[keep], bank_labels[keep], feats, labels, query_real,
                                          num_classes, k, temperature, info)
    return {"top1": top1, "top5": top5}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast for frozen-feature forwards: ``bf16``/``fp16`` on CUDA, nothing elsewhere
    (the CPU runs float32, so CPU results never depend on a reduced-precision path)."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AMP_DTYPES[amp])


def run_knn(
    cfg: Config,
    pretrained: str | Path | None = None,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """``fastsiam knn``: weighted kNN of a pretrained backbone, ``data.train_path`` (read
    with center crops) as the memory bank and ``data.val_path`` classified.

    ``pretrained`` defaults to ``eval.pretrained``; any format of :mod:`fastsiam.weights`.
    Returns ``{"top1", "top5"}`` in percent, on every rank under torchrun (each extracts its
    shard of the bank and of the queries).
    """
    pretrained = pretrained or cfg.eval.pretrained
    if not pretrained:
        raise ValueError("kNN evaluation needs pretrained weights: pass --pretrained or set eval.pretrained")
    dev, info = dist.join(str(device or cfg.train.device), cfg.dist.backend, cfg.dist.timeout_s)
    shard = {"device": dev, "rank": info.rank, "world_size": info.world_size}
    bank = build_loader_from_config(cfg.data, split="val", path=cfg.data.train_path, **shard)
    val = build_loader_from_config(cfg.data, split="val", **shard)
    model = LinearClassifier(cfg.model.backbone, 1, cfg.model.small_input)  # its fc is unused
    load_pretrained(model, pretrained, parts=("backbone",))
    model.to(dev, memory_format=memory_format(cfg.train.channels_last))
    return knn_evaluate(model, bank, val, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                        device=dev, mean=cfg.aug.mean, std=cfg.aug.std, amp=cfg.train.amp,
                        show_progress=show_progress, info=info)
