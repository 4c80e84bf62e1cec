"""Typed configuration: the schema, YAML loading with ``_base_`` inheritance, dotted overrides.

A config file is YAML with the sections below (every key optional, defaults are the SimSiam
recipe). ``_base_: other.yaml`` (or a list) merges the named files first, relative to the
including file; later files and then command-line overrides win key by key. Every error is
a :class:`ConfigError` with one line naming the file, the dotted key and what was expected.

Field metadata carries validation: ``choices`` (allowed strings), ``min``/``max`` (inclusive
bounds), and ``help`` (shown by ``fastsiam train --help-config``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, reported as one line naming the file and key."""


def _f(default: Any = dataclasses.MISSING, *, help: str = "", **meta: Any) -> Any:
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    backend: str = _f("pil", help="loader backend: pil | ffcv | dali | nvjpeg | synthetic")
    train_path: str = _f("", help="training data: ImageFolder dir (pil), .beton (ffcv), shards dir (dali/nvjpeg)")
    val_path: str | None = _f(None, help="validation data in the same format, for kNN and linear eval")
    batch_size: int = _f(32, min=1, help="images per GPU (per process) per step")
    workers: int = _f(8, min=0, help="loader worker processes/threads per process")
    image_size: int = _f(224, min=8, help="side of the square crops fed to the model")
    scale: list[float] = _f([0.2, 1.0], length=2, min=0.0, max=1.0, help="RandomResizedCrop area range")
    ratio: list[float] = _f([0.75, 1.3333333333333333], length=2, min=0.0, help="RandomResizedCrop aspect range")
    options: dict[str, Any] = _f({}, help="backend-specific keyword arguments")
    on_corrupt: str = _f("stop", choices=["stop", "skip"], help="a sample that fails to decode: stop "
                         "with an error naming its shard/file and sample, or skip it (logged and counted)")


@dataclass
class AugConfig:
    hflip_p: float = _f(0.5, min=0.0, max=1.0)
    color_jitter_p: float = _f(0.8, min=0.0, max=1.0)
    brightness: float = _f(0.4, min=0.0)
    contrast: float = _f(0.4, min=0.0)
    saturation: float = _f(0.4, min=0.0)
    hue: float = _f(0.1, min=0.0, max=0.5)
    grayscale_p: float = _f(0.2, min=0.0, max=1.0)
    blur_p: float = _f(0.5, min=0.0, max=1.0)
    blur_sigma: list[float] = _f([0.1, 2.0], length=2, min=0.0)
    blur_kernel_size: int = _f(23, min=1, help="odd; the official recipe uses 10% of 224 px, rounded to odd")
    solarize_p: float = _f(0.0, min=0.0, max=1.0, help="off for SimSiam; BYOL-style configs use 0.2")
    solarize_threshold: float = _f(0.5, min=0.0, max=1.0)
    mean: list[float] = _f([0.485, 0.456, 0.406], length=3)
    std: list[float] = _f([0.229, 0.224, 0.225], length=3, min=1e-6)


@dataclass
class ModelConfig:
    backbone: str = _f("resnet50", choices=["resnet18", "resnet34", "resnet50"])
    dim: int = _f(2048, min=1, help="projector output dimension")
    pred_dim: int = _f(512, min=1, help="predictor hidden dimension")
    small_input: bool = _f(False, help="3x3 stride-1 stem, no max-pool (images <= 64 px)")
    sync_bn: bool = _f(True, help="SyncBatchNorm under DDP, as the official recipe")
    num_classes: int = _f(1000, min=1, help="classes of the linear classifier (linear eval)")


@dataclass
class OptimConfig:
    name: str = _f("sgd", choices=["sgd", "lars"])
    lr: float = _f(0.05, min=0.0, help="base lr per 256 images; the run uses lr x global_batch / 256")
    momentum: float = _f(0.9, min=0.0, max=1.0)
    weight_decay: float = _f(1e-4, min=0.0)
    fix_pred_lr: bool = _f(True, help="keep the predictor at the initial lr (the official recipe)")
    exclude_1d_from_wd: bool = _f(False, help="no weight decay (nor LARS adaptation) for 1-D params")
    trust_coefficient: float = _f(0.001, min=0.0, help="LARS trust coefficient")
    impl: str = _f("auto", choices=["auto", "torch", "foreach", "fused", "apex"],
                   help="auto: fused on CUDA, foreach on CPU; torch: plain torch.optim.SGD")


@dataclass
class ScheduleConfig:
    name: str = _f("cosine", choices=["cosine", "cosine_epoch", "constant"],
                   help="cosine: per step; cosine_epoch: the official per-epoch cosine")
    warmup_epochs: float = _f(0.0, min=0.0)
    min_lr: float = _f(0.0, min=0.0, help="final lr as a fraction of the peak")


