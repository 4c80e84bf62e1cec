"""Resuming with another config (fastsiam.resume): trajectory changes are refused with the
keys named unless asked for, harmless ones pass, a changed batch size restarts the epoch at
the right batch, and a model that does not fit the checkpoint is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_trainer import records, train

from fastsiam.checkpoint import load_checkpoint
from fastsiam.config import load_config
from fastsiam.resume import config_changes, restart_batch
from fastsiam.trainer import TrainingError


def test_config_changes_split_trajectory_from_harmless_keys() -> None:
    a = load_config(None, []).to_dict()
    b = load_config(None, ["data.batch_size=8", "train.log_every=3", "data.workers=1",
                           "eval.knn_k=5", "data.options={augment: crop}"]).to_dict()
    trajectory, harmless = config_changes(a, b)
    assert [str(c) for c in trajectory] == ["data.batch_size 32 -> 8",
                                           "data.options {} -> {'augment': 'crop'}"]
    assert [c.key for c in harmless] == ["data.workers", "eval.knn_k", "train.log_every"]
    assert config_changes(a, a) == ([], [])


def test_restart_batch_never_skips_a_sample() -> None:
    assert restart_batch(2, 16, 8) == 4       # 32 samples done: batch 4 of 8 starts at 32
    assert restart_batch(3, 16, 32) == 1      # 48 done: batch 1 (32..63) is partly new
    assert restart_batch(0, 16, 8) == 0


def test_a_changed_batch_size_is_refused_and_writes_nothing(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    train(toy_imagenet, wd, **{"train.max_steps": 2})
    config_before = (wd / "config.yaml").read_text()
    with pytest.raises(TrainingError, match=r"step_00000002.pt: this config changes the run's trajectory "
                                             r"\(data.batch_size 16 -> 8\); resume with the run's config, "
                                             r"or pass --resume-changed"):
        train(toy_imagenet, wd, resume="auto", **{"data.batch_size": 8})
    assert (wd / "config.yaml").read_text() == config_before
    # a harmless change resumes
    t = train(toy_imagenet, wd, resume="auto", **{"train.log_every": 1, "train.max_steps": 3})
    assert t.result.step == 3


def test_resume_changed_restarts_the_epoch_at_the_same_sample(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    train(toy_imagenet, wd, **{"train.max_steps": 2, "train.log_every": 1})   # 2 of 3 batches of 16
    train(toy_imagenet, wd, resume="auto", resume_changed=True,
          **{"data.batch_size": 8, "train.log_every": 1, "train.max_steps": 6})
    # 32 samples of epoch 0 were trained: the epoch of 8-image batches resumes at its batch 4,
    # so two steps (samples 32..47) end it: epoch 1 is saved at step 4.
    assert load_checkpoint(wd / "epoch_0001.pt")["step"] == 4
    event = next(r for r in records(wd) if r.get("event") == "resume_changed")
    assert event["changed"] == {"data.batch_size": [16, 8]} and event["step"] == 2
    assert "batch_size: 8" in (wd / "config.yaml").read_text()


def test_a_model_that_does_not_fit_is_one_line(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    train(toy_imagenet, wd, **{"train.max_steps": 1})
    with pytest.raises(TrainingError, match=r"^.*step_00000001.pt: its model does not fit this config's "
                                             r"model: size mismatch for .*$"):
        train(toy_imagenet, wd, resume="auto", resume_changed=True, **{"model.dim": 32})


def test_resume_from_a_torchvision_state_dict_is_one_line(toy_imagenet: Path, tmp_path: Path) -> None:
    import torch
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(TrainingError, match=r"resnet18.pth: --resume needs a fastsiam training checkpoint "
                                             r".*this is a torchvision ResNet state dict"):
        train(toy_imagenet, tmp_path / "run", resume=str(path))
    # --resume auto passes over such a file (with a warning) instead of failing on it
    wd = tmp_path / "run2"
    wd.mkdir()
    torch.save(resnet18().state_dict(), wd / "epoch_0001.pt")
    with pytest.raises(TrainingError, match=r"no readable checkpoint to resume from"):
        train(toy_imagenet, wd, resume="auto")
