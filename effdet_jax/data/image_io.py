"""Decoding image files to RGB uint8 with PIL, whatever their colour mode."""

from __future__ import annotations

import io
import logging

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