@dataclass
class TrainConfig:
    epochs: int = _f(100, min=1)
    device: str = _f("auto", help="auto | cpu | cuda | cuda:N")
    amp: str = _f("bf16", choices=["none", "bf16", "fp16"], help="autocast dtype on CUDA (CPU: bf16 or none)")
    channels_last: bool = _f(True)
    step: str = _f("eager", choices=["eager", "graph"], help="graph: capture the step once as a CUDA graph")
    seed: int = _f(0, min=0)
    deterministic: bool = _f(False, help="bit-reproducible on the CPU (slower)")
    max_steps: int | None = _f(None, min=1, help="stop after this many optimizer steps")
    log_every: int = _f(10, min=1, help="steps between host syncs for logging")
    on_nonfinite: str = _f("stop", choices=["stop", "skip"],
                           help="a non-finite loss: stop with a debug checkpoint, or skip that step's update")
    max_skipped_steps: int = _f(20, min=1, help="with on_nonfinite=skip: stop as 'stop' does after this "
                                "many consecutive skipped steps")


@dataclass
class EvalConfig:
    knn_every: int = _f(0, min=0, help="epochs between kNN monitor runs on data.val_path (0: off); "
                        "when on, the random-init network is measured first and the last epoch always")
    knn_k: int = _f(200, min=1)
    knn_temperature: float = _f(0.07, min=1e-6)
    pretrained: str | None = _f(None, help="checkpoint for linear/kNN evaluation")


@dataclass
class DistConfig:
    backend: str = _f("auto", choices=["auto", "nccl", "gloo"], help="auto: nccl on CUDA, gloo on CPU")


@dataclass
class OutputConfig:
    work_dir: str | None = _f(None, help="default: work_dirs/<config file stem>")
    keep_last: int = _f(3, min=1, help="checkpoints kept besides the best")
    tensorboard: bool = _f(False)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    name: str = _f("fastsiam", help="run name; set from the config file's stem when loaded")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (with its ``_base_`` chain), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        raw = _read_with_bases(path, chain=())
        source = str(path)
        raw.setdefault("name", path.stem)
    overridden = {_apply_override(raw, item) for item in overrides or []}
    return _build(Config, raw, _Origin(source, frozenset(overridden)), prefix="")


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from a plain nested dict."""
    return _build(Config, raw, _Origin(source, frozenset()), prefix="")


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        where = f" (included from {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(str(p) for p in (*chain, resolved))}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, _read_with_bases(path.parent / base, chain=(*chain, resolved)))
    merged.pop("name", None)  # a run is named after the file the user gave, not its bases
    return _merge(merged, data)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set ``section.key=value`` (value parsed as YAML) in ``raw``; return the dotted key."""
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return key.strip()


@dataclass(frozen=True)
class _Origin:
    """Where values came from: the config file, except keys overridden on the command line."""

    source: str
    overridden: frozenset[str]

    def of(self, dotted: str) -> str:
        return "command line" if dotted in self.overridden else self.source


def _build(cls: type, raw: Any, origin: _Origin, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin.of(prefix.rstrip('.'))}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{origin.of(dotted)}: unknown key '{dotted}'{hint}")
        f = fields[key]
        hint_t = typing.get_type_hints(cls)[key]
        if dataclasses.is_dataclass(hint_t):
            kwargs[key] = _build(hint_t, value if value is not None else {}, origin, dotted + ".")
        else:
            kwargs[key] = _check(value, hint_t, f.metadata, dotted, origin)
    return cls(**kwargs)


def _check(value: Any, hint: Any, meta: typing.Mapping[str, Any], key: str, src: _Origin) -> Any:
    where = src.of(key)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 5e-4 (no dot) as a string; take it as the number it means.
        with contextlib.suppress(ValueError):
            value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        n = meta.get("length")
        if n is not None and len(value) != n:
            raise ConfigError(f"{where}: '{key}' must have {n} items, got {len(value)}: {value!r}")
        value = [_check(v, args[0], {k: meta[k] for k in ("min", "max") if k in meta}, key, src) for v in value]
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return value
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be {expected}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint_s = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {value!r}{hint_s}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: '{key}' must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: '{key}' must be <= {hi}, got {value!r}")
    return value


def describe() -> str:
    """All keys with defaults and help, for ``--help-config``."""
    lines = []
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        if not dataclasses.is_dataclass(cls):
            continue
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            h = f.metadata.get("help", "")
            lines.append(f"  {f.name}: {default!r}" + (f"    # {h}" if h else ""))
    return "\n".join(lines)
