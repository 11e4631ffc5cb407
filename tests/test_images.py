import struct
import zlib

import pytest
from conftest import SAMPLE_IMAGES, image_bytes

from pipeline.core.images import ImageRejected, inspect_image

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


# --- any failure of a decoder is that image's reject (issue 12) -------------------------------

import io  # noqa: E402 - the hostile-input half of this file
import random  # noqa: E402
from datetime import timedelta  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from pipeline.core.images import decode_rgb, normalised_bytes, to_rgb  # noqa: E402

# What the old checks caught; anything else escaped and failed the whole shard.
OLD_CAUGHT = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, UnidentifiedImageError)
REASONS = {"empty_file", "not_an_image", "decode_error", "unsupported_format", "image_too_small", "image_too_large", "unsupported_mode"}
DEFAULT_FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
# Every format Pillow opens except EPS, whose decoding runs Ghostscript.
Image.init()  # registers every plugin; until then Image.OPEN holds only the common five
ALL_FORMATS = sorted(set(Image.OPEN) - {"EPS"})


def dds_header(fourcc: bytes, width: int = 32, height: int = 32) -> bytes:
    """A DDS texture header whose compressed pixel format Pillow does not implement."""
    pixel_format = struct.pack("<4I", 32, 0x4, int.from_bytes(fourcc, "little"), 0)  # DDPF_FOURCC
    header = struct.pack("<6I", 0x1007, height, width, 0, 0, 0) + bytes(44) + pixel_format + bytes(20) + bytes(20)
    return b"DDS " + struct.pack("<I", 124) + header + bytes(min(width * height, 4096))


