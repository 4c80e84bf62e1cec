"""Typed configuration: the schema, YAML loading with ``_base_`` inheritance, dotted overrides.

A config file is YAML with the sections below (every key optional, defaults are the SimSiam
recipe). ``_base_: other.yaml`` (or a list) merges the named files first, relative to the
including file; later files and then command-line overrides win key by key. Every error is
a :class:`ConfigError` with one line naming the file, the dotted key and what was expected.

Field metadata carries validation: ``choices`` (allowed strings), ``min``/``max`` (inclusive
bounds), ``gt`` (an exclusive lower bound), ``ordered`` (a ``[min, max]`` pair with min <= max)
and ``help`` (shown by ``fastsiam train --help-config``). Integers are 64-bit (torch's seeds
and sizes are C integers). ``data.options`` are checked the same way against the options
dataclass the backend registered (:mod:`fastsiam.data.options`, which imports no backend
library, so the options of a backend whose library is not installed are checked too).

Config files are small UTF-8 YAML without aliases (``*name``): an alias shares one node, and
anything that expands the config (``Config.to_dict``, ``--print-config``, a checkpoint's
stored config) multiplies shared nodes, so a few lines of nested aliases become gigabytes
(the "billion laughs"); ``_base_`` is how configs share values. Duplicate keys are refused
too, since YAML would silently keep only the last.
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


def setting(default: Any = dataclasses.MISSING, *, help: str = "", **meta: Any) -> Any:
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


TASKS = ("pretrain", "linear")
# ImageNet's per-channel mean and std on [0, 1] pixels (torchvision's, as the official recipe
# normalizes): the default of aug.mean/aug.std and of everything that normalizes without a config.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    backend: str = setting("pil", help="loader backend: one of those registered (fastsiam.data.register_backend), "
                           "listed with their options under data.options below")
    train_path: str = setting("", help="training data: ImageFolder dir (pil), .beton (ffcv), shards dir (dali/nvjpeg)")
    val_path: str | None = setting(None, help="validation data in the same format, for kNN and linear eval")
    batch_size: int = setting(32, min=1, help="images per GPU (per process) per step")
    workers: int = setting(8, min=0, help="loader worker processes/threads per process")
    image_size: int = setting(224, min=8, help="side of the square crops fed to the model")
    scale: list[float] = setting([0.2, 1.0], length=2, min=0.0, max=1.0, ordered=True,
                            help="RandomResizedCrop area range [min, max]")
    ratio: list[float] = setting([0.75, 1.3333333333333333], length=2, gt=0.0, ordered=True,
                            help="RandomResizedCrop aspect range [min, max]")
    options: dict[str, Any] = setting({}, help="the backend's own settings, checked against its options "
                                      "class (fastsiam.data.options), listed per backend below")
    on_corrupt: str = setting("stop", choices=["stop", "skip"], help="a sample that fails to decode: stop "
                         "with an error naming its shard/file and sample, or skip it (logged and counted)")


@dataclass
class AugConfig:
    hflip_p: float = setting(0.5, min=0.0, max=1.0)
    color_jitter_p: float = setting(0.8, min=0.0, max=1.0)
    brightness: float = setting(0.4, min=0.0)
    contrast: float = setting(0.4, min=0.0)
    saturation: float = setting(0.4, min=0.0)
    hue: float = setting(0.1, min=0.0, max=0.5)
    grayscale_p: float = setting(0.2, min=0.0, max=1.0)
    blur_p: float = setting(0.5, min=0.0, max=1.0)
    blur_sigma: list[float] = setting([0.1, 2.0], length=2, gt=0.0, ordered=True)
    blur_kernel_size: int = setting(23, min=1, odd=True, help="odd; the official recipe uses 10% of 224 px, rounded to odd")
    solarize_p: float = setting(0.0, min=0.0, max=1.0, help="off for SimSiam; BYOL-style configs use 0.2")
    solarize_threshold: float = setting(0.5, min=0.0, max=1.0)
    mean: list[float] = setting(list(IMAGENET_MEAN), length=3)
    std: list[float] = setting(list(IMAGENET_STD), length=3, min=1e-6)
    fused_color: bool = setting(True, help="on CUDA: the augmentation as four runtime-compiled kernels from the "
                               "uint8 views to the output (torch.cuda._compile_kernel), checked against the "
                               "plain ops at first use; false: the plain torch ops (same results within rounding)")


@dataclass
class ModelConfig:
    backbone: str = setting("resnet50", choices=["resnet18", "resnet34", "resnet50"])
    dim: int = setting(2048, min=1, help="projector output dimension")
    pred_dim: int = setting(512, min=1, help="predictor hidden dimension")
    small_input: bool = setting(False, help="3x3 stride-1 stem, no max-pool (images <= 64 px)")
    sync_bn: bool = setting(True, help="SyncBatchNorm under DDP, as the official recipe")
    num_classes: int | None = setting(None, min=1, help="outputs of the linear classifier (linear eval); "
                                 "null: the training data's class count")


@dataclass
class OptimConfig:
    name: str = setting("sgd", choices=["sgd", "lars"])
    lr: float = setting(0.05, min=0.0, max=1e30, help="base lr per 256 images; the run uses lr x global_batch / 256 "
                   "(at most 1e30: that must fit the float32 lr tensors; a diverging lr stops at a non-finite loss)")
    momentum: float = setting(0.9, min=0.0, max=1.0)
    weight_decay: float = setting(1e-4, min=0.0, max=1.0, help="at most 1 (recipes use 1e-6 to 0.1)")
    fix_pred_lr: bool = setting(True, help="keep the predictor at the initial lr (the official recipe)")
    exclude_1d_from_wd: bool = setting(False, help="no weight decay (nor LARS adaptation) for 1-D params")
    trust_coefficient: float = setting(0.001, min=0.0, help="LARS trust coefficient")
    impl: str = setting("auto", choices=["auto", "torch", "foreach", "fused", "apex"],
                   help="auto: fused on CUDA, foreach on CPU; torch: plain torch.optim.SGD")


@dataclass
class ScheduleConfig:
    name: str = setting("cosine", choices=["cosine", "cosine_epoch", "constant"],
                   help="cosine: per step; cosine_epoch: the official per-epoch cosine")
    warmup_epochs: float = setting(0.0, min=0.0)
    min_lr: float = setting(0.0, min=0.0, max=1.0, help="final lr as a fraction of the peak")


@dataclass
class TrainConfig:
    epochs: int = setting(100, min=1)
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N")
    amp: str = setting("bf16", choices=["none", "bf16", "fp16"], help="autocast dtype on CUDA (CPU: bf16 or none)")
    channels_last: bool = setting(True)
    step: str = setting("eager", choices=["eager", "graph"], help="graph: capture the step once as a CUDA graph")
    seed: int = setting(0, min=0)
    deterministic: bool = setting(False, help="bit-reproducible on the CPU (slower)")
    max_steps: int | None = setting(None, min=1, help="stop after this many optimizer steps")
    accumulate_steps: int = setting(1, min=1, help="fastsiam linear: micro-batches of data.batch_size per optimizer "
                               "step (the batch and lr are those of batch_size x this; pretraining refuses it)")
    log_every: int = setting(10, min=1, help="steps between host syncs for logging")
    on_nonfinite: str = setting("stop", choices=["stop", "skip"],
                           help="a non-finite loss: stop with a debug checkpoint, or skip that step's update")
    max_skipped_steps: int = setting(20, min=1, help="with on_nonfinite=skip: stop as 'stop' does after this "
                                "many consecutive skipped steps")


@dataclass
class EvalConfig:
    knn_every: int = setting(0, min=0, help="epochs between kNN monitor runs on data.val_path (0: off); "
                        "when on, the random-init network is measured first and the last epoch always")
    knn_k: int = setting(200, min=1)
    knn_temperature: float = setting(0.07, min=1e-6)
    pretrained: str | None = setting(None, help="checkpoint for linear/kNN evaluation")
    online_probe: bool | None = setting(None, help="train a linear classifier on the detached features "
                                        "of view 1 during pretraining, scored on data.val_path after "
                                        "every epoch (fastsiam.probe); null: on when the data has "
                                        "labels and a val split")
    online_probe_lr: float = setting(0.1, min=0.0, help="the probe's peak lr (not scaled by the batch), "
                                     "on the schedule's curve; momentum SGD, no weight decay")


@dataclass
class DistConfig:
    backend: str = setting("auto", choices=["auto", "nccl", "gloo"], help="auto: nccl on CUDA, gloo on CPU")
    timeout_s: float = setting(1800.0, min=1.0, help="seconds a collective may wait for the other ranks before "
                          "the job fails (torch's default is 600; a kNN bank or a checkpoint on a slow "
                          "disk can take longer)")


@dataclass
class OutputConfig:
    work_dir: str | None = setting(None, help="default: work_dirs/<config file stem>; not inherited through _base_")
    keep_last: int = setting(3, min=1, help="checkpoints kept besides the best")
    tensorboard: bool = setting(False)


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
    name: str = setting("fastsiam", help="run name; set from the config file's stem when loaded")
    task: str = setting("pretrain", choices=list(TASKS),
                   help="the model the config describes: pretrain (SimSiam, fastsiam train) or linear "
                        "(a classifier on a frozen backbone, fastsiam linear); get_model and predict build it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# loading


MAX_CONFIG_BYTES = 1 << 20  # configs are a few KiB; a bigger file is a data file given by mistake


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
    return _finish(raw, _Origin(source, frozenset(overridden)))


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from a plain nested dict."""
    return _finish(raw, _Origin(source, frozenset()))


