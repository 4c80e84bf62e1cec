"""Hostile inputs to the config, the CLI and the API: each is refused in one line naming the
key, file or value and what is expected; none hangs, none prints a traceback (unless --debug).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsiam import cli
from fastsiam.config import ConfigError, from_dict, load_config

TINY = ("model: {backbone: resnet18, dim: 32, pred_dim: 8, small_input: true}\n"
        "data: {backend: synthetic, batch_size: 4, image_size: 16, workers: 0,"
        " options: {num_samples: 16, num_classes: 2}}\n"
        "train: {epochs: 1, device: cpu, amp: none, log_every: 1}\n")


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``fastsiam argv`` in process: (exit status, stderr)."""
    code = cli.main(argv)
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


# --------------------------------------------------------------------------------------------
# 1. YAML aliases


def billion_laughs(levels: int = 9) -> str:
    """``data.options`` whose aliases expand to 10**levels strings (10 bytes of YAML per level)."""
    lines = ["data:", "  options:", '    l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def test_yaml_aliases_are_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    f = write(tmp_path / "bomb.yaml", billion_laughs())
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: line 4: YAML alias *l0 refused")
    assert "\n" not in str(e.value)


@pytest.mark.timeout(60)
def test_print_config_of_an_alias_bomb_does_not_hang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path / "bomb.yaml", billion_laughs())
    one_line_error(*run_cli(["train", "--config", str(f), "--print-config"], capsys), str(f), "alias")


def test_an_alias_in_an_override_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"^command line: override 'data.options=.*': YAML alias \*a refused"):
        load_config(None, ["data.options={x: &a [1, 2], y: *a}"])


def test_duplicate_keys_are_refused_not_silently_replaced(tmp_path: Path) -> None:
    # YAML keeps the last 'optim': the lr of the first would silently fall back to the default.
    f = write(tmp_path / "dup.yaml", "optim:\n  lr: 0.5\ntrain:\n  epochs: 3\noptim:\n  momentum: 0.8\n")
    with pytest.raises(ConfigError, match=rf"^{f}: line 5: invalid YAML: duplicate key 'optim' \(first at line 1\)$"):
        load_config(f)


# --------------------------------------------------------------------------------------------
# 2. one line naming the key, file or value


def test_cuda_without_a_gpu_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = write(tmp_path / "tiny.yaml", TINY)
    code, err = run_cli(["train", "--config", str(cfg), "--device", "cuda", "--work-dir", str(tmp_path / "wd")], capsys)
    one_line_error(code, err, "train.device='cuda' asks for CUDA, but torch sees no GPU")


@pytest.mark.parametrize(("name", "message"), [
    ("gpu", "train.device='gpu' is not a device; expected auto, cpu, cuda or cuda:N"),
    ("cuda:x", "train.device='cuda:x' is not a device; expected auto, cpu, cuda or cuda:N"),
])
def test_resolve_device_names_a_bad_device(name: str, message: str) -> None:
    from fastsiam.dist import resolve_device

    with pytest.raises(ValueError) as e:
        resolve_device(name)
    assert str(e.value) == message


