"""Pooled features of a loader's images, and how a classifier over them scores: the pieces the
kNN monitor (:mod:`fastsiam.knn`), linear evaluation (:mod:`fastsiam.linear`) and the online
probe (:mod:`fastsiam.probe`) share.

Features are extracted from :class:`~fastsiam.data.EvalBatch` loaders (center crops), the
model in eval mode, under autocast on CUDA only, and kept in float32. Scores are top-k hit
counts; under torchrun each rank scores its shard, the sampler's padding is left out and the
counts are summed, so every image counts once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from fastsiam import dist
from fastsiam.augment import to_normalized
from fastsiam.data import EvalBatch
from fastsiam.dist import DistInfo
from fastsiam.run_log import progress
from fastsiam.runtime import AMP_DTYPES

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


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast for frozen-feature forwards: ``bf16``/``fp16`` on CUDA, nothing elsewhere
    (the CPU runs float32, so CPU results never depend on a reduced-precision path)."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AMP_DTYPES[amp])