def _finish(raw: dict[str, Any], origin: _Origin) -> Config:
    cfg: Config = _build(Config, raw, origin, prefix="")
    _check_backend_options(cfg.data, origin)
    return cfg


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        where = f" (included from {chain[-1]})" if chain else ""
        what = "not a regular file" if path.exists() else "config file not found"
        raise ConfigError(f"{path}: {what}{where}")
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(str(p) for p in (*chain, resolved))}")
    try:
        data = _load_yaml(_read_text(path))
    except yaml.YAMLError as e:
        raise _yaml_error(e, str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("_base_", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        bad = next(b for b in bases if not isinstance(b, str)) if isinstance(bases, list) else bases
        raise ConfigError(f"{path}: '_base_' must be a file name or a list of file names, got {_show(bad)}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, _read_with_bases(path.parent / base, chain=(*chain, resolved)))
    # A run is named after the file the user gave, and lives in its own work dir: a config
    # built on another must not write into (and lock) its base's runs.
    merged.pop("name", None)
    if isinstance(merged.get("output"), dict):
        merged["output"].pop("work_dir", None)
    return _merge(merged, data)


def _read_text(path: Path) -> str:
    """The file's text. Checked before YAML sees it: PyYAML's errors for binary input do not
    name the file and span lines, and a huge file is read whole."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too big for a config (at most {MAX_CONFIG_BYTES}); "
                              "a config is a YAML text file")
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{path}: not a text file: NUL byte at offset {nul}; a config is a YAML text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file: byte 0x{data[e.start]:02x} at offset {e.start}; "
                          "a config is a YAML text file") from None


class _AliasRefused(yaml.MarkedYAMLError):
    """An alias in a config (a refusal, not a syntax error: the message does not say invalid)."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases and without duplicate keys (module docstring)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(problem=f"YAML alias *{event.anchor} refused (an alias shares a node, and "
                                        f"expanding nested aliases can take gigabytes); write the value out, "
                                        f"or share it through _base_", problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                with contextlib.suppress(TypeError):  # an unhashable key: SafeLoader's own error
                    if key in first:
                        raise yaml.constructor.ConstructorError(
                            problem=f"duplicate key {key!r} (first at line {first[key] + 1})",
                            problem_mark=key_node.start_mark)
                    first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_error(e: yaml.YAMLError, where: str, *, line: bool = True) -> ConfigError:
    """One line naming ``where`` (and the line) for a YAML error, which PyYAML spreads over several."""
    mark = getattr(e, "problem_mark", None)
    at = f" line {mark.line + 1}:" if mark and line else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if not isinstance(e, _AliasRefused):
        problem = f"invalid YAML: {problem}"
    return ConfigError(f"{where}:{at} {problem}")


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
    key = key.strip()
    parts = key.split(".")
    if not all(p.isidentifier() for p in parts):
        raise ConfigError(f"command line: override {item!r}: {key!r} is not a dotted key "
                          "(section.key=value, names separated by single dots)")
    try:
        value = _load_yaml(text) if text.strip() else ""
    except _AliasRefused as e:
        raise _yaml_error(e, f"command line: override {item!r}", line=False) from None
    except yaml.YAMLError:
        value = text  # not YAML (a path with ': ' in it...): the text as it is
    node = raw
    for i, p in enumerate(parts[:-1]):
        if p in node and not isinstance(node[p], dict):
            raise ConfigError(f"command line: override {item!r}: {'.'.join(parts[:i + 1])!r} is not a section "
                              f"(it holds {_show(node[p])})")
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return key


@dataclass(frozen=True)
class _Origin:
    """Where values came from: the config file, except keys overridden on the command line."""

    source: str
    overridden: frozenset[str]

    def of(self, dotted: str) -> str:
        """``command line`` for an overridden key, a key inside one (``data.options.x`` of
        ``data.options={...}``) or a key an override built (``train.seed`` of ``train.seed.x=1``)."""
        for key in self.overridden:
            if dotted and (dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")):
                return "command line"
        return self.source


def _build(cls: type, raw: Any, origin: _Origin, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin.of(prefix.rstrip('.'))}: {prefix.rstrip('.') or 'config'} must be a mapping, got {_show(raw)}")
    return cls(**_checked(cls, raw, origin, prefix))


def _checked(cls: type, raw: typing.Mapping[str, Any], origin: _Origin, prefix: str, *,
             noun: str = "key", owner: str = "") -> dict[str, Any]:
    """The keys of ``raw`` checked against the fields of the dataclass ``cls`` (their dotted
    names start with ``prefix``): an unknown key is refused with the closest field's name,
    a nested section is built, every other value is checked by :func:`_check`. ``noun`` and
    ``owner`` word the unknown-key error (``unknown option 'data.options.x' for the ffcv
    backend``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            if close:
                hint = f"did you mean '{prefix}{close[0]}'?"
            else:
                hint = f"valid {noun}s: {', '.join(fields)}" if fields else f"it takes no {noun}s"
            raise ConfigError(f"{origin.of(dotted)}: unknown {noun} '{dotted}'{owner}; {hint}")
        if dataclasses.is_dataclass(hints[key]):
            out[key] = _build(hints[key], value if value is not None else {}, origin, dotted + ".")
        else:
            out[key] = _check(value, hints[key], fields[key].metadata, dotted, origin)
    return out


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
        raise ConfigError(f"{where}: '{key}' must be a finite number, got {_show(value)}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {_show(value)}")
        n = meta.get("length")
        if n is not None and len(value) != n:
            raise ConfigError(f"{where}: '{key}' must have {n} items, got {len(value)}: {_show(value)}")
        value = [_check(v, args[0], {k: meta[k] for k in ("min", "max", "gt") if k in meta}, key, src) for v in value]
        if meta.get("ordered") and value[0] > value[1]:
            raise ConfigError(f"{where}: '{key}' must be [min, max] with min <= max, got {_show(value)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {_show(value)}")
        return value
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be {expected}, got {_show(value)}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint_s = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {_show(value)}{hint_s}")
    lo, gt, hi = meta.get("min"), meta.get("gt"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: '{key}' must be >= {lo}, got {value!r}")
    if gt is not None and value <= gt:
        raise ConfigError(f"{where}: '{key}' must be > {gt}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: '{key}' must be <= {hi}, got {value!r}")
    if meta.get("odd") and value % 2 == 0:
        raise ConfigError(f"{where}: '{key}' must be an odd integer, got {value!r}")
    if hint is int and value > _INT_MAX:
        raise ConfigError(f"{where}: '{key}' must be <= {_INT_MAX} (a 64-bit integer), got {value!r}")
    return value


_INT_MAX = 2**63 - 1  # torch takes seeds and sizes as C int64; a bigger int fails deep inside it


def check_fields(cls: type, values: typing.Mapping[str, Any], section: str, source: str) -> dict[str, Any]:
    """``values`` (some fields of the config section ``cls``, e.g. :class:`AugConfig`) checked
    against that section's types and bounds, as a config file's would be: the one statement of
    each bound, for code that takes the same settings as keyword arguments. Returns the values
    as the config would hold them (ints given for floats become floats, tuples lists)."""
    return _checked(cls, values, _Origin(source, frozenset()), f"{section}.")


def _show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened: an error stays one readable line whatever the value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:60]}... ({len(text)} characters)"


def _check_backend_options(data: DataConfig, origin: _Origin) -> None:
    """``data.options`` against the backend's options class (its registration's ``options``):
    unknown keys and bad values are one-line errors here, before any data is read. A backend
    fastsiam does not know (mistyped, or registered by user code later) is left to
    ``build_loader``."""
    # here: the registry imports torch, which config files do not need
    from fastsiam import data as loaders

    registered = loaders._BACKENDS.get(data.backend)
    if registered is not None and data.options:
        data.options = _checked_options(registered.options, data.options, data.backend, origin)


def _checked_options(cls: type, raw: typing.Mapping[str, Any], backend: str, origin: _Origin) -> dict[str, Any]:
    return _checked(cls, raw, origin, "data.options.", noun="option", owner=f" for the {backend} backend")


def backend_options(cls: type, raw: typing.Mapping[str, Any], backend: str, source: str) -> Any:
    """An instance of the options class ``cls`` of ``backend`` from the mapping ``raw``, checked
    as the config checks ``data.options`` (``source`` names where the values came from)."""
    return cls(**_checked_options(cls, raw, backend, _Origin(source, frozenset())))


def describe() -> str:
    """All keys with defaults and help, for ``--help-config``."""
    lines = []
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        if not dataclasses.is_dataclass(cls):
            continue
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(cls):
            lines.append(_describe_field(f, "  "))
            if cls is DataConfig and f.name == "options":
                lines.extend(_describe_backend_options())
    return "\n".join(lines)


def _describe_backend_options() -> list[str]:
    """The ``data.options`` of every registered backend, with defaults and help."""
    from fastsiam import data as loaders

    lines = []
    for backend in loaders.available_backends():
        fields = dataclasses.fields(loaders._BACKENDS[backend].options)
        lines.append(f"    {backend}:" + ("" if fields else " no options"))
        lines.extend(_describe_field(f, "      ") for f in fields)
    return lines


def _describe_field(f: dataclasses.Field[Any], indent: str) -> str:
    """``name: default    # help`` for one setting."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    h = f.metadata.get("help", "")
    return f"{indent}{f.name}: {default!r}" + (f"    # {h}" if h else "")