def test_resolve_device_names_a_missing_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastsiam.dist import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^device='cuda:2': this machine has 2 GPUs \(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2", key="device")


@pytest.mark.parametrize(("backend", "accepted"), [
    ("synthetic", "num_samples, num_classes"),
    ("pil", "augment"),
    ("ffcv", "order, os_cache, batches_ahead, copy, image_field, label_field"),  # checked without ffcv
    ("dali", "reader, decode, initial_fill, hw_decoder_load, prefetch"),
])
def test_an_unknown_backend_option_names_the_accepted_ones(backend: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.backend={backend}", "data.options.bogus=1"])
    assert str(e.value) == (f"command line: unknown option 'data.options.bogus' for the {backend} backend; "
                            f"valid options: {accepted}")


def test_backend_options_in_a_file_are_checked_with_a_hint(tmp_path: Path) -> None:
    f = write(tmp_path / "c.yaml", "data:\n  backend: synthetic\n  options: {num_sample: 8}\n")
    with pytest.raises(ConfigError, match=rf"^{f}: unknown option 'data.options.num_sample' for the synthetic "
                                          r"backend; did you mean 'data.options.num_samples'\?$"):
        load_config(f)
    # known options pass, and a backend fastsiam does not know is left to build_loader
    assert load_config(f, ["data.options={num_samples: 8}"]).data.options == {"num_samples": 8}
    assert from_dict({"data": {"backend": "mine", "options": {"x": 1}}}).data.options == {"x": 1}


def test_base_must_name_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "train: {seed: 1}\n")
    f = write(tmp_path / "c.yaml", "_base_: [a.yaml, 5]\n")
    with pytest.raises(ConfigError, match=rf"^{f}: '_base_' must be a file name or a list of file names, got 5$"):
        load_config(f)


@pytest.mark.parametrize(("content", "reason"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file: NUL byte at offset 8"),
    (b"optim:\n  lr: \xff\xfe\n", "not a UTF-8 text file: byte 0xff at offset 13"),
])
def test_a_binary_config_is_named(tmp_path: Path, content: bytes, reason: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path / "binary.yaml", content)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: {reason}; a config is a YAML text file"
    one_line_error(*run_cli(["train", "--config", str(f), "--print-config"], capsys), str(f))


@pytest.mark.parametrize(("override", "message"), [
    ("train.seed=1e23", "'train.seed' must be an integer, got '1e23'"),
    ("train.seed=1.0e+23", "'train.seed' must be an integer, got 1e+23"),
    ("train.seed=100000000000000000000000", "'train.seed' must be <= 9223372036854775807 (a 64-bit integer), "
                                            "got 100000000000000000000000"),
    ("data.ratio=[0,0]", "'data.ratio' must be > 0.0, got 0.0"),
    ("data.ratio=[1.5,0.5]", "'data.ratio' must be [min, max] with min <= max, got [1.5, 0.5]"),
    ("data.scale=[1.0,0.2]", "'data.scale' must be [min, max] with min <= max, got [1.0, 0.2]"),
    ("aug.blur_sigma=[2.0,0.1]", "'aug.blur_sigma' must be [min, max] with min <= max, got [2.0, 0.1]"),
    ("aug.blur_sigma=[0,1]", "'aug.blur_sigma' must be > 0.0, got 0.0"),
    ("optim.lr=1e300", "'optim.lr' must be <= 1e+30, got 1e+300"),
    ("optim.weight_decay=1e300", "'optim.weight_decay' must be <= 1.0, got 1e+300"),
    ("schedule.min_lr=2", "'schedule.min_lr' must be <= 1.0, got 2.0"),
])
def test_absurd_values_are_refused_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"command line: {message}"


def test_a_long_bad_value_is_shortened_to_one_readable_line() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"optim.lr=[{', '.join(['1'] * 500)}]"])
    assert str(e.value).startswith("command line: 'optim.lr' must be a number, got [1, 1, 1")
    assert str(e.value).endswith("... (1500 characters)") and len(str(e.value)) < 200


@pytest.mark.parametrize(("override", "message"), [
    ("data..x=1", "command line: override 'data..x=1': 'data..x' is not a dotted key (section.key=value, "
                  "names separated by single dots)"),
    ("=1", "command line: override '=1': '' is not a dotted key (section.key=value, names separated by single dots)"),
    ("train.seed.x=1", "command line: override 'train.seed.x=1': 'train.seed' is not a section (it holds 3)"),
])
def test_a_malformed_override_is_named(tmp_path: Path, override: str, message: str) -> None:
    f = write(tmp_path / "c.yaml", "train: {seed: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, [override])
    assert str(e.value) == message


def test_a_value_an_override_built_is_blamed_on_the_command_line(tmp_path: Path) -> None:
    f = write(tmp_path / "c.yaml", "optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"^command line: 'train.seed' must be an integer, got \{'x': 1\}$"):
        load_config(f, ["train.seed.x=1"])


def test_a_work_dir_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path / "tiny.yaml", TINY)
    afile = write(tmp_path / "afile", "x")
    code, err = run_cli(["train", "--config", str(cfg), "--work-dir", str(afile)], capsys)
    one_line_error(code, err, f"--work-dir {afile} is a file; the work dir must be a directory (created if missing)")
    code, err = run_cli(["train", "--config", str(cfg), f"output.work_dir={afile}"], capsys)
    one_line_error(code, err, f"output.work_dir {afile} is a file")


# --------------------------------------------------------------------------------------------
# 3. images in the API


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels and holds none (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from fastsiam.api import load_image

    bomb = write(tmp_path / "bomb.png", png_header_only(40_000, 40_000))
    with pytest.raises(ValueError) as e:
        load_image(bomb)
    assert str(e.value).startswith(f"{bomb}: refused, a possible decompression bomb (")
    assert str(e.value).endswith("raise PIL.Image.MAX_IMAGE_PIXELS if the image is real")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5, 3), np.uint8),
                                   Image.new("RGB", (0, 0))], ids=["array 0x0", "array 0x5", "PIL 0x0"])
