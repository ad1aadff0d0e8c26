"""Decoding image files to RGB uint8 with PIL, whatever their colour mode, and the rule that says
which files TensorFlow's decoders (``tf_decode.decode_rgb_tf``) turn into the same pixels.

The input pipeline decodes a file with TF ops when ``tf_decodable`` says so (checked once per file
by the data report's header scan, no pixels decoded) and with ``decode_rgb`` (PIL, inside
``tf.numpy_function``) otherwise. Both ignore EXIF orientation and colour profiles.
"""

from __future__ import annotations

import io
import logging
import os
import struct

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def is_converted(mode: str) -> bool:
    """Whether a file of PIL ``mode`` is converted to RGB on decoding (anything but ``"RGB"``:
    grayscale, RGBA, CMYK, palette, 16-bit...)."""
    return mode != "RGB"


class UnreadableImageError(ValueError):
    """An image file that cannot be opened or decoded; the message names the file."""


def decode_rgb(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, bool]:
    """Decode encoded image bytes.

    Returns:
      (image [H,W,3] uint8 RGB, converted) where ``converted`` is True when the file was not RGB
      (grayscale, RGBA, CMYK, palette, 16-bit...) and was converted. EXIF orientation is ignored on
      purpose: COCO annotations are in the stored pixel grid.

    Raises:
      UnreadableImageError naming ``name`` when the data is not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            converted = is_converted(im.mode)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grayscale: keep the top 8 bits instead of PIL's clipping to 255.
                arr = np.asarray(im, dtype=np.int64)
                arr = (arr >> 8) if arr.max() > 255 else arr
                rgb = np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
            else:
                rgb = np.asarray(im.convert("RGB") if converted else im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data
        raise UnreadableImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise UnreadableImageError(f"cannot decode image {name}: empty image {rgb.shape}")
    return np.ascontiguousarray(rgb), converted


def read_rgb(path: str) -> tuple[np.ndarray, bool]:
    """Read and decode a file (see ``decode_rgb``); a missing file is ``UnreadableImageError``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UnreadableImageError(f"cannot read image {path}: {e}") from e
    return decode_rgb(data, path)


# Formats and PIL modes whose TF decoding equals ``decode_rgb`` pixel for pixel (tests/data/
# test_decode_tf.py). Left to PIL: CMYK JPEG, 16-bit PNG (``decode_rgb`` keeps its values when
# they fit in 8 bits, TF always keeps the top byte), palette / 16-bit / bit-field BMP (TF ignores
# BMP palettes and masks), animated WebP, and every format TF does not read (TIFF, ...).
TF_MODES: dict[str, frozenset[str]] = {
    "JPEG": frozenset({"RGB", "L"}),
    "PNG": frozenset({"RGB", "RGBA", "L", "LA", "P", "1"}),
    "GIF": frozenset({"P", "L"}),
    "BMP": frozenset({"RGB"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}
_PNG_IEND = b"\0\0\0\0IEND\xaeB`\x82"


def _complete(path: str, fmt: str) -> bool:
    """Whether the file's structure is whole, read from its first and last bytes. TF's decoders
    raise on a truncated file (``decode_rgb`` reports it unreadable, or, for a PNG without IEND,
    decodes it); the pipeline would then try TF and PIL in turn, so such files go to PIL at once."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(34)
        f.seek(max(0, size - 12))
        tail = f.read()
    if fmt == "JPEG":  # ends with the EOI marker (a truncated JPEG does not)
        return tail.endswith(b"\xff\xd9")
    if fmt == "PNG":  # 8-bit or less, ends with IEND, and every chunk's CRC is right
        if len(head) < 25 or head[24] > 8 or not tail.endswith(_PNG_IEND):
            return False
        with Image.open(path) as im:
            im.verify()
        return True
    if fmt == "GIF":  # ends with the trailer byte
        return tail.endswith(b"\x3b")
    if fmt == "BMP":  # uncompressed 24/32-bit, as long as its header says
        file_size, bits, compression = (struct.unpack_from("<I", head, 2)[0],
                                        struct.unpack_from("<H", head, 28)[0],
                                        struct.unpack_from("<I", head, 30)[0])
        return bits in (24, 32) and compression == 0 and file_size == size
    if fmt == "WEBP":  # as long as its RIFF header says, not animated
        animated = head[12:16] == b"VP8X" and bool(head[20] & 0x02)
        return struct.unpack_from("<I", head, 4)[0] + 8 == size and not animated
    return False


def tf_decodable(path: str, fmt: str, mode: str) -> bool:
    """Whether ``tf_decode.decode_rgb_tf`` decodes the file at ``path`` (PIL ``format`` and
    ``mode`` from its header) to exactly ``decode_rgb``'s pixels without raising; False (decode
    with PIL) when unsure, or when the file cannot be read."""
    if mode not in TF_MODES.get(fmt, ()):
        return False
    try:
        return _complete(path, fmt)
    except Exception:  # unreadable or broken: PIL decides (and reports) what it is
        return False