def tiff_with_rational_strip_offsets() -> bytes:
    """A real TIFF whose StripOffsets entry is retyped LONG → RATIONAL: Pillow raises TypeError."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        at = ifd + 2 + 12 * entry
        if struct.unpack("<H", data[at : at + 2])[0] == 273:  # StripOffsets
            data[at + 2 : at + 4] = struct.pack("<H", 5)
            return bytes(data)
    raise AssertionError("the TIFF has no StripOffsets tag")


def old_check_escapes(data: bytes) -> bool:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except OLD_CAUGHT:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


@pytest.mark.parametrize(
    "data",
    [dds_header(b"ZZZZ"), dds_header(b"ATI3"), tiff_with_rational_strip_offsets()],
    ids=["dds-unknown-fourcc", "dds-ati3", "tiff-rational-strip-offsets"],
)
def test_exceptions_the_decoders_raise_become_decode_error(data):
    assert old_check_escapes(data)  # NotImplementedError / TypeError: these used to fail the shard
    with pytest.raises(ImageRejected) as rejected:
        inspect_image(data, min_side=8, max_pixels=100_000_000, formats=ALL_FORMATS)
    assert rejected.value.reason == "decode_error" and "Error" in rejected.value.detail
    with pytest.raises(ImageRejected):
        decode_rgb(data)  # the downstream decode sites say the same


def _saved(fmt: str, mode: str = "RGB", size=(24, 24), **params) -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, size, 128 if mode in ("1", "L", "P", "F", "I") else (200, 30, 30))
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def foreign_headers() -> list[bytes]:
    """At least 100 files in formats other than the allowed ones (the kind a web crawl names .jpg):
    real files Pillow writes, hand-made headers for formats it only reads, and their truncations,
    garbage tails and bit flips."""
    bases = [
        _saved("DDS"), _saved("ICNS", size=(32, 32)), _saved("ICO"), _saved("IM"), _saved("PCX"), _saved("PPM"),
        _saved("QOI"), _saved("SGI"), _saved("TGA"), _saved("BLP", "P"), _saved("JPEG2000"), _saved("AVIF"),
        _saved("SPIDER", "F"), _saved("MSP", "1"), _saved("XBM", "1"), _saved("PALM", "P"), _saved("DIB"),
        dds_header(b"ZZZZ"), dds_header(b"DX10"), dds_header(b"ATI3", 1 << 15, 1 << 15),
        b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 64, 64, 8, 3) + bytes(64),  # PSD
        b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8" + b" " * 49,  # FITS
        b"GRIB" + bytes(60), b"BUFR" + bytes(60), b"\x89HDF\r\n\x1a\n" + bytes(60),
        b"\xd7\xcd\xc6\x9a" + bytes(60),  # WMF placeable header
        b"\x01\xda\x01\x01\x00\x03" + bytes(200),  # SGI header of a 3-D volume
        b"/* XPM */\nstatic char *x[] = {\n\"64 64 2 1\",\n",
        b"\x59\xa6\x6a\x95" + struct.pack(">7I", 64, 64, 8, 4096, 1, 0, 0),  # Sun raster
        b"\x00\x00\x01\xb3" + bytes(60),  # MPEG
        b"P7\nWIDTH 4\nHEIGHT 4\nDEPTH 9\nMAXVAL 255\nTUPLTYPE X\nENDHDR\n" + bytes(200),
    ]
    rng = random.Random(12)
    variants = []
    for data in bases:
        flipped = bytearray(data)
        flipped[rng.randrange(min(len(data), 64))] ^= 1 << rng.randrange(8)
        variants += [data, data[:16], data[: len(data) // 2], data + rng.randbytes(256), bytes(flipped)]
    return variants


def test_a_hundred_foreign_headers_named_jpg_are_each_a_reject():
    headers = foreign_headers()
    assert len(headers) >= 100
    assert sum(map(old_check_escapes, headers)) >= 3  # some of these used to fail the shard
    reasons = []
    for data in headers:
        with pytest.raises(ImageRejected) as rejected:
            inspect_image(data, min_side=8, max_pixels=100_000_000, formats=DEFAULT_FORMATS)
        reasons.append(rejected.value.reason)
        try:  # a user who allows every format gets the image or a reason, never a crash
            inspect_image(data, min_side=1, max_pixels=100_000_000, formats=ALL_FORMATS)
        except ImageRejected as other:
            assert other.reason in REASONS
    assert set(reasons) <= REASONS and "unsupported_format" in reasons and "decode_error" in reasons


def _seed(fmt: str, mode: str = "RGB", **params) -> bytes:
    buffer = io.BytesIO()
    rng = random.Random(fmt + mode)
    image = Image.new("RGB", (48, 40), (30, 160, 90))
    image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48 * 40)])
    if mode in ("I;16", "F"):
        image = image.convert("L").point(lambda v: v).convert("I").point(lambda v: v * 257).convert(mode)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _seed("JPEG", exif=exif)


def _animated_gif() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (48, 40), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], transparency=0)
    return buffer.getvalue()


SEEDS = {
    "jpeg": _seed("JPEG"),
    "jpeg-progressive-orientation-6": _rotated_jpeg(),
    "png": _seed("PNG"),
    "png-rgba": _seed("PNG", "RGBA"),
    "png-16-bit": _seed("PNG", "I;16"),
    "tiff": _seed("TIFF"),
    "tiff-lzw": _seed("TIFF", compression="tiff_lzw"),
    "tiff-float": _seed("TIFF", "F"),
    "gif-animated": _animated_gif(),
    "bmp": _seed("BMP"),
    "webp": _seed("WEBP"),
    "webp-lossless": _seed("WEBP", lossless=True),
}

_position = st.integers(min_value=0, max_value=1 << 20)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("overwrite"), _position, st.binary(min_size=1, max_size=16)),
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, position, *arg in mutations:
        at = position % max(len(out), 1)
        if kind == "flip" and out:
            out[at] ^= 1 << arg[0]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = arg[0]
        elif kind == "overwrite":
            out[at : at + len(arg[0])] = arg[0]
    return bytes(out)


@settings(max_examples=400, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(sorted(SEEDS)), mutations=st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_images_are_a_row_or_a_reject_never_an_exception(seed, mutations):
    data = mutate(SEEDS[seed], mutations)
    try:
        info = inspect_image(data, min_side=1, max_pixels=4_000_000, formats=DEFAULT_FORMATS)
    except ImageRejected as rejected:
        assert rejected.reason in REASONS and rejected.detail
        return
    # What ingest accepts, every later stage decodes, at the size ingest recorded.
    assert decode_rgb(data).size == (info.width, info.height)
    if info.normalise:
        stored, fmt = normalised_bytes(data)
        stored_info = inspect_image(stored, min_side=1, max_pixels=4_000_000, formats=DEFAULT_FORMATS)
        assert (stored_info.width, stored_info.height, stored_info.format, stored_info.normalise) == (info.width, info.height, fmt, ())


def test_seeds_decode_as_themselves():
    """The mutation test starts from real, valid images of every kind it claims to cover."""
    for name, data in SEEDS.items():
        info = inspect_image(data, min_side=8, max_pixels=4_000_000, formats=DEFAULT_FORMATS)
        assert (info.width, info.height) == ((40, 48) if "orientation" in name else (48, 40)), name
    assert Image.open(io.BytesIO(SEEDS["png-16-bit"])).mode.startswith("I;16")
    assert Image.open(io.BytesIO(SEEDS["tiff-float"])).mode == "F"


def test_animated_and_multi_picture_images_use_their_first_frame():
    gif = _animated_gif()
    assert inspect_image(gif, **LIMITS).format == "GIF"
    assert decode_rgb(gif).getpixel((5, 5)) == (255, 255, 255)  # frame 0's colour index 0 is transparent
    mpo = io.BytesIO()  # a phone's multi-picture JPEG is a JPEG to every viewer
    Image.new("RGB", (32, 32), (0, 0, 250)).save(mpo, "MPO", save_all=True, append_images=[Image.new("RGB", (32, 32))])
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    assert inspect_image(mpo.getvalue(), **LIMITS).format == "JPEG"
    assert to_rgb(Image.open(io.BytesIO(mpo.getvalue()))).getpixel((3, 3))[2] > 240
