"""data_prep/to_ffcv.py's decode: one per image, PIL's pixels through OpenCV's faster path."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import to_ffcv
from data_prep.dead_leaves import paint_dead_leaves
from data_prep.images import decode_image, read_file, to_rgb
from data_prep.listing import list_image_folder

pytest.importorskip("ffcv", reason="ffcv is not installed")
cv2 = pytest.importorskip("cv2")

STORED = 128  # --max-resolution: the images below are 3-5x that


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory) -> Path:
    """Photo-like JPEGs of 400-640 px in an ImageFolder: baseline, progressive, greyscale, one
    with an EXIF rotation (which PIL, and so fastsiam, ignores) and one CMYK."""
    root = tmp_path_factory.mktemp("large") / "train"
    rng = np.random.default_rng(0)
    saves = [{}, {"progressive": True}, {"mode": "L"}, {"exif": 6}, {"mode": "CMYK"}, {}]
    for k, (save, (w, h)) in enumerate(zip(saves, [(640, 480), (480, 640), (600, 400),
                                                   (520, 400), (400, 520), (611, 457)])):
        image = paint_dead_leaves(rng, w, h)
        if "mode" in save:
            image = image.convert(save.pop("mode"))
        if "exif" in save:
            exif = Image.Exif()
            exif[0x0112] = save.pop("exif")
            save["exif"] = exif.tobytes()
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"c{k % 2}" / f"{k}.JPEG", "JPEG", quality=92, **save)
    return root


def pil_rgb(path: str) -> np.ndarray:
    return np.asarray(to_rgb(decode_image(read_file(path))))


def convert(src: Path, out: Path, **kwargs) -> None:
    with contextlib.redirect_stderr(io.StringIO()):
        to_ffcv.convert(list_image_folder(src), out, quiet=True, **kwargs)


def test_full_decode_gives_pils_pixels(large_jpegs, toy_imagenet):
    # OpenCV decodes the RGB and greyscale JPEGs, PIL the rest (CMYK, PNG named .JPEG): the
    # pixels are PIL's either way, bit for bit.
    paths = [it.path for src in (large_jpegs, toy_imagenet / "train")
             for it in list_image_folder(src).items]
    for path in paths:
        got = cv2.cvtColor(to_ffcv.stored_pixels(path, None), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(got, pil_rgb(path), err_msg=path)


def test_large_jpegs_give_ffcvs_own_writers_bytes(large_jpegs, tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    items = list_image_folder(large_jpegs).items

    class Images:  # what ffcv-imagenet feeds its writer: PIL's decode
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return pil_rgb(items[i].path), items[i].label

    for mode in ("raw", "jpg"):
        writer = DatasetWriter(str(tmp_path / f"stock_{mode}.beton"), {
            "image": RGBImageField(write_mode=mode, max_resolution=STORED), "label": IntField()},
            num_workers=1)
        with contextlib.redirect_stderr(io.StringIO()):
            writer.from_indexed_dataset(Images(), chunksize=100)
        convert(large_jpegs, tmp_path / f"{mode}.beton", max_resolution=STORED, write_mode=mode,
                workers=2)
        assert (tmp_path / f"{mode}.beton").read_bytes() == (tmp_path / f"stock_{mode}.beton").read_bytes()


def test_images_are_decoded_once_and_never_by_a_checking_pass(toy_imagenet, tmp_path, monkeypatch):
    # The header pass reads headers only; the writing pass decodes each image once. The count
    # crosses into ffcv's (forked) writer process through a file.
    calls = tmp_path / "decodes.txt"
    decode = to_ffcv.stored_pixels

    def counted(path, *args):
        with open(calls, "a") as f:
            f.write(f"{path}\n")
        return decode(path, *args)

    def no_check(path):
        raise AssertionError(f"check_image({path}) called for a good file")

    items = list_image_folder(toy_imagenet / "train").items
    monkeypatch.setattr(to_ffcv, "stored_pixels", counted)
    monkeypatch.setattr(to_ffcv, "check_image", no_check)
    convert(toy_imagenet / "train", tmp_path / "t.beton", max_resolution=STORED, workers=1)
    assert sorted(calls.read_text().split()) == sorted(it.path for it in items)


def test_a_file_that_decodes_but_cannot_be_prepared_is_one_error_not_a_loop(toy_imagenet, tmp_path,
                                                                           monkeypatch):
    # The writing pass's failure sends the files from it on to the full-decode check; one that
    # passes it failed for another reason (here an encoder refusing it), and writing again
    # would fail again forever: the conversion stops naming it.
    items = list_image_folder(toy_imagenet / "train").items
    victim = items[5].path
    prepare = to_ffcv.stored_pixels

    def refuse(path, *args):
        if path == victim:
            raise to_ffcv.BadImage("the encoder refused it")
        return prepare(path, *args)

    monkeypatch.setattr(to_ffcv, "stored_pixels", refuse)
    with pytest.raises(to_ffcv.ConversionError, match="decodes but could not be prepared") as e:
        convert(toy_imagenet / "train", tmp_path / "t.beton", max_resolution=STORED, workers=1)
    assert victim in str(e.value) and "the encoder refused it" in str(e.value)
    assert not (tmp_path / "t.beton").exists()
