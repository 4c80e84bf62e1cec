"""Reading, converting and exporting weights: fastsiam, official SimSiam, mmpretrain, torchvision.

Every file is read with ``torch.load(weights_only=True)``: tensors, containers and plain
Python values only. A file that needs any other pickled object is refused with
:class:`WeightsError` before that object is built, so code hidden in a checkpoint never runs.

All formats are converted to one **canonical** state dict in fastsiam's names:

=================  ====================================================================
prefix             contents
=================  ====================================================================
``backbone.*``     torchvision ResNet keys without ``fc`` (``conv1.weight``, ``layer1.0.bn1.*``)
``projector.*``    SimSiam projector (:func:`fastsiam.model.projection_mlp` indices 0..7)
``predictor.*``    SimSiam predictor (:func:`fastsiam.model.prediction_mlp` indices 0..3)
``fc.*``           linear classifier head (``fc.weight`` ``[classes, feat_dim]``, ``fc.bias``)
=================  ====================================================================

Recognised inputs (the container is found first, then the key layout):

- fastsiam pretraining checkpoint (``fastsiam train``): ``{"model": SimSiam state dict, "config":
  dict, "epoch", "step", "optimizer", "fastsiam_version", ...}``.
- fastsiam linear checkpoint (``fastsiam linear``, written by :func:`save_linear_checkpoint`):
  ``{"format": "fastsiam-linear", "model": {"backbone.*", "fc.weight", "fc.bias"}, "config":
  dict, "classes": [names] | None, "top1": float, "top5": float, "epoch": int,
  "fastsiam_version": str, "train_state": {"optimizer", "flip_rng", "rng", "epoch", "step"}}``
  (``train_state``: what ``fastsiam linear --resume`` continues from).
- official SimSiam (facebookresearch/simsiam ``main_simsiam.py``): ``{"state_dict":
  {"module.encoder.<resnet>", "module.encoder.fc.<0..7>", "module.predictor.<0..3>"}, ...}``.
  Its last projector Linear has a frozen bias feeding a BatchNorm; the bias is folded into
  that BatchNorm's running mean (exact in train and eval mode), as fastsiam drops it.
- official linear classifier (``main_lincls.py``): ``{"state_dict": {"module.<resnet with fc>"}}``.
- mmpretrain: ``{"state_dict": {"backbone.*", "neck.fc<i>/bn<i>", "head.predictor.fc<i>/bn<i>",
  "head.fc.*", "data_preprocessor.*"}, "meta": ...}``; NonLinearNeck layer ``i`` maps to the
  Sequential indices ``3i`` (Linear) and ``3i + 1`` (BatchNorm); the data preprocessor's
  mean/std buffers are dropped (the config's ``aug.mean``/``aug.std`` play that role).
- torchvision ResNet state dict (``conv1.weight`` ... ``fc.bias``), bare or under ``state_dict``.

Export: :func:`export_torchvision` writes the backbone (and ``fc`` when there is one) as a
plain torchvision ResNet state dict: ``torchvision.models.resnet50().load_state_dict(sd,
strict=False)`` then reports only ``fc.*`` as missing for a pretrained backbone.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fastsiam
from fastsiam.files import atomic_path

# Every part of a fastsiam model a checkpoint can hold (the state-dict prefixes).
MODEL_PARTS = ("backbone", "projector", "predictor", "fc")
LINEAR_FORMAT = "fastsiam-linear"
_NECK_LAYER = re.compile(r"^(fc|bn)(\d+)\.(.+)$")


class WeightsError(ValueError):
    """A weight file cannot be read or does not fit the model; the message names the file."""


# --------------------------------------------------------------------------------------------
# reading


def read_weights(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or state dict file safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise WeightsError(
            f"{path}: refused: the file holds a pickled Python object{what} that only an unrestricted "
            f"unpickler would build, and unpickling can run arbitrary code. If you trust the file, "
            f"re-save its tensors only: torch.save(torch.load(f, weights_only=False)['state_dict'], 'clean.pt')"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: not a readable PyTorch weight file: {first}") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict (checkpoint or state dict), got {type(obj).__name__}")
    return dict(obj)


def detect_format(obj: Mapping[str, Any]) -> str:
    """``fastsiam``, ``fastsiam-linear``, ``official``, ``mmpretrain`` or ``torchvision``."""
    if obj.get("format") == LINEAR_FORMAT:
        return LINEAR_FORMAT
    sd = _state_dict_of(obj, source="<checkpoint>")
    keys = list(_strip_module(sd))
    if any(k.startswith("encoder.") for k in keys):
        return "official"
    if any(k.startswith(("neck.", "head.", "data_preprocessor.")) for k in keys):
        return "mmpretrain"
    if any(k.startswith(("backbone.", "projector.", "predictor.")) for k in keys):
        return "fastsiam"
    return "torchvision"


#: What ``Trainer.load_state_dict`` needs from a checkpoint to continue a run.
RESUME_KEYS = ("model", "optimizer", "epoch", "step", "rng")
_FORMAT_NAMES = {"fastsiam": "a fastsiam model checkpoint", "official": "an official SimSiam checkpoint",
                 "mmpretrain": "an mmpretrain checkpoint", "torchvision": "a torchvision ResNet state dict"}


def describe_checkpoint(obj: Mapping[str, Any]) -> str:
    """What a loaded checkpoint file holds, in a few words for an error message
    ("a torchvision ResNet state dict (62 tensors)", "a fastsiam training checkpoint (epoch 3,
    step 120)"), so a refusal can say what the user gave, not only what was expected."""
    return _describe(obj)[0]


