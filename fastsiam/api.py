"""The Python API, shaped like mmpretrain's: ``list_models``, ``get_model``, ``inference_model``.

Model names are mmpretrain's model-card names for SimSiam; each maps to a config in
``configs/``. ``pretrained`` is always a local file in any format :mod:`fastsiam.weights`
reads (fastsiam, official SimSiam, mmpretrain, torchvision): nothing is ever downloaded.

Example::

    import fastsiam
    model = fastsiam.get_model("simsiam_resnet50_8xb32-coslr-100e_in1k", pretrained="last.pt")
    feats = model.extract_feat(images)           # [B, 2048] pooled backbone features
    clf = fastsiam.get_model("resnet50_simsiam-100e-pre_8xb512-linear-coslr-90e_in1k",
                             pretrained="work_dirs/linear/last.pt")
    fastsiam.inference_model(clf, "cat.jpg")     # {"pred_label", "pred_score", "pred_class", ...}
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from fastsiam.classifier import LinearClassifier
from fastsiam.config import TASKS, Config, from_dict, load_config
from fastsiam.dist import resolve_device
from fastsiam.imageio import to_rgb
from fastsiam.model import SimSiam
from fastsiam.weights import (
    LINEAR_FORMAT,
    canonical_state_dict,
    classes_of,
    detect_format,
    load_parts,
    read_weights,
)

# The parts of the model each task's checkpoint holds (weights.MODEL_PARTS: every part).
PARTS_OF_TASK = {"pretrain": ("backbone", "projector", "predictor"), "linear": ("backbone", "fc")}


@dataclass(frozen=True)
class ModelCard:
    """One entry of the model card: its config (which says the task) and the published reference."""

    config: str
    weights_url: str | None = None  # where mmpretrain publishes weights (never fetched here)
    top1: float | None = None       # published linear top-1 on ImageNet-1k val


_MM = "https://download.openmmlab.com/mmselfsup/1.x/simsiam/"
MODELS: dict[str, ModelCard] = {
    "simsiam_resnet50_8xb32-coslr-100e_in1k": ModelCard(
        "simsiam_resnet50_8xb32-coslr-100e_in1k.yaml",
        _MM + "simsiam_resnet50_8xb32-coslr-100e_in1k/simsiam_resnet50_8xb32-coslr-100e_in1k_20220825-d07cb2e6.pth"),
    "simsiam_resnet50_8xb32-coslr-200e_in1k": ModelCard(
        "simsiam_resnet50_8xb32-coslr-200e_in1k.yaml",
        _MM + "simsiam_resnet50_8xb32-coslr-200e_in1k/simsiam_resnet50_8xb32-coslr-200e_in1k_20220825-efe91299.pth"),
    "resnet50_simsiam-100e-pre_8xb512-linear-coslr-90e_in1k": ModelCard(
        "resnet50_simsiam-100e-pre_8xb512-linear-coslr-90e_in1k.yaml",
        _MM + "simsiam_resnet50_8xb32-coslr-100e_in1k/resnet50_linear-8xb512-coslr-90e_in1k/"
        "resnet50_linear-8xb512-coslr-90e_in1k_20220825-f53ba400.pth", top1=68.3),
    "resnet50_simsiam-200e-pre_8xb512-linear-coslr-90e_in1k": ModelCard(
        "resnet50_simsiam-200e-pre_8xb512-linear-coslr-90e_in1k.yaml",
        _MM + "simsiam_resnet50_8xb32-coslr-200e_in1k/resnet50_linear-8xb512-coslr-90e_in1k/"
        "resnet50_linear-8xb512-coslr-90e_in1k_20220825-519b5135.pth", top1=69.8),
}


class SimSiamModel(SimSiam):
    """:class:`fastsiam.model.SimSiam` that also takes one batch: ``model(x)`` returns the
    pooled backbone features (mmpretrain's ``tensor`` mode); ``model(x1, x2)`` trains."""

    def forward(self, x1: Tensor, x2: Tensor | None = None) -> Any:  # type: ignore[override]
        if x2 is None:
            return self.extract_feat(x1)
        return super().forward(x1, x2)


def config_dir() -> Path:
    """The folder holding the model card's configs: ``fastsiam/configs``, in a checkout a link
    to the repository's ``configs/``, in an installed wheel a copy."""
    return Path(__file__).resolve().parent / "configs"


def list_models(pattern: str | None = None) -> list[str]:
    """Model-card names, optionally filtered by a shell-style ``pattern`` (``"*linear*"``)."""
    names = sorted(MODELS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def resolve(name_or_config: str | Path | Config, task: str | None = None) -> tuple[Config, str, str]:
    """``(config, task, name)`` for a model-card name, a YAML config path or a :class:`Config`.

    The task is the config's ``task`` key unless ``task`` is given.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if isinstance(name_or_config, Config):
        cfg = name_or_config
        return cfg, task or cfg.task, cfg.name
    text = str(name_or_config)
    if text in MODELS:
        card = MODELS[text]
        path = config_dir() / card.config
        if not path.is_file():
            raise FileNotFoundError(f"model {text}: its config {path} is missing from this installation")
        cfg = load_config(path)
        return cfg, task or cfg.task, text
    path = Path(text)
    if path.suffix in (".yaml", ".yml"):
        cfg = load_config(path)
        return cfg, task or cfg.task, cfg.name
    import difflib

    close = difflib.get_close_matches(text, list(MODELS), n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known models: {', '.join(list_models())}"
    raise ValueError(f"{text!r} is neither a model name nor a .yaml config{hint}")


def build_model(cfg: Config, task: str, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised model for ``task``: :class:`SimSiamModel` or
    :class:`fastsiam.classifier.LinearClassifier` with ``num_classes`` outputs (default
    ``model.num_classes``)."""
    m = cfg.model
    if task == "linear":
        num_classes = num_classes or m.num_classes
        if num_classes is None:
            raise ValueError(f"{cfg.name}: model.num_classes is null (taken from the data by fastsiam linear); "
                             f"set it, or pass the linear run's checkpoint as pretrained")
        return LinearClassifier(m.backbone, num_classes, m.small_input)
    if task == "pretrain":
        return SimSiamModel(m.backbone, m.dim, m.pred_dim, m.small_input)
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def get_model(
    name_or_config: str | Path | Config,
    pretrained: str | Path | bool | None = None,
    device: str | torch.device | None = None,
    task: str | None = None,
) -> nn.Module:
    """Build a model by model-card name, config or fastsiam checkpoint, load weights, eval mode.

    Args:
        name_or_config: a name from :func:`list_models`, a ``.yaml`` config, a :class:`Config`,
            or a fastsiam checkpoint file (``.pt``) whose stored config describes the model.
        pretrained: a local weight file in any format :mod:`fastsiam.weights` reads; every
            weight of the model must be in it (missing or unexpected keys are an error).
            ``True`` without a file is an error that says where to get one.
        device: where to put the model: ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``.
        task: ``pretrain`` or ``linear`` instead of the config's ``task``.

    The model gets two attributes for :func:`inference_model`: ``cfg`` (its :class:`Config`)
    and ``classes`` (class names from the checkpoint, or ``None``).
    """
    obj = None
    if _is_weight_file(name_or_config):
        cfg, task, obj = _from_checkpoint(Path(name_or_config), task)
        name = str(name_or_config)
        if pretrained is None or pretrained is True:
            pretrained = name
        elif Path(pretrained) != Path(name):
            obj = None
    else:
        cfg, task, name = resolve(name_or_config, task)
    if pretrained is True:
        card = MODELS.get(name)
        where = f" (mmpretrain publishes {name} at {card.weights_url})" if card and card.weights_url else ""
        raise ValueError(f"pretrained=True needs a file: fastsiam downloads nothing. Get the weights yourself{where} "
                         f"or train them (fastsiam train / fastsiam linear), then pass pretrained='path/to/file'")
    if pretrained:
        obj = obj if obj is not None else read_weights(pretrained)
    weights = canonical_state_dict(obj, str(pretrained)) if obj is not None else None
    # A null model.num_classes was the data's count when the head trained: the head says it.
    fc = weights.get("fc.weight") if weights is not None and cfg.model.num_classes is None else None
    model = build_model(cfg, task, num_classes=int(fc.shape[0]) if fc is not None else None)
    classes = None
    if weights is not None:
        load_parts(model, weights, PARTS_OF_TASK[task], str(pretrained))
        classes = classes_of(obj)
        if classes is not None and isinstance(model, LinearClassifier) and len(classes) != model.num_classes:
            raise ValueError(f"{pretrained}: names {len(classes)} classes but its head has {model.num_classes} "
                             f"outputs; it was trained with a wrong model.num_classes, retrain it")
    model.cfg = cfg
    model.classes = classes
    return model.to(resolve_device(str(device), key="device") if device is not None else torch.device("cpu")).eval()


def _is_weight_file(x: Any) -> bool:
    return isinstance(x, (str, Path)) and str(x) not in MODELS and Path(x).suffix in (".pt", ".pth", ".tar")


def _from_checkpoint(path: Path, task: str | None) -> tuple[Config, str, dict[str, Any]]:
    obj = read_weights(path)
    fmt = detect_format(obj)
    if fmt not in ("fastsiam", LINEAR_FORMAT) or not isinstance(obj.get("config"), dict):
        raise ValueError(f"{path}: a {fmt} checkpoint does not say which model it is; give a model name "
                         f"or config and pass this file as pretrained")
    cfg = from_dict(obj["config"], source=str(path))
    return cfg, task or ("linear" if fmt == LINEAR_FORMAT else "pretrain"), obj


def _imagenet_classes() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])  # shipped with torchvision


