"""Config schema: YAML + _base_ inheritance, dotted overrides, one-line errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsiam.config import Config, ConfigError, describe, from_dict, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_recipe() -> None:
    cfg = Config()
    assert cfg.model.backbone == "resnet50" and cfg.model.dim == 2048 and cfg.model.pred_dim == 512
    assert cfg.optim.lr == 0.05 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert cfg.data.scale == [0.2, 1.0]
    assert (cfg.aug.color_jitter_p, cfg.aug.grayscale_p, cfg.aug.blur_p) == (0.8, 0.2, 0.5)
    assert (cfg.aug.brightness, cfg.aug.contrast, cfg.aug.saturation, cfg.aug.hue) == (0.4, 0.4, 0.4, 0.1)


def test_base_inheritance_and_name(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "optim:\n  lr: 0.1\n  momentum: 0.8\ntrain:\n  epochs: 5\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\noptim:\n  lr: 0.2\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.2          # child wins
    assert cfg.optim.momentum == 0.8    # merged key by key from the base
    assert cfg.train.epochs == 5
    assert cfg.name == "child"


def test_base_list_later_wins(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "train:\n  epochs: 3\n  seed: 1\n")
    write(tmp_path / "b.yaml", "train:\n  epochs: 4\n")
    cfg = load_config(write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n"))
    assert (cfg.train.epochs, cfg.train.seed) == (4, 1)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=0.1", "train.amp=none", "data.scale=[0.3, 0.9]",
                             "train.max_steps=7", "model.small_input=true", "data.options={augment: crop}"])
    assert cfg.optim.lr == 0.1 and cfg.train.amp == "none" and cfg.data.scale == [0.3, 0.9]
    assert cfg.train.max_steps == 7 and cfg.model.small_input is True
    assert cfg.data.options == {"augment": "crop"}


def test_int_and_yaml11_exponents_are_accepted_for_float(tmp_path: Path) -> None:
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    assert load_config(None, ["optim.weight_decay=5e-4"]).optim.weight_decay == 5e-4
    assert load_config(write(tmp_path / "c.yaml", "optim:\n  weight_decay: 1e-5\n")).optim.weight_decay == 1e-5


@pytest.mark.parametrize("value", [".nan", "nan", ".inf", "-inf"])
def test_non_finite_floats_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^command line: 'optim.lr' must be a finite number, got"):
        load_config(None, [f"optim.lr={value}"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim:\n  lrr: 0.1\n", "{f}: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("optimm:\n  lr: 0.1\n", "{f}: unknown key 'optimm'; did you mean 'optim'?"),
        ("optim:\n  lr: fast\n", "{f}: 'optim.lr' must be a number, got 'fast'"),
        ("train:\n  epochs: 1.5\n", "{f}: 'train.epochs' must be an integer, got 1.5"),
        ("train:\n  epochs: 0\n", "{f}: 'train.epochs' must be >= 1, got 0"),
        ("aug:\n  grayscale_p: 1.5\n", "{f}: 'aug.grayscale_p' must be <= 1.0, got 1.5"),
        ("aug:\n  blur_kernel_size: 22\n", "{f}: 'aug.blur_kernel_size' must be an odd integer, got 22"),
        ("model:\n  backbone: resnet51\n",
         "{f}: 'model.backbone' must be one of resnet18, resnet34, resnet50, got 'resnet51'; did you mean 'resnet50'?"),
        ("data:\n  scale: [0.2]\n", "{f}: 'data.scale' must have 2 items, got 1: [0.2]"),
        ("model:\n  sync_bn: 3\n", "{f}: 'model.sync_bn' must be true or false, got 3"),
        ("train: 3\n", "{f}: train must be a mapping, got 3"),
        ("- a\n- b\n", "{f}: top level must be a mapping of sections, got list"),
    ],
)
def test_errors_are_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == message.format(f=f)
    assert "\n" not in str(e.value)


def test_override_errors_name_the_command_line(tmp_path: Path) -> None:
    f = write(tmp_path / "ok.yaml", "optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'optim.lrr'; did you mean 'optim.lr'\?$"):
        load_config(f, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"^command line: override 'optim.lr' must look like section.key=value$"):
        load_config(f, ["optim.lr"])


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found$"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path / "child.yaml", "_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found \(included from .*child.yaml\)$"):
        load_config(child)


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.yaml", "optim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_config(f)


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=0.3", "train.epochs=2"])
    again = load_config(write(tmp_path / "resolved.yaml", cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()  # an explicit name in the file is kept


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_200e_config_inherits_100e() -> None:
    c100 = load_config(CONFIGS / "simsiam_resnet50_8xb32-coslr-100e_in1k.yaml")
    c200 = load_config(CONFIGS / "simsiam_resnet50_8xb32-coslr-200e_in1k.yaml")
    assert c200.train.epochs == 200 and c100.train.epochs == 100
    assert {**c200.to_dict(), "train": None, "name": None} == {**c100.to_dict(), "train": None, "name": None}


def test_from_dict_and_describe() -> None:
    assert from_dict({"optim": {"lr": 0.2}}).optim.lr == 0.2
    text = describe()
    assert "optim:" in text and "  lr: 0.05" in text


def test_help_config_lists_each_backends_options_with_their_defaults() -> None:
    import dataclasses
    import subprocess
    import sys

    from fastsiam.data import _BACKENDS

    out = subprocess.run([sys.executable, "-m", "fastsiam", "--help-config"], check=True, capture_output=True,
                         text=True).stdout
    checked = 0
    for name, spec in _BACKENDS.items():
        assert f"\n    {name}:" in out, name
        for f in dataclasses.fields(spec.options):  # the reference: the registered options class
            assert f"\n      {f.name}: {f.default!r}" in out, (name, f.name)
            checked += 1
    assert checked >= 15  # ffcv's order, os_cache, ...; synthetic's num_samples; pil's augment
    assert "      augment: 'full'    # full: the official recipe per view" in out


def test_every_backend_builds_from_the_options_class_it_is_registered_with() -> None:
    """Read from the source (the ffcv and DALI modules import their libraries): each build is
    build(path, spec, options: <the registered class>)."""
    import ast
    import importlib.util

    from fastsiam.data import _BACKENDS

    for name, spec in _BACKENDS.items():
        origin = importlib.util.find_spec(spec.module).origin
        tree = ast.parse(Path(origin).read_text())
        build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build")
        params = [a.arg for a in build.args.args]
        assert params == ["path", "spec", "options"] and not build.args.kwonlyargs, (name, params)
        assert ast.unparse(build.args.args[2].annotation) == spec.options.__name__, name


def test_backend_option_values_are_checked_like_every_key() -> None:
    with pytest.raises(ConfigError, match=r"^command line: 'data.options.order' must be one of random, "
                                          r"quasi_random, got 'sequential'$"):
        load_config(None, ["data.backend=ffcv", "data.options.order=sequential"])
    with pytest.raises(ConfigError, match=r"'data.options.num_samples' must be >= 1, got 0$"):
        load_config(None, ["data.backend=synthetic", "data.options.num_samples=0"])
    assert load_config(None, ["data.backend=dali", "data.options.hw_decoder_load=1"]).data.options == \
        {"hw_decoder_load": 1.0}  # an int for a float setting becomes the float


def test_register_backend_needs_an_options_dataclass() -> None:
    from fastsiam.data import register_backend

    with pytest.raises(TypeError, match=r"register_backend\('mine'\): options must be a dataclass type, got \{\}"):
        register_backend("mine", "my.module", options={})  # type: ignore[arg-type]