def _describe(obj: Mapping[str, Any]) -> tuple[str, bool]:
    """``(description, whether it is model weights in a format fastsiam reads)``."""
    if not obj:
        return "an empty dict", False
    if obj.get("format") == LINEAR_FORMAT:
        return "a fastsiam linear classifier checkpoint", True
    if all(k in obj for k in RESUME_KEYS):
        return f"a fastsiam training checkpoint (epoch {obj['epoch']}, step {obj['step']})", True
    try:
        fmt = detect_format(obj)
        sd = _state_dict_of(obj, source="<checkpoint>")
    except WeightsError:
        return f"a dict with keys {_listing(map(str, obj))} (not a recognised checkpoint)", False
    if fmt == "fastsiam":
        return f"{_FORMAT_NAMES[fmt]} without {', '.join(sorted(k for k in RESUME_KEYS if k not in obj))}", True
    if fmt == "torchvision" and any(_canonical_key(k) is None for k in _strip_module(sd)):
        return f"a state dict of {len(sd)} tensors that is not a ResNet's (keys {_listing(sd)})", False
    return f"{_FORMAT_NAMES[fmt]} ({len(sd)} tensors)", True


def check_resumable(state: Mapping[str, Any], path: str | Path) -> None:
    """Refuse, in one :class:`WeightsError` line naming ``path``, a checkpoint ``--resume``
    cannot continue from: weights of any format (they hold no optimizer, step or RNG state),
    or a training checkpoint whose entries have the wrong types. Call it before
    ``Trainer.load_state_dict``, which would otherwise fail with a ``KeyError`` traceback."""
    if any(k not in state for k in RESUME_KEYS):
        what, is_weights = _describe(state)
        raise WeightsError(f"{path}: --resume needs a fastsiam training checkpoint (the epoch_*.pt or step_*.pt "
                           f"that fastsiam train writes: {', '.join(RESUME_KEYS)}); this is {what}"
                           + (", weights for knn/linear --pretrained" if is_weights else ""))
    for key, ok, expected in (
        ("model", isinstance(state["model"], Mapping), "a state dict"),
        ("optimizer", isinstance(state["optimizer"], Mapping) and "param_groups" in state["optimizer"],
         "an optimizer state dict"),
        ("epoch", isinstance(state["epoch"], int) and not isinstance(state["epoch"], bool), "an integer"),
        ("step", isinstance(state["step"], int) and not isinstance(state["step"], bool), "an integer"),
        ("rng", isinstance(state["rng"], Mapping), "a dict of RNG states"),
    ):
        if not ok:
            value = state[key]
            shown = repr(value) if isinstance(value, (int, float, str)) and len(repr(value)) <= 40 else \
                type(value).__name__
            raise WeightsError(f"{path}: a damaged training checkpoint: '{key}' is {shown}, not {expected}")


