"""Photos in, PNGs out: uploads checked against the limits before they are decoded.

Usage::

    photo = open_photo(Path(upload), limits)          # page upload (a server temp file)
    photo = open_photo(b64decode_photo(text, limits), limits)   # MLflow request field
    text = png_base64(image)                          # what the MLflow model returns
    image = read_image("shirt.png", "--image")          # a file, or a one-line error naming it

Messages never name the server's temporary paths: the person who uploaded sees what is
wrong with *their* photo.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from fashiondiff.errors import PipelineError, first_line
from fashiondiff.serving.engine import Limits

PHOTO_FORMATS = "PNG, JPEG or WebP"
MB = 1 << 20


def read_image(path: str | Path, what: str = "--image"):
    """An RGB PIL image, or a one-line PipelineError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such image ({what})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = type(exc).__name__ if isinstance(exc, UnidentifiedImageError) else first_line(exc)
        raise PipelineError(f"{path}: cannot read image ({what}): {reason}") from None


def open_photo(source: Path | bytes, limits: Limits):
    """An RGB PIL image from a file or bytes; PipelineError if it is too large or not an image."""
    size = source.stat().st_size if isinstance(source, Path) else len(source)
    _check_bytes(size, limits)
    handle = source if isinstance(source, Path) else io.BytesIO(source)
    width, height = _header_size(handle)
    if max(width, height) > limits.max_side:
        raise PipelineError(f"photo is {width}x{height} pixels: the limit is {limits.max_side} per side")
    if not isinstance(handle, Path):
        handle.seek(0)
    try:
        return read_image(handle, "photo")  # decode, convert to RGB
    except PipelineError:
        raise PipelineError(f"photo: cannot decode this image ({PHOTO_FORMATS} work)") from None


def b64decode_photo(text: str, limits: Limits) -> bytes:
    """The bytes of a base64 field (size checked before decoding)."""
    _check_bytes(len(text) * 3 // 4, limits)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PipelineError("image: not base64 (send the photo file's bytes, base64-encoded)") from None


def png_base64(image) -> str:
    """A PIL image as base64 of its PNG bytes (lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_bytes(size: int, limits: Limits) -> None:
    if size > limits.max_upload_mb * MB:
        raise PipelineError(f"photo is {size / MB:.3g} MB: the limit is {limits.max_upload_mb:g} MB")


def _header_size(handle) -> tuple[int, int]:
    """Width and height from the header alone (PIL opens lazily), before any decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(handle) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise PipelineError(f"that upload is not an image ({PHOTO_FORMATS} work)") from None