def load_image(image: str | Path | np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from a path, an ``H x W x 3`` uint8 RGB array or a PIL image.

    16-bit and float images are rescaled, not clipped (:func:`fastsiam.imageio.to_rgb`). An
    image without pixels, a file PIL cannot decode and one over PIL's decompression-bomb limit
    are a one-line ``ValueError`` naming the input, not an error from deep inside PIL or the
    resize.
    """
    if isinstance(image, Image.Image):
        return _with_pixels(to_rgb(image), f"image (PIL, mode {image.mode})")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
        return _with_pixels(Image.fromarray(image), f"image array {image.shape}")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    try:
        with Image.open(path) as img:
            return _with_pixels(to_rgb(img), f"image {path}")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: refused, a possible decompression bomb ({e}); raise "
                         f"PIL.Image.MAX_IMAGE_PIXELS if the image is real") from None
    except (OSError, SyntaxError) as e:  # PIL's errors for files that are not (whole) images
        raise ValueError(f"{path}: not a readable image: {e}") from None


def _with_pixels(img: Image.Image, what: str) -> Image.Image:
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{what} has no pixels ({img.width}x{img.height})")
    return img


@torch.no_grad()
def inference_model(
    model: str | Path | Config | nn.Module,
    image: str | Path | np.ndarray | Image.Image,
    pretrained: str | Path | bool | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Run one image through a model (a name, config or checkpoint is built with
    :func:`get_model` first).

    Preprocessing is the evaluation view: short side resized to ``image_size / 0.875``,
    center crop ``image_size``, the config's mean/std. A linear classifier returns
    ``{"pred_label": int, "pred_score": float, "pred_class": str, "pred_scores": ndarray}``
    (softmax); a pretraining model returns ``{"features": ndarray}`` (pooled backbone).
    ``device`` ``auto`` picks a GPU when there is one.
    """
    from fastsiam.data.pil_loader import eval_transform
    from fastsiam.features import normalize_view

    dev = resolve_device(str(device), key="device") if device is not None else None
    if not isinstance(model, nn.Module):
        model = get_model(model, pretrained=pretrained, device=dev)
    elif dev is not None:
        model = model.to(dev)
    cfg: Config = getattr(model, "cfg", None) or Config()
    param = next(model.parameters())
    view = eval_transform(cfg.data.image_size)(load_image(image)).unsqueeze(0).to(param.device)
    x = normalize_view(view, cfg.aug.mean, cfg.aug.std)
    model.eval()
    if not isinstance(model, LinearClassifier):
        return {"features": model.extract_feat(x)[0].float().cpu().numpy()}
    scores = torch.softmax(model(x)[0].float(), dim=0).cpu()
    label = int(scores.argmax())
    classes = getattr(model, "classes", None)
    if classes is None and model.num_classes == 1000:
        classes = _imagenet_classes()
    return {"pred_label": label, "pred_score": float(scores[label]),
            "pred_class": classes[label] if classes else str(label), "pred_scores": scores.numpy()}
