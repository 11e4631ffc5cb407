"""Checks that encoded image bytes are a real, fully decodable image of sane size."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def inspect_image(data: bytes, *, min_side: int, max_pixels: int, formats: list[str]) -> ImageInfo:
    """Returns the image's size and format, or raises ImageRejected with a reason code.

    Size is checked from the header before decoding, so a decompression bomb costs nothing;
    then the whole image is decoded, which is the only way to catch a truncated file.
    """
    if not data:
        raise ImageRejected("empty_file", "the file has 0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageRejected("not_an_image", f"{len(data)} bytes that no image decoder recognises") from None
        except Image.DecompressionBombError as exc:
            raise ImageRejected("image_too_large", str(exc)) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageRejected("decode_error", f"cannot read the image header: {exc}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRejected("image_too_large", f"{width}x{height} exceeds max_pixels={max_pixels}")
        if min(width, height) < min_side:
            raise ImageRejected("image_too_small", f"{width}x{height} is below min_side={min_side}")
        if image.format not in formats:
            raise ImageRejected("unsupported_format", f"format {image.format} is not in {formats}")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageRejected("decode_error", f"{image.format} data does not decode: {exc}") from None
    return ImageInfo(width=width, height=height, format=image.format)