def test_an_image_without_pixels_is_one_line(image: object) -> None:
    from fastsiam.api import inference_model, load_image

    with pytest.raises(ValueError, match=r"^image .* has no pixels \(\d+x\d+\)"):
        load_image(image)  # type: ignore[arg-type]
    model = torch.nn.Conv2d(3, 1, 1)  # never reached: the image is refused first
    with pytest.raises(ValueError, match="has no pixels"):
        inference_model(model, image)  # type: ignore[arg-type]


@pytest.mark.parametrize(("array", "expected"), [
    (np.array([[0, 257, 25700, 65535]], np.uint16), [0, 1, 100, 255]),                # I;16: / 257
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),                           # F in [0, 1]: x 255
    (np.array([[0.0, 0.5, 1.0, 2.0]], np.float32), [0, 64, 128, 255]),                # F beyond: min-max
    (np.array([[0, 257, -5, 70000]], np.int32), [0, 1, 0, 255]),                       # I beyond: min-max
], ids=["I;16", "F", "F-wide", "I-wide"])
def test_wide_images_are_rescaled_not_saturated(tmp_path: Path, array: np.ndarray, expected: list[int]) -> None:
    from fastsiam.api import load_image
    from fastsiam.imageio import to_rgb

    img = Image.fromarray(array)
    rgb = np.asarray(to_rgb(img))
    assert rgb.dtype == np.uint8 and rgb.shape == (*array.shape, 3)
    assert rgb[..., 0].tolist() == [expected] and (rgb[..., 0] == rgb[..., 2]).all()
    if img.mode == "I;16":  # and from a file: a 16-bit grayscale PNG
        img.save(tmp_path / "g16.png")
        assert np.asarray(load_image(tmp_path / "g16.png"))[..., 1].tolist() == [expected]


def test_nan_in_a_float_image_is_refused() -> None:
    from fastsiam.imageio import UnsupportedImage, to_rgb

    img = Image.fromarray(np.array([[np.nan, np.inf, -np.inf]], np.float32))
    with pytest.raises(UnsupportedImage, match=r"^F image has NaN or infinite values$"):
        to_rgb(img)


# --------------------------------------------------------------------------------------------
# 4. what --resume is given


