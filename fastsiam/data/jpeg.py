"""JPEG helpers: an image's size without decoding it; naming and replacing a damaged one.

Loaders that choose crop boxes before the decoder runs (DALI's ROI resize and ROI decode)
need each image's height and width up front. They are in the frame header (SOFn segment,
ITU-T T.81 section B.2.2), a few hundred bytes into the file; walking the segment list to it
costs microseconds.

Damaged samples: :func:`jpeg_problem` is the strict check (torchvision's libjpeg-turbo
decode, which refuses what libjpeg-turbo reports as corrupt data, where DALI's decoder and PIL
carry on), used where a decoder failed on a batch and the culprit must be named, and by
``fastsiam verify --decode``. :func:`black_jpeg` is what ``data.on_corrupt=skip`` feeds a
decoder in a damaged sample's place.
"""

from __future__ import annotations

import functools
import io
import re
import struct

# Start-of-frame markers: baseline, extended, progressive, lossless, with Huffman or
# arithmetic coding (C4 is DHT, C8 is reserved, CC is DAC: not frames).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers without a length field.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class JPEGHeaderError(ValueError):
    """The bytes are not a JPEG with a readable frame header."""


def jpeg_size(data: bytes | memoryview, where: str = "image") -> tuple[int, int]:
    """``(height, width)`` from a JPEG's frame header.

    Args:
        data: the encoded file (at least up to its SOF segment).
        where: names the image in the error message.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise JPEGHeaderError(f"{where}: not a JPEG (no SOI marker)")
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise JPEGHeaderError(f"{where}: corrupt JPEG header at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF:
            if pos + 9 > n:
                break
            height, width = struct.unpack_from(">HH", data, pos + 5)
            if height == 0 or width == 0:
                raise JPEGHeaderError(
                    f"{where}: JPEG frame of size {width}x{height} (DNL images are not supported)"
                )
            return height, width
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame
            break
        pos += 2 + length
    raise JPEGHeaderError(f"{where}: no JPEG frame header found")


BLACK_SIDE = 8  # the replacement image: any size works, every crop of it is black


def decoder_message(error: BaseException) -> str:
    """The decoder's own words from a torchvision decode error (without its C++ file and
    line) or from DALI's multi-line pipeline error (the line after "encountered:")."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    text = re.sub(r"^.*?\.cpp:\d+,\s*", "", text.strip(), flags=re.S)
    return next((line.strip(" :") for line in text.splitlines() if line.strip(" :")), "no reason given")


def jpeg_problem(data: bytes | bytearray | memoryview) -> str | None:
    """Why ``data`` is not a decodable JPEG (one line), or None when it decodes."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        return decoder_message(e)
    return None


@functools.cache
def black_jpeg() -> bytes:
    """A ``BLACK_SIDE`` px black JPEG (quality 100: it decodes to exact zeros)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (BLACK_SIDE, BLACK_SIDE)).save(buf, "JPEG", quality=100)
    return buf.getvalue()


__all__ = ["BLACK_SIDE", "JPEGHeaderError", "black_jpeg", "decoder_message", "jpeg_problem", "jpeg_size"]
