import struct
import zlib

import pytest

from conftest import SAMPLE_IMAGES, image_bytes
from pipeline.images import ImageRejected, inspect_image

LIMITS = dict(min_side=8, max_pixels=100_000_000, formats=["JPEG", "PNG", "WEBP", "GIF"])


def png_with_header_size(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR claims another size (with a valid CRC): a decompression bomb."""
    data = bytearray(image_bytes((16, 16), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_real_images_pass_with_their_size_and_format():
    info = inspect_image((SAMPLE_IMAGES / "astronaut.jpg").read_bytes(), **LIMITS)
    assert (info.width, info.height, info.format) == (512, 512, "JPEG")
    assert inspect_image(image_bytes((30, 20), "PNG"), **LIMITS).format == "PNG"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_file"),
        (image_bytes((400, 300))[:900], "decode_error"),  # truncated JPEG
        (b"this is a text file named photo.jpg\n", "not_an_image"),
        (png_with_header_size(20000, 20000), "image_too_large"),
        (image_bytes((4, 100), "PNG"), "image_too_small"),
        (image_bytes((32, 32), "BMP"), "unsupported_format"),
    ],
    ids=["zero-bytes", "truncated-jpeg", "text-as-jpg", "20000x20000-png-header", "too-small", "bmp-not-allowed"],
)
def test_bad_images_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as rejected:
        inspect_image(data, **LIMITS)
    assert rejected.value.reason == reason
    assert rejected.value.detail


def test_non_images_stay_rejected_after_ultralytics_patches_pillow():
    """ultralytics replaces PIL.Image.open with a HEIF fallback when imported (the ground stage
    imports it); a text file must still be `not_an_image`, not a crash."""
    import ultralytics  # noqa: F401 - the import applies the patch

    with pytest.raises(ImageRejected) as rejected:
        inspect_image(b"this is a text file named photo.jpg\n", **LIMITS)
    assert rejected.value.reason == "not_an_image"