def test_resume_from_a_torchvision_state_dict_says_what_the_file_is(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    from fastsiam.weights import WeightsError, check_resumable, describe_checkpoint

    sd = resnet18().state_dict()
    assert describe_checkpoint(sd) == f"a torchvision ResNet state dict ({len(sd)} tensors)"
    with pytest.raises(WeightsError) as e:
        check_resumable(sd, tmp_path / "resnet18.pth")
    assert str(e.value) == (
        f"{tmp_path / 'resnet18.pth'}: --resume needs a fastsiam training checkpoint (the epoch_*.pt or step_*.pt "
        f"that fastsiam train writes: model, optimizer, epoch, step, rng); this is a torchvision ResNet state dict "
        f"({len(sd)} tensors), weights for knn/linear --pretrained")


def test_check_resumable_accepts_a_training_checkpoint_and_names_what_is_missing() -> None:
    from fastsiam.model import SimSiam
    from fastsiam.weights import WeightsError, check_resumable, describe_checkpoint

    model = SimSiam("resnet18", dim=32, pred_dim=8)
    state = {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 1,
             "step": 4, "rng": {}, "config": {}}
    check_resumable(state, "ok.pt")
    assert describe_checkpoint(state) == "a fastsiam training checkpoint (epoch 1, step 4)"
    weights_only = {"model": model.state_dict(), "config": {}, "epoch": 1}
    with pytest.raises(WeightsError, match=r"this is a fastsiam model checkpoint without optimizer, rng, step, "
                                           r"weights for knn/linear --pretrained$"):
        check_resumable(weights_only, "w.pt")
    with pytest.raises(WeightsError, match=r"'step' is 'x', not an integer"):
        check_resumable({**state, "step": "x"}, "s.pt")


@pytest.mark.parametrize(("obj", "text"), [
    ({"format": "fastsiam-linear", "model": {"fc.weight": torch.zeros(1)}}, "a fastsiam linear classifier checkpoint"),
    ({"state_dict": {"module.encoder.conv1.weight": torch.zeros(1), "module.encoder.bn1.weight": torch.zeros(1)}},
     "an official SimSiam checkpoint (2 tensors)"),
    ({"w": torch.zeros(1), "b": torch.zeros(1)}, "a state dict of 2 tensors that is not a ResNet's (keys b, w)"),
    ({"a": 1, "b": [2]}, "a dict with keys a, b (not a recognised checkpoint)"),
    ({}, "an empty dict"),
])
def test_describe_checkpoint(obj: dict, text: str) -> None:
    from fastsiam.weights import describe_checkpoint

    assert describe_checkpoint(obj) == text


# --------------------------------------------------------------------------------------------
# the CLI's one-line rule and --debug


def _raiser(exc: BaseException):
    def cmd(args: object) -> int:
        raise exc
    return cmd


def _errors() -> list[BaseException]:
    from fastsiam.checkpoint import CheckpointError
    from fastsiam.data.shards import ShardFormatError
    from fastsiam.trainer import TrainingError

    return [ConfigError("c.yaml: bad key"), ValueError("bad value"), FileNotFoundError("x.jpg not found"),
            TrainingError("non-finite loss"), CheckpointError("ck.pt: unreadable"), ShardFormatError("shard 3: bad"),
            PermissionError(13, "Permission denied", "/ro/file"), ImportError("needs ffcv")]


@pytest.mark.parametrize("exc", _errors(), ids=lambda e: type(e).__name__)
def test_user_errors_are_one_line_and_debug_reraises(exc: BaseException, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "cmd_info", _raiser(exc))
    code, err = run_cli(["info", "resnet18"], capsys)
    one_line_error(code, err, "fastsiam info: error: ")
    assert err.strip().endswith("/ro/file: Permission denied" if isinstance(exc, OSError) and exc.filename
                                else str(exc))
    with pytest.raises(type(exc)):
        cli.main(["--debug", "info", "resnet18"])
    with pytest.raises(type(exc)):  # also after the subcommand
        cli.main(["info", "resnet18", "--debug"])


def test_a_multi_line_message_is_cut_to_its_first_line(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "cmd_info", _raiser(ValueError("first line\n  detail\n  more detail")))
    code, err = run_cli(["info", "resnet18"], capsys)
    one_line_error(code, err)
    assert err == "fastsiam info: error: first line (details: --debug)\n"


def test_a_bug_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "cmd_info", _raiser(KeyError("internal")))
    with pytest.raises(KeyError):
        cli.main(["info", "resnet18"])


def test_one_line_through_a_real_process(tmp_path: Path) -> None:
    f = write(tmp_path / "c.yaml", TINY)
    out = subprocess.run([sys.executable, "-m", "fastsiam", "train", "--config", str(f), "--print-config",
                          "data..x=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("fastsiam train: error: command line: override 'data..x=1': 'data..x' is not a dotted key "
                          "(section.key=value, names separated by single dots)\n")
