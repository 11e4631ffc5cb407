"""Image bytes: the checks ingest makes, and the one decode to RGB that every consumer uses.

`to_rgb` is the single definition of "the pixels of an image": EXIF orientation applied,
high-bit-depth modes scaled to 8 bits, transparency composited over white. Ingest stores
bytes that any plain loader (`Image.open(...).convert("RGB")`, FG-CLIP's own) decodes to
those same pixels, re-encoding the few images for which that is not already true.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from pipeline.errors import first_line

# Transparent pixels are shown over white, as a browser page shows them; their hidden colour
# (often garbage or a key colour) is never revealed.
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_HIGH_BIT_DEPTH = _SIXTEEN_BIT | {"I", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int  # of the upright image, as `to_rgb` returns it
    height: int
    format: str
    # Why the stored bytes would decode differently in a plain loader than through `to_rgb`
    # ("exif_orientation", "high_bit_depth", "transparency"); empty for almost every image.
    normalise: tuple[str, ...] = ()


def inspect_image(data: bytes, *, min_side: int, max_pixels: int, formats: list[str]) -> ImageInfo:
    """Returns the image's upright size and format, or raises ImageRejected with a reason code.

    Size is checked from the header before decoding, so a decompression bomb costs nothing;
    then the whole image is decoded and converted as every later stage will, which is the only
    way to catch a truncated file or a mode nothing can convert. Any other failure of the
    decoders (Pillow raises NotImplementedError, TypeError, struct.error ... on hostile bytes)
    is this image's `decode_error`, never the shard's.
    """
    if not data:
        raise ImageRejected("empty_file", "the file has 0 bytes")
    try:
        return _inspect(data, min_side, max_pixels, formats)
    except (ImageRejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring: one image's failure is its reject
        raise ImageRejected("decode_error", f"the image does not decode: {_quote(exc)}") from None


def image_format(data: bytes) -> str:
    """The format the header of `data` names, the pixels not decoded; ImageRejected('not_an_image')
    for bytes that no decoder recognises (a downloaded HTML page, say), 'decode_error' for a header
    cut short."""
    try:
        return _format(_open(data))
    except (ImageRejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - as in inspect_image: one image's failure is its reject
        raise ImageRejected("decode_error", f"the image header does not decode: {_quote(exc)}") from None


def _inspect(data: bytes, min_side: int, max_pixels: int, formats: list[str]) -> ImageInfo:
    image = _open(data)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected("image_too_large", f"{width}x{height} exceeds max_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise ImageRejected("image_too_small", f"{width}x{height} is below min_side={min_side}")
    fmt = _format(image)
    if fmt not in formats:
        raise ImageRejected("unsupported_format", f"format {fmt} is not in {formats}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image.load()
    rgb = to_rgb(image)
    normalise = []
    if orientation(image) != 1:
        normalise.append("exif_orientation")
    if image.mode in _HIGH_BIT_DEPTH:
        normalise.append("high_bit_depth")
    if _has_transparency(image):
        normalise.append("transparency")
    return ImageInfo(width=rgb.width, height=rgb.height, format=fmt, normalise=tuple(normalise))


def normalised_bytes(data: bytes) -> tuple[bytes, str]:
    """(bytes, format) whose plain decode equals `to_rgb` of `data`, for an image `inspect_image`
    said needs it. A JPEG that only needs turning upright stays a JPEG, re-encoded with its own
    quantisation tables and subsampling (one generation of rounding, same size class) and its
    EXIF kept minus the orientation tag; everything else becomes a lossless 8-bit RGB PNG."""
    try:
        return _normalised(data)
    except (ImageRejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - one image's failure is its reject
        raise ImageRejected("decode_error", f"the image does not re-encode: {_quote(exc)}") from None


def _normalised(data: bytes) -> tuple[bytes, str]:
    image = _open(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image.load()
    out = io.BytesIO()
    plain = image.mode in ("L", "RGB", "CMYK") and not _has_transparency(image)
    if _format(image) == "JPEG" and plain:
        upright = ImageOps.exif_transpose(image)
        sampling = JpegImagePlugin.get_sampling(image)
        upright.save(
            out,
            "JPEG",
            qtables=image.quantization,
            subsampling=sampling if sampling != -1 else 2,
            exif=_without_orientation(upright.getexif()),
            icc_profile=image.info.get("icc_profile"),
        )
        return out.getvalue(), "JPEG"
    icc = image.info.get("icc_profile") if image.mode in ("RGB", "RGBA") else None
    to_rgb(image).save(out, "PNG", icc_profile=icc)
    return out.getvalue(), "PNG"


def decode_rgb(data: bytes, upright: bool = True) -> Image.Image:
    """The RGB pixels of encoded image bytes (see `to_rgb`), or ImageRejected('decode_error').
    `upright=False` keeps the stored pixel frame, EXIF orientation ignored, as evaluators that open
    images with PIL alone see them (FG-CLIP's fgovd_eval.py:86, HierarCaps')."""
    try:
        image = _open(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
        return to_rgb(image, upright)
    except (ImageRejected, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - one image's failure is its reject
        raise ImageRejected("decode_error", f"the image does not decode: {_quote(exc)}") from None


def to_rgb(image: Image.Image, upright: bool = True) -> Image.Image:
    """The pixels every stage, the detector and the trainer see, as an 8-bit RGB image.

    - EXIF orientation is applied (a phone photo comes out upright; an unreadable EXIF block
      counts as no orientation, the same at ingest and everywhere after), unless `upright` is False.
    - 16-bit modes map by their full range, value / 257 (65535 → 255), the faithful mapping;
      mode I does the same when its values fit 16 bits (Pillow's container for 16-bit PNG/TIFF),
      else stretches its actual range; mode F keeps 0..1 floats as 0..255, else stretches its
      actual finite range. `convert("RGB")` would clip them all to near white.
    - Transparency is composited over BACKGROUND (white), so fully transparent pixels never
      reveal the colour stored under them.
    Only frame 0 of an animated or multi-frame image is used, as every loader does.
    Raises ImageRejected('unsupported_mode') for a mode Pillow cannot convert.
    """
    if upright and orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_BIT_DEPTH:
        image = _to_8bit(image)
    try:
        if _has_transparency(image):
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", image.size, BACKGROUND)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as exc:  # "conversion from X to RGB not supported"
        raise ImageRejected("unsupported_mode", f"mode {image.mode} does not convert to RGB: {_quote(exc)}") from None


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageRejected("not_an_image", f"{len(data)} bytes that no image decoder recognises") from None
        except Image.DecompressionBombError as exc:
            raise ImageRejected("image_too_large", str(exc)) from None


def _format(image: Image.Image) -> str:
    # A phone's MPO (JPEG plus extra pictures such as a depth map) is a JPEG to every viewer.
    return "JPEG" if image.format == "MPO" else str(image.format)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) `to_rgb` applies; 1 for none, an unreadable block or a bad value."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not cost the image
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _without_orientation(exif: Image.Exif) -> Image.Exif:
    exif.pop(ExifTags.Base.Orientation, None)
    return exif


def _has_transparency(image: Image.Image) -> bool:
    """Whether some pixel is not fully opaque (an alpha channel that is all 255 is not)."""
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return False
    if image.mode in _HIGH_BIT_DEPTH:
        return False  # a 16-bit grey tRNS key: too rare to honour; the pixels stay as stored
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "PA") else image.convert("RGBA").getchannel("A")
    return alpha.getextrema()[0] < 255


def _to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _quote(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"
