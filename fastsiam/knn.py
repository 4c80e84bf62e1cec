"""Evaluation of a representation by weighted kNN (the monitor and ``fastsiam knn``).

The kNN classifier is the weighted k-nearest-neighbour one of Wu et al., "Unsupervised
Feature Learning via Non-Parametric Instance Discrimination" (CVPR 2018), as used by MoCo and
the SimSiam paper's monitor: cosine similarity on l2-normalized pooled features, the k nearest
training images vote for their class with weight ``exp(sim / T)`` (k=200, T=0.07).

The train-set "memory bank" for kNN is the training folder read in ``split="val"`` mode
(resize and center crop, no augmentation), as in the InstDisc/MoCo monitors. Under torchrun
every rank extracts its shard of the bank and of the queries, scores all queries against its
bank shard and the per-rank top-k are merged, so memory per rank falls with the ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsiam import dist
from fastsiam.classifier import LinearClassifier
from fastsiam.config import IMAGENET_MEAN, IMAGENET_STD, Config
from fastsiam.data import EvalBatch, build_loader_from_config
from fastsiam.dist import DistInfo
from fastsiam.features import FeatureFn, extract_features, topk_accuracy
from fastsiam.runtime import memory_format
from fastsiam.weights import load_pretrained


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
