"""Linear evaluation of a frozen representation, and testing the classifier it trains.

The SimSiam paper's protocol (Chen & He, CVPR 2021, appendix A): the pretrained encoder is
frozen and in eval mode, a linear classifier on its pooled features is trained with LARS
(You et al., 2017) at batch 4096, lr 0.1 x batch / 256, cosine decay, 90 epochs, on one
random-resized crop with a horizontal flip per image; val is scored on center crops.

A batch of 4096 needs 8 GPUs of 512 or one large one; ``train.accumulate_steps`` reaches it on
less by summing the gradients of several micro-batches before each optimizer step. With the
backbone frozen in eval mode the micro-batches' features do not depend on each other (no
BatchNorm statistics are updated), so k micro-batches of B are the same step as one batch of
kB up to float rounding.

``last.pt`` (the ``fastsiam-linear`` format of :mod:`fastsiam.weights`) is written after every
epoch with the optimizer and RNG state beside the weights, so ``--resume auto`` continues from
the last completed epoch exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastsiam import checkpoint as ckpt
from fastsiam import dist
from fastsiam.augment.functional import hflip
from fastsiam.classifier import LinearClassifier
from fastsiam.config import Config, from_dict
from fastsiam.data import EvalBatch, Loader, build_loader_from_config
from fastsiam.dist import DistInfo
from fastsiam.features import FeatureFn, autocast, normalize_view, score_logits
from fastsiam.files import atomic_open
from fastsiam.optim import build_optimizer, build_schedule
from fastsiam.resume import config_changes
from fastsiam.run_log import CONFIG_FILE, RunLogger, progress
from fastsiam.runtime import default_work_dir, memory_format, scaled_lr
from fastsiam.trainer import TrainingError
from fastsiam.weights import load_pretrained, save_linear_checkpoint

log = logging.getLogger(__name__)

LINEAR_CHECKPOINT = "last.pt"


def classifier_logits_fn(model: LinearClassifier, device: torch.device, amp: str) -> FeatureFn:
    """``x -> logits``: the backbone under :func:`~fastsiam.features.autocast`, the head in
    float32; training and testing both score through this, so they agree on the same device."""
    def logits(x: Tensor) -> Tensor:
        with autocast(device, amp):
            feats = model.backbone(x)
        return model.fc(feats.float())

    return logits


@torch.no_grad()
def evaluate_classifier(
    model: LinearClassifier,
    loader: Iterable[EvalBatch],
    device: str | torch.device,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    amp: str = "none",
    show_progress: bool = True,
    info: DistInfo | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 (percent) of a classifier over an :class:`EvalBatch` loader, and the
    number of images scored (``num_samples``). Under torchrun (``info`` of several ranks) the
    loader is this rank's shard: its sampler's padding is not scored and the ranks' hits are
    summed, so every image counts once and every rank gets the result."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        return score_logits(classifier_logits_fn(model, device, amp), loader, device, mean=mean, std=std,
                            info=info, show_progress=show_progress)
    finally:
        model.train(was_training)


def train_linear(
    model: LinearClassifier,
    train_loader: Loader,
    val_loader: Loader | None,
    cfg: Config,
    *,
    device: torch.device,
    logger: RunLogger,
    checkpoint_path: Path,
    show_progress: bool = True,
    resume_state: dict[str, Any] | None = None,
    info: DistInfo | None = None,
) -> dict[str, Any]:
    """The linear-evaluation loop: train ``model.fc`` on frozen features, score val each epoch.

    Each optimizer step sees ``train.accumulate_steps`` micro-batches of ``data.batch_size``
    on each process (their mean loss), and the lr is ``optim.lr x global batch / 256`` with
    the global batch ``data.batch_size x accumulate_steps x processes``; an epoch's
    micro-batches past the last full accumulation are not used (as ``drop_last`` drops a
    partial batch). After every epoch the classifier is scored on ``val_loader`` and written
    to ``checkpoint_path`` (by rank 0) with what :func:`run_linear` needs to resume.

    Under torchrun the head's gradients are averaged over the ranks before each step (what DDP
    would do; by hand because only the head trains and accumulation decides when), and each
    sample's flip is drawn for its place in the global epoch order, so N processes of batch
    b take the same steps as one process of batch N x b.

    Args:
        resume_state: the ``train_state`` of a checkpoint written by this loop: training
            continues after its epoch (the model's weights must already be loaded).
        info: this process's place under torchrun (default: a single process).

    Returns ``{"top1", "top5", "epoch", "step", "loss", "checkpoint"}`` of the last epoch.
    """
    info = info or DistInfo()
    show_progress = show_progress and info.is_main
    model.freeze_backbone()
    model.train()
    micro, accumulate = cfg.data.batch_size, cfg.train.accumulate_steps
    batch = micro * accumulate * info.world_size  # the global batch of one optimizer step
    lr = scaled_lr(cfg.optim.lr, batch)
    steps_per_epoch = len(train_loader) // accumulate
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch has {len(train_loader)} batches of {micro}, fewer than "
                         f"train.accumulate_steps={accumulate}; lower it or data.batch_size")
    optimizer = build_optimizer(model, cfg.optim, lr=lr, device=device)
    schedule = build_schedule(cfg.schedule, optimizer, base_lr=lr, epochs=cfg.train.epochs,
                              steps_per_epoch=steps_per_epoch)
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    flip_generator = torch.Generator().manual_seed(cfg.train.seed)
    first_epoch, step = 0, 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        flip_generator.set_state(resume_state["flip_rng"])
        ckpt.set_rng_state(resume_state["rng"])
        first_epoch, step = int(resume_state["epoch"]), int(resume_state["step"])
    if info.is_main:
        log.info("linear evaluation of %s on %s: %d x %d images/step, lr %.4g, %d steps/epoch, work dir %s",
                 cfg.model.backbone, device, info.world_size * accumulate, micro, lr, steps_per_epoch,
                 checkpoint_path.parent)
    mean, std, amp = cfg.aug.mean, cfg.aug.std, cfg.train.amp
    fmt = memory_format(cfg.train.channels_last)
    result: dict[str, Any] = {}
    bar = progress(total * batch, step * batch, "linear", show_progress)
    try:
        for epoch in range(first_epoch, cfg.train.epochs):
            if step >= total:
                break
            train_loader.set_epoch(epoch)
            loss_sum = torch.zeros((), device=device)
            steps_done = 0
            # The epoch's flips, drawn on the host (so they do not depend on the device) and
            # copied once: a copy per batch would make the host wait for the device each time.
            # One flip per place in the global order, this rank's places at r, r + w, ...
            # (the sampler's split), so the draws do not depend on the number of processes.
            flips = torch.rand(steps_per_epoch * batch, generator=flip_generator) < 0.5
            flips = flips[info.rank::info.world_size].to(device)
            for i, crops in enumerate(train_loader):
                if step >= total or i >= steps_per_epoch * accumulate:
                    break
                view = crops.view1
                if view.is_floating_point():
                    raise ValueError("linear evaluation needs plain crops, but the loader delivered augmented "
                                     "float views; for the pil backend set data.options.augment=crop")
                flip = flips[i * micro:i * micro + len(view)]
                x = normalize_view(hflip(view.to(device), flip), mean, std)
                x = x.contiguous(memory_format=fmt)
                with torch.no_grad(), autocast(device, amp):
                    feats = model.backbone(x)
                # the mean over the whole accumulated batch, as one batch of micro x accumulate
                loss = F.cross_entropy(model.fc(feats.float()), crops.label.to(device)) / accumulate
                loss.backward()
                loss_sum += loss.detach()
                bar.update(len(x) * info.world_size)
                if (i + 1) % accumulate:
                    continue
                if info.enabled:
                    for p in model.fc.parameters():
                        p.grad = dist.all_reduce_mean(p.grad, info)  # type: ignore[arg-type]
                schedule.set(step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps_done += 1
                step += 1
            mean_loss = (dist.all_reduce_mean(loss_sum, info) / max(steps_done, 1)).item()
            if not math.isfinite(mean_loss):
                raise TrainingError(f"linear evaluation: non-finite loss in epoch {epoch + 1}; lower optim.lr "
                                    f"(last.pt holds epoch {epoch})")
            record: dict[str, Any] = {"event": "epoch", "epoch": epoch + 1, "step": step, "loss": mean_loss,
                                      "lr": schedule.lr_at(max(step - 1, 0))}
            scores = {"top1": None, "top5": None}
            if val_loader is not None:
                scores = evaluate_classifier(model, val_loader, device, mean=mean, std=std, amp=amp,
                                             show_progress=False, info=info)
                record.update({"top1": scores["top1"], "top5": scores["top5"]})
            logger.log(record)
            if info.is_main:
                train_state = {"optimizer": optimizer.state_dict(), "flip_rng": flip_generator.get_state(),
                               "rng": ckpt.rng_state(), "epoch": epoch + 1, "step": step}
                save_linear_checkpoint(checkpoint_path, model, config=cfg.to_dict(),
                                       classes=getattr(train_loader, "classes", None),
                                       top1=scores["top1"], top5=scores["top5"], epoch=epoch + 1,
                                       train_state=train_state)
            dist.barrier(info)  # a rank that stops here finds the epoch's file complete
            bar.set_postfix(loss=f"{mean_loss:.4f}",
                            top1=f"{scores['top1']:.2f}" if scores["top1"] is not None else None)
            result = {"top1": scores["top1"], "top5": scores["top5"], "epoch": epoch + 1, "step": step,
                      "loss": mean_loss, "checkpoint": checkpoint_path}
    finally:
        bar.close()
    return result


def run_linear(
    cfg: Config,
    pretrained: str | Path | None = None,
    device: str | torch.device | None = None,
    work_dir: str | Path | None = None,
    show_progress: bool = True,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """``fastsiam linear``: linear evaluation of a pretrained backbone, end to end.

    Args:
        cfg: a linear-evaluation config (``data.train_path``/``val_path``, ``model``,
            ``optim``, ``schedule``, ``train.epochs``...).
        pretrained: checkpoint in any format :mod:`fastsiam.weights` reads (default
            ``eval.pretrained``); only its backbone is used.
        device: ``auto``, ``cpu``, ``cuda``... (default ``train.device``).
        work_dir: output folder (default ``output.work_dir``, else ``work_dirs/<config name>``);
            receives ``config.yaml`` (resolved), ``metrics.jsonl`` and ``last.pt``.
        resume: ``auto`` (the work dir's ``last.pt`` if there is one, else a fresh start) or a
            linear checkpoint: continue after its epoch. A resume whose config or pretrained
            weights differ in what changes the result is refused, naming the keys.

    Returns ``{"top1", "top5", "epoch", "step", "loss", "checkpoint", "work_dir"}``.
    """
    pretrained = pretrained or cfg.eval.pretrained
    if not pretrained:
        raise ValueError("linear evaluation needs pretrained weights: pass --pretrained or set eval.pretrained")
    dev, info = dist.join(str(device or cfg.train.device), cfg.dist.backend, cfg.dist.timeout_s)
    wd = Path(work_dir) if work_dir else default_work_dir(cfg)
    ckpt_path = wd / LINEAR_CHECKPOINT
    resume_from = _resume_file(resume, ckpt_path)
    dist.barrier(info)  # every rank has looked before rank 0 writes anything
    torch.manual_seed(cfg.train.seed)
    shard = {"device": dev, "rank": info.rank, "world_size": info.world_size}
    train_loader = build_loader_from_config(cfg.data, split="train", seed=cfg.train.seed, **shard)
    val_loader = build_loader_from_config(cfg.data, split="val", **shard)  # the score is the point
    model = _classifier_for(cfg, train_loader, cfg.data.train_path, exact=True)
    raw = cfg.to_dict()
    raw["task"] = "linear"  # what the run's checkpoint holds, whichever config started it
    raw["model"]["num_classes"] = model.num_classes
    raw["eval"]["pretrained"] = str(pretrained)
    resolved = from_dict(raw, source=cfg.name)
    state = None
    if resume_from is not None:
        state = _resumable(resume_from, resolved)
        model.load_state_dict(state["model"])  # the backbone it trained on and its head
    else:
        load_pretrained(model, pretrained, parts=("backbone",))
    model.to(dev, memory_format=memory_format(cfg.train.channels_last))
    if info.is_main:
        wd.mkdir(parents=True, exist_ok=True)
        with atomic_open(wd / CONFIG_FILE, "w") as f:
            f.write(resolved.to_yaml())
    logger = RunLogger(wd, enabled=info.is_main)
    try:
        if state is not None:
            logger.log({"event": "resumed", "from": str(resume_from), "epoch": state["epoch"]})
        res = train_linear(model, train_loader, val_loader, resolved, device=dev, logger=logger,
                           checkpoint_path=ckpt_path, show_progress=show_progress,
                           resume_state=state["train_state"] if state is not None else None, info=info)
    finally:
        logger.close()
    if not res:  # resumed a finished run: its last epoch is the result
        res = {"top1": state["top1"], "top5": state["top5"], "epoch": state["epoch"],  # type: ignore[index]
               "step": state["train_state"]["step"], "loss": None, "checkpoint": ckpt_path}  # type: ignore[index]
    return {**res, "work_dir": wd}


def _resume_file(resume: str | Path | None, ckpt_path: Path) -> Path | None:
    """The checkpoint to continue from, or ``None`` for a fresh run (refused over a finished one)."""
    if resume is None:
        if ckpt_path.exists():
            raise ValueError(f"work dir {ckpt_path.parent} already holds a linear run ({ckpt_path.name}); "
                             f"continue it with --resume auto or choose another --work-dir")
        return None
    if str(resume) == "auto":
        return ckpt_path if ckpt_path.exists() else None
    return Path(resume)


def _resumable(path: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint at ``path`` if this run may continue it (same trajectory and weights)."""
    state = ckpt.load_checkpoint(path)
    if "train_state" not in state or "config" not in state:
        raise ValueError(f"{path}: not a resumable linear-evaluation checkpoint (no optimizer state)")
    changed, _ = config_changes(state["config"], cfg.to_dict(), significant=("eval.pretrained",))
    if changed:
        raise ValueError(f"{path}: this config changes the run's result ({', '.join(map(str, changed))}); "
                         f"resume with the run's config or choose another --work-dir")
    return state


def run_test(
    cfg: Config,
    checkpoint: str | Path,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """``fastsiam test``: top-1 / top-5 of a linear classifier on ``data.val_path``.

    ``checkpoint`` is a linear classifier in any format :mod:`fastsiam.weights` reads
    (fastsiam-linear, official ``main_lincls``, mmpretrain ``backbone`` + ``head.fc``,
    torchvision with ``fc``). Returns ``{"top1", "top5", "num_samples"}``; under torchrun the
    val split is sharded and every rank gets the whole split's result.
    """
    dev, info = dist.join(str(device or cfg.train.device), cfg.dist.backend, cfg.dist.timeout_s)
    val_loader = build_loader_from_config(cfg.data, split="val", device=dev, rank=info.rank,
                                          world_size=info.world_size)
    model = _classifier_for(cfg, val_loader, str(cfg.data.val_path), exact=False)
    load_pretrained(model, checkpoint, parts=("backbone", "fc"))
    model.to(dev, memory_format=memory_format(cfg.train.channels_last))
    return evaluate_classifier(model, val_loader, dev, mean=cfg.aug.mean, std=cfg.aug.std, amp=cfg.train.amp,
                               show_progress=show_progress, info=info)


def _classifier_for(cfg: Config, loader: Loader, data: str, exact: bool) -> LinearClassifier:
    """The linear classifier for ``loader``'s data: ``model.num_classes`` outputs, or the data's
    class count when that is null. ``exact``: the training split must have exactly as many
    classes as the head (a val split may lack some)."""
    found = getattr(loader, "num_classes", None)
    n = cfg.model.num_classes
    if n is None:
        if found is None:
            raise ValueError(f"{data}: the loader does not know its class count; set model.num_classes")
        n = found
    elif found is not None and (found != n if exact else found > n):
        raise ValueError(f"{data} has {found} classes but model.num_classes={n}; set model.num_classes={found} "
                         f"(or null: the data's count)")
    return LinearClassifier(cfg.model.backbone, n, cfg.model.small_input)

