"""The online linear probe (fastsiam.probe): its update against torch's SGD, its draws, the
backbone it leaves alone, its records and scores, and when the trainer turns it on."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_trainer import records, toy_overrides, train

from fastsiam.checkpoint import load_checkpoint
from fastsiam.config import ConfigError, load_config
from fastsiam.data import build_loader
from fastsiam.features import normalize_view
from fastsiam.model import SimSiam
from fastsiam.probe import INIT_STD, OnlineProbe
from fastsiam.trainer import Trainer


def test_probe_update_is_torch_sgd_on_cross_entropy() -> None:
    """Three steps of the probe (loss, backward, step) against an nn.Linear with the same start
    and torch.optim.SGD (momentum 0.9, no weight decay) on F.cross_entropy; the features reach
    it detached, so the network that made them gets no gradient."""
    probe = OnlineProbe(8, 5, device="cpu", lr=0.3, momentum=0.9, seed=3)
    ref = torch.nn.Linear(8, 5)
    ref.load_state_dict(probe.head.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    source = torch.randn(8, 8, requires_grad=True)
    for _ in range(3):
        x = torch.randn(16, 8, generator=g) @ source
        y = torch.randint(0, 5, (16,), generator=g)
        probe.zero_grad()
        loss = probe.loss(x, y)
        loss.backward()
        probe.step()
        opt.zero_grad()
        want = F.cross_entropy(ref(x.detach()), y)
        want.backward()
        opt.step()
        torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
        for a, b in zip(probe.head.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert source.grad is None


def test_creating_a_probe_takes_no_global_draw() -> None:
    before = torch.random.get_rng_state()
    a = OnlineProbe(32, 10, device="cpu", lr=0.1, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = OnlineProbe(32, 10, device="cpu", lr=0.1, seed=7)
    assert torch.equal(a.head.weight, b.head.weight) and not a.head.bias.any()
    assert a.head.weight.std().item() == pytest.approx(INIT_STD, rel=0.15)
    assert not torch.equal(a.head.weight, OnlineProbe(32, 10, device="cpu", lr=0.1, seed=8).head.weight)


def _probe_scores(state: dict, cfg, val: Path) -> tuple[float, float]:
    """Top-1 / top-5 of a checkpoint's probe recounted here: its backbone and head loaded
    into fresh modules, each val image scored by torch.topk."""
    model = SimSiam(cfg.model.backbone, cfg.model.dim, cfg.model.pred_dim, cfg.model.small_input)
    model.load_state_dict(state["model"])
    head = torch.nn.Linear(model.feat_dim, state["probe"]["head"]["weight"].shape[0])
    head.load_state_dict(state["probe"]["head"])
    model.eval()
    loader = build_loader(cfg.data.backend, val, batch_size=5, image_size=cfg.data.image_size, workers=0,
                          split="val", drop_last=False)
    hits1 = hits5 = n = 0
    with torch.no_grad():
        for batch in loader:
            logits = head(model.backbone(normalize_view(batch.view, cfg.aug.mean, cfg.aug.std)))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # top-5 of 4 classes: all
            hits1 += int((top[:, 0] == batch.label).sum())
            hits5 += int((top == batch.label[:, None]).any(dim=1).sum())
            n += len(batch.label)
    return 100.0 * hits1 / n, 100.0 * hits5 / n


def test_backbone_is_bitwise_the_same_with_the_probe_on_or_off(toy_imagenet: Path, tmp_path: Path) -> None:
    """Two epochs with and without the probe: every SimSiam weight and buffer equal bit for bit,
    the step records carry the probe's loss, each epoch has an online_probe event, and the
    last event's scores are what the saved backbone and head score on the val split."""
    on = train(toy_imagenet, tmp_path / "on", **{"eval.online_probe": True})
    off = train(toy_imagenet, tmp_path / "off", **{"eval.online_probe": False})
    a, b = on.model.state_dict(), off.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert off.probe is None and on.probe is not None
    rec = records(tmp_path / "on")
    steps = [r for r in rec if "loss" in r]
    assert steps and all(r["probe_loss"] > 0 for r in steps)
    assert not any("probe_loss" in r for r in records(tmp_path / "off"))
    events = [r for r in rec if r.get("event") == "online_probe"]
    assert [(r["epoch"], r["step"], r["probe_num_samples"]) for r in events] == [(1, 3, 16), (2, 6, 16)]
    state = load_checkpoint(tmp_path / "on" / "epoch_0002.pt")
    assert "probe" not in load_checkpoint(tmp_path / "off" / "epoch_0002.pt")
    cfg = load_config(tmp_path / "on" / "config.yaml")
    top1, top5 = _probe_scores(state, cfg, toy_imagenet / "val")
    assert (events[-1]["probe_top1"], events[-1]["probe_top5"]) == pytest.approx((top1, top5))
    assert on.result.probe["top1"] == events[-1]["probe_top1"]


def test_probe_is_on_where_the_data_has_labels_and_a_val_split(toy_imagenet: Path, tmp_path: Path) -> None:
    def built(**extra: object) -> Trainer:
        return Trainer(load_config(None, toy_overrides(toy_imagenet, **extra)), work_dir=tmp_path / "run")

    assert built().probe is not None                                  # pil, data.val_path set
    assert built(**{"data.val_path": ""}).probe is None
    assert built(**{"data.backend": "synthetic", "data.options.num_samples": 32}).probe is None
    assert built(**{"eval.online_probe": False}).probe is None
    with pytest.raises(ConfigError, match=r"eval.online_probe=true needs data.val_path"):
        built(**{"data.val_path": "", "eval.online_probe": True})


def test_a_run_resumed_with_the_probe_turned_on_starts_it_untrained(toy_imagenet: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """eval.* is a monitor: a checkpoint without a probe resumes into a run with one (the
    probe starts fresh, said once), and the SimSiam weights continue as they would have."""
    caplog.set_level(logging.INFO, logger="fastsiam")
    straight = train(toy_imagenet, tmp_path / "a", **{"eval.online_probe": False})
    train(toy_imagenet, tmp_path / "b", **{"train.max_steps": 3, "eval.online_probe": False})
    resumed = train(toy_imagenet, tmp_path / "b", resume="auto", **{"eval.online_probe": True})
    assert "no online probe: it starts untrained at step 3" in caplog.text
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in events if r.get("event") == "online_probe"] == [2]
