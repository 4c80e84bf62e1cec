"""What pretraining measures besides its loss: the kNN monitor and the online linear probe.

Both score the backbone on center crops: the kNN classifies the val split against a bank of
the train split's center crops (:func:`fastsiam.knn.knn_evaluate`), the probe classifies
the val split with its head (:mod:`fastsiam.probe`). Every rank extracts its own shard and
the counts are summed over ranks, so no rank waits at a barrier while one does the work. The
center-crop loaders are built at first use and shared. Each result is one ``metrics.jsonl``
event and one log line on rank 0.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fastsiam.config import Config, ConfigError
from fastsiam.data import Loader, build_loader_from_config, makes_data_up
from fastsiam.dist import DistInfo
from fastsiam.knn import knn_evaluate
from fastsiam.model import SimSiam
from fastsiam.probe import OnlineProbe
from fastsiam.run_log import RunLogger

log = logging.getLogger("fastsiam")


def online_probe(cfg: Config, model: SimSiam, num_classes: int, device: torch.device, dist_info: DistInfo,
                 *, capture: bool) -> OnlineProbe | None:
    """The online probe ``eval.online_probe`` asks for (null: on where the data has labels and a
    val split to score it on), or None."""
    wanted = cfg.eval.online_probe
    if wanted is None:
        wanted = not makes_data_up(cfg.data.backend) and bool(cfg.data.val_path)
    if not wanted:
        return None
    if not cfg.data.val_path:
        raise ConfigError("eval.online_probe=true needs data.val_path (the split the probe is scored on)")
    # Its own generator: the model's initialization and the data see the same random stream.
    return OnlineProbe(model.feat_dim, num_classes, device=device, lr=cfg.eval.online_probe_lr,
                       momentum=cfg.optim.momentum, seed=cfg.train.seed, dist_info=dist_info, capture=capture)


class Monitors:
    """The kNN monitor and the probe's scoring for one run.

    Args:
        cfg: the run's config (``data``, ``aug.mean``/``std``, ``eval``, ``train.amp``).
        model: the SimSiam being trained (its backbone is scored).
        device: where features are extracted.
        dist_info: this process's rank and world.
    """

    def __init__(self, cfg: Config, model: SimSiam, device: torch.device, dist_info: DistInfo):
        self.cfg = cfg
        self.model = model
        self.device = device
        self.dist = dist_info
        self._loaders: dict[str, Loader] = {}

    def loader(self, key: str) -> Loader:
        """A center-crop loader, this rank's shard, over ``data.train_path`` (``key`` "bank":
        the kNN bank) or ``data.val_path`` ("val")."""
        if key not in self._loaders:
            path = self.cfg.data.train_path if key == "bank" else None
            self._loaders[key] = build_loader_from_config(
                self.cfg.data, split="val", path=path, device=self.device, seed=self.cfg.train.seed,
                rank=self.dist.rank, world_size=self.dist.world_size)
        return self._loaders[key]

    def knn(self, label: str, *, epoch: int, step: int, logger: RunLogger) -> dict[str, float]:
        """The kNN top-1 / top-5 of the backbone now (in eval mode, restored after)."""
        if not self.cfg.data.val_path:
            raise ConfigError("eval.knn_every > 0 needs data.val_path (the split to classify)")
        e = self.cfg.eval
        res = knn_evaluate(self.model, self.loader("bank"), self.loader("val"), k=e.knn_k,
                           temperature=e.knn_temperature, device=self.device, mean=self.cfg.aug.mean,
                           std=self.cfg.aug.std, amp=self.cfg.train.amp, info=self.dist)
        self._record(logger, {"event": "knn", "label": label, "epoch": epoch, "step": step}, "knn", res)
        if self.dist.is_main:
            log.info("kNN (%s): %s", label, ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
        return res

    def probe(self, probe: OnlineProbe, *, epoch: int, step: int, logger: RunLogger) -> dict[str, float]:
        """The online probe's top-1 / top-5 on the val split."""
        res = probe.evaluate(self.model.backbone, self.loader("val"), mean=self.cfg.aug.mean,
                             std=self.cfg.aug.std, amp=self.cfg.train.amp, info=self.dist)
        self._record(logger, {"event": "online_probe", "epoch": epoch, "step": step}, "probe", res)
        if self.dist.is_main:
            log.info("online probe (epoch %d): top1 %.2f, top5 %.2f", epoch, res["top1"], res["top5"])
        return res

    @staticmethod
    def _record(logger: RunLogger, head: dict[str, Any], prefix: str, res: dict[str, float]) -> None:
        logger.log({**head, **{f"{prefix}_{k}": v for k, v in res.items()}})