def canonical_state_dict(obj: Mapping[str, Any], source: str = "<checkpoint>") -> dict[str, Tensor]:
    """Convert any recognised checkpoint (see the module docstring) to canonical keys."""
    sd = _strip_module(_state_dict_of(obj, source))
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    official_fc_bias: Tensor | None = None
    for key, value in sd.items():
        if key.startswith("data_preprocessor."):
            continue  # mmpretrain's normalization buffers
        new = _canonical_key(key)
        if new == "official-projector-bias":
            official_fc_bias = value
        elif new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise WeightsError(f"{source}: unexpected keys for a ResNet/SimSiam checkpoint: {_listing(unknown)}")
    if official_fc_bias is not None:
        # BN(Wx + b) with running mean m equals BN(Wx) with running mean m - b.
        key = "projector.7.running_mean"
        if key not in out:
            raise WeightsError(f"{source}: encoder.fc.6.bias present but encoder.fc.7.running_mean missing")
        out[key] = out[key] - official_fc_bias.to(out[key].dtype)
    return out


def _state_dict_of(obj: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    """The state dict inside a checkpoint (under ``state_dict`` or ``model``) or ``obj`` itself."""
    sd = obj
    for container in ("state_dict", "model"):
        if isinstance(obj.get(container), Mapping):
            sd = obj[container]
            break
    non_tensor = [str(k) for k, v in sd.items() if not isinstance(v, Tensor)]
    if non_tensor:
        raise WeightsError(f"{source}: expected a state dict of tensors (bare, or under 'state_dict' or "
                           f"'model'); found other entries: {_listing(non_tensor)}")
    if not sd:
        raise WeightsError(f"{source}: the state dict is empty")
    return dict(sd)


def _strip_module(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that DataParallel/DDP adds to every key."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _canonical_key(key: str) -> str | None:
    """The canonical name of one key (``None``: unknown)."""
    head, _, rest = key.partition(".")
    if head in MODEL_PARTS:
        return key
    if head == "encoder":  # official SimSiam: projector lives in encoder.fc
        if rest.startswith("fc."):
            if rest == "fc.6.bias":
                return "official-projector-bias"
            return "projector." + rest[len("fc."):]
        return "backbone." + rest
    if head == "neck":
        return _neck_key("projector", rest)
    if head == "head":
        if rest.startswith("predictor."):
            return _neck_key("predictor", rest[len("predictor."):])
        if rest.startswith("fc."):
            return rest
        return None
    if key.startswith("fc."):
        return key  # torchvision classifier
    if head in ("conv1", "bn1") or re.match(r"^layer\d$", head):
        return "backbone." + key
    return None


def _neck_key(part: str, rest: str) -> str | None:
    m = _NECK_LAYER.match(rest)
    if m is None:
        return None
    kind, i, param = m.group(1), int(m.group(2)), m.group(3)
    return f"{part}.{3 * i + (0 if kind == 'fc' else 1)}.{param}"


def _listing(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------
# loading into models


def load_parts(
    model: nn.Module,
    canonical: Mapping[str, Tensor],
    parts: Iterable[str],
    source: str = "<checkpoint>",
) -> None:
    """Copy the canonical weights of ``parts`` into ``model`` (strict for those parts).

    ``model`` has canonical attribute names (:class:`fastsiam.model.SimSiam`,
    :class:`fastsiam.classifier.LinearClassifier`). Parts not named are left alone, so a full
    SimSiam checkpoint can feed a classifier's backbone. Missing keys, unexpected keys and
    shape mismatches raise :class:`WeightsError` listing them.
    """
    parts = tuple(parts)
    bad = [p for p in parts if p not in MODEL_PARTS]
    if bad:
        raise ValueError(f"unknown parts {bad}; expected some of {MODEL_PARTS}")
    prefixes = tuple(p + "." for p in parts)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    given = {k: v for k, v in canonical.items() if k.startswith(prefixes)}
    present = sorted({k.split(".", 1)[0] for k in canonical})
    for p in parts:
        if not any(k.startswith(p + ".") for k in given):
            raise WeightsError(f"{source}: has no {p} weights (it holds: {', '.join(present) or 'nothing'})")
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    if missing or unexpected:
        msg = []
        if missing:
            msg.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_listing(unexpected)}")
        raise WeightsError(f"{source}: does not fit the model: {'; '.join(msg)}")
    shapes = [f"{k} {tuple(given[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if given[k].shape != v.shape]
    if shapes:
        raise WeightsError(f"{source}: shape mismatch (wrong backbone or num_classes?): {_listing(shapes, 4)}")
    model.load_state_dict(given, strict=False)


def load_pretrained(model: nn.Module, path: str | Path, parts: Iterable[str]) -> dict[str, Any]:
    """Read ``path`` (any recognised format) and load ``parts`` into ``model``; returns the
    file's top-level dict (for its config, classes...)."""
    obj = read_weights(path)
    load_parts(model, canonical_state_dict(obj, str(path)), parts, str(path))
    return obj


# --------------------------------------------------------------------------------------------
# writing


def torchvision_state_dict(canonical: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone (and ``fc`` if present) under torchvision ResNet names."""
    out = {k[len("backbone."):]: v for k, v in canonical.items() if k.startswith("backbone.")}
    if not out:
        raise WeightsError("no backbone weights to export")
    out.update({k: v for k, v in canonical.items() if k.startswith("fc.")})
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def export_torchvision(source: nn.Module | str | Path, out: str | Path) -> tuple[Path, str]:
    """Write a torchvision-compatible ResNet state dict from a model or any recognised file.

    Returns the file and the torchvision constructor that loads it (``resnet18``...)."""
    if isinstance(source, nn.Module):
        canonical = dict(source.state_dict())
    else:
        canonical = canonical_state_dict(read_weights(source), str(source))
    sd = torchvision_state_dict(canonical)
    arch = torchvision_arch(sd)
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.save(sd, tmp)
    return out, arch


# (bottleneck blocks?, blocks in layer3) -> torchvision constructor
_ARCHS = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101",
          (True, 36): "resnet152"}


def torchvision_arch(sd: Mapping[str, Tensor]) -> str:
    """The torchvision ResNet whose layout ``sd`` has, from its block type and depth."""
    bottleneck = "layer1.0.conv3.weight" in sd
    blocks = len({k.split(".")[1] for k in sd if k.startswith("layer3.")})
    arch = _ARCHS.get((bottleneck, blocks))
    if arch is None:
        raise ValueError(f"not a torchvision ResNet layout ({'bottleneck' if bottleneck else 'basic'} blocks, "
                         f"{blocks} in layer3)")
    return arch


def save_linear_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    config: Mapping[str, Any],
    classes: list[str] | None,
    top1: float | None,
    top5: float | None,
    epoch: int,
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a linear classifier in the ``fastsiam-linear`` format (module docstring);
    ``train_state`` (optimizer, RNG, epoch and step) lets ``fastsiam linear --resume`` continue."""
    state = {
        "format": LINEAR_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": dict(config),
        "classes": list(classes) if classes is not None else None,
        "top1": top1,
        "top5": top5,
        "epoch": epoch,
        "fastsiam_version": fastsiam.__version__,
    }
    if train_state is not None:
        state["train_state"] = dict(train_state)
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def classes_of(obj: Mapping[str, Any]) -> list[str] | None:
    """Class names stored in a checkpoint: fastsiam's ``classes`` or mmpretrain's
    ``meta.dataset_meta.classes``."""
    names = obj.get("classes")
    if names is None:
        meta = obj.get("meta")
        if isinstance(meta, Mapping) and isinstance(meta.get("dataset_meta"), Mapping):
            names = meta["dataset_meta"].get("classes")
    return [str(n) for n in names] if names is not None else None
