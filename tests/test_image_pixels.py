"""The pixels the detector and the trainer see (issue 21, "silently wrong data"): EXIF orientation,
16-bit and float images, transparency; and the bytes ingest stores so that every loader agrees."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, make_config
from PIL import Image

from pipeline.core.images import BACKGROUND, decode_rgb, inspect_image, to_rgb
from pipeline.core.schemas import conform
from pipeline.stages.base import WorkUnit
from pipeline.stages.fggrn.ground import GroundStage
from pipeline.stages.fggrn.ingest import IngestStage

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
LIMITS = dict(min_side=8, max_pixels=100_000_000, formats=["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def phone_photo() -> bytes:
    """320x200 as stored, top-left quadrant red, the rest blue, EXIF Orientation 6 ("rotate 90°
    clockwise to display") plus a camera make that must survive ingest."""
    stored = Image.new("RGB", (320, 200), BLUE)
    stored.paste(RED, (0, 0, 160, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "fgdata-test-camera"
    return encode(stored, "JPEG", quality=95, exif=exif)


def is_red(pixel) -> bool:
    return pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60


def assert_upright_phone_photo(image: Image.Image) -> None:
    # Turning the stored frame 90° clockwise takes its top-left quadrant to the top-right.
    assert image.size == (200, 320)
    assert is_red(image.getpixel((150, 80))), image.getpixel((150, 80))
    assert not is_red(image.getpixel((50, 80))) and not is_red(image.getpixel((150, 240)))


def gradient_16_bit() -> tuple[bytes, np.ndarray]:
    """A 16-bit grey PNG, a horizontal gradient around mid-grey (16384..49151)."""
    values = np.tile(np.linspace(16384, 49151, 64).round().astype(np.uint16), (32, 1))
    return encode(Image.fromarray(values)), values


def hidden_green() -> bytes:
    """RGBA whose left half is fully transparent over green, right half opaque red."""
    pixels = np.zeros((32, 64, 4), dtype=np.uint8)
    pixels[:, :32] = (0, 255, 0, 0)
    pixels[:, 32:] = (255, 0, 0, 255)
    return encode(Image.fromarray(pixels))


# --- to_rgb: the one decode ----------------------------------------------------------------------


def test_an_orientation_6_jpeg_comes_out_upright():
    data = phone_photo()
    assert Image.open(io.BytesIO(data)).convert("RGB").size == (320, 200)  # what a plain decode gave
    assert_upright_phone_photo(decode_rgb(data))
    info = inspect_image(data, **LIMITS)
    assert (info.width, info.height, info.normalise) == (200, 320, ("exif_orientation",))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_restores_the_upright_image(orientation):
    upright = Image.new("RGB", (30, 20), BLUE)
    upright.paste(RED, (0, 0, 10, 5))  # marks the top-left corner; the image is not symmetric
    # The stored frame is the upright one put through the inverse of what the tag asks a viewer to do.
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}
    stored = upright.transpose(undo[orientation]) if orientation in undo else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    assert np.array_equal(np.asarray(decode_rgb(encode(stored, exif=exif))), np.asarray(upright))


def test_a_16_bit_png_is_scaled_not_clipped_to_white():
    data, values = gradient_16_bit()
    image = Image.open(io.BytesIO(data))
    assert image.mode.startswith("I;16")
    plain = np.asarray(image.convert("RGB"))
    assert (plain == 255).all(axis=2).mean() > 0.99  # the defect: convert("RGB") clips to white
    rgb = np.asarray(to_rgb(image)).astype(int)
    assert (rgb == 255).all(axis=2).mean() < 0.01
    expected = np.rint(values / 257).astype(int)
    for channel in range(3):
        assert np.abs(rgb[..., channel] - expected).max() <= 1


@pytest.mark.parametrize(
    "values, expected",
    [
        (np.tile(np.linspace(0, 1, 64, dtype=np.float32), (16, 1)), lambda v: v * 255),  # 0..1 floats
        (np.tile(np.linspace(-50, 950, 64, dtype=np.float32), (16, 1)), lambda v: (v + 50) * 255 / 1000),  # stretched
    ],
    ids=["unit-range", "any-range"],
)
def test_a_float_tiff_is_scaled_to_8_bits(values, expected):
    rgb = np.asarray(decode_rgb(encode(Image.fromarray(values), "TIFF"))).astype(int)
    assert np.abs(rgb[..., 0] - np.rint(expected(values.astype(np.float64)))).max() <= 1
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255


def test_non_finite_floats_do_not_break_the_scaling():
    values = np.tile(np.linspace(0, 10, 32, dtype=np.float32), (16, 1))
    values[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
    rgb = np.asarray(decode_rgb(encode(Image.fromarray(values), "TIFF")))
    assert rgb.dtype == np.uint8 and rgb[1, -1, 0] == 255 and rgb[1, 0, 0] == 0


def test_fully_transparent_pixels_show_the_background_not_their_hidden_colour():
    data = hidden_green()
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((5, 5)) == GREEN  # the defect
    rgb = decode_rgb(data)
    assert rgb.getpixel((5, 5)) == BACKGROUND and rgb.getpixel((50, 5)) == RED
    assert not (np.asarray(rgb) == GREEN).all(axis=2).any()


def test_half_transparent_pixels_blend_with_the_background_and_palette_transparency_counts():
    half = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    assert all(abs(a - b) <= 1 for a, b in zip(to_rgb(half).getpixel((3, 3)), (255, 127, 127)))
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    gif = encode(palette, "GIF", transparency=1)  # the transparent index is green
    assert Image.open(io.BytesIO(gif)).convert("RGB").getpixel((3, 3)) == GREEN
    assert decode_rgb(gif).getpixel((3, 3)) == BACKGROUND


def test_to_rgb_is_idempotent_and_leaves_plain_rgb_alone():
    for data in (phone_photo(), gradient_16_bit()[0], hidden_green(), image_bytes()):
        once = decode_rgb(data)
        assert once.mode == "RGB" and np.array_equal(np.asarray(to_rgb(once)), np.asarray(once))
    plain = Image.open(io.BytesIO(image_bytes()))
    plain.load()
    assert inspect_image(image_bytes(), **LIMITS).normalise == ()
    assert to_rgb(plain) is plain  # the common case costs no copy


def test_a_mode_that_does_not_convert_is_a_reason_not_a_crash():
    from pipeline.core.images import ImageRejected

    with pytest.raises(ImageRejected) as rejected:
        to_rgb(Image.new("La", (8, 8)))
    assert rejected.value.reason == "unsupported_mode"


# --- ingest stores bytes every loader decodes the same way ---------------------------------------


def ingest(tmp_path, files: dict[str, bytes]):
    source = tmp_path / "source"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    config = make_config()
    stage = IngestStage(source)
    [unit] = stage.plan(config)
    result = stage.process(unit, config)
    return {row["key"]: row for row in result.table.to_pylist()}, result


def test_ingest_stores_upright_8_bit_flattened_bytes_and_counts_them(tmp_path):
    opaque_rgba = encode(Image.new("RGBA", (40, 30), (10, 20, 30, 255)))
    files = {
        "phone.jpg": phone_photo(),
        "gradient.png": gradient_16_bit()[0],
        "hidden.png": hidden_green(),
        "plain.jpg": image_bytes(),
        "opaque.png": opaque_rgba,
    }
    rows, result = ingest(tmp_path, files)
    assert result.rejects == [] and len(rows) == 5
    assert {k: v for k, v in result.counters.items() if k.startswith("normalised_")} == {
        "normalised_exif_orientation": 1,
        "normalised_high_bit_depth": 1,
        "normalised_transparency": 1,
    }
    # Images a plain decoder already shows right are kept byte for byte.
    assert rows["plain"]["image"] == files["plain.jpg"] and rows["opaque"]["image"] == opaque_rgba

    phone = rows["phone"]
    assert (phone["width"], phone["height"], phone["format"]) == (200, 320, "JPEG")
    stored = Image.open(io.BytesIO(phone["image"]))
    assert stored.getexif().get(0x0112) is None and stored.getexif().get(0x010F) == "fgdata-test-camera"
    assert_upright_phone_photo(stored.convert("RGB"))  # what FG-CLIP's loader or a browser shows
    assert_upright_phone_photo(decode_rgb(phone["image"]))  # what the detector sees

    gradient = rows["gradient"]
    assert (gradient["width"], gradient["height"], gradient["format"]) == (64, 32, "PNG")
    for name in ("gradient", "hidden"):
        plain = np.asarray(Image.open(io.BytesIO(rows[name]["image"])).convert("RGB"))
        assert np.array_equal(plain, np.asarray(decode_rgb(files[f"{name}.png"]))), name
    assert Image.open(io.BytesIO(rows["hidden"]["image"])).convert("RGB").getpixel((5, 5)) == BACKGROUND
    conform(list(rows.values()), "images")  # still the images contract


# --- the detector's input path -------------------------------------------------------------------


def test_ground_hands_the_detector_upright_8_bit_flattened_images(tmp_path):
    """GroundStage.prepare is what feeds model.detect: its images must be the to_rgb pixels, and
    their size (which becomes the regions' width/height and box_norm) the upright one — even for
    image shards whose bytes were never normalised (written by hand or by an older ingest)."""
    phrases_dir, images_dir = tmp_path / "phrases", tmp_path / "images"
    phrases_dir.mkdir()
    images_dir.mkdir()
    raw = {"phone": phone_photo(), "gradient": gradient_16_bit()[0], "hidden": hidden_green()}
    phrase = {"text": "a red square", "start": 0, "end": 12, "head": "square", "mentions": 1}
    phrase_rows = [{"key": k, "short_caption": "a red square", "long_caption": None, "phrase_source": "short_caption",
                    "spacy_model": "x", "phrases": [phrase]} for k in raw]
    pq.write_table(conform(phrase_rows, "phrases"), phrases_dir / "part-00000.parquet")
    image_rows = [{"key": k, "image": v, "width": 1, "height": 1, "format": "PNG", "short_caption": None, "source": "t"}
                  for k, v in raw.items()]
    pq.write_table(conform(image_rows, "images"), images_dir / "part-00000.parquet")
    unit = WorkUnit("part-00000.parquet", {"phrases": str(phrases_dir / "part-00000.parquet"),
                                           "images": str(images_dir / "part-00000.parquet"), "rows": 3})
    [batch] = GroundStage(phrases_dir, images_dir).prepare(unit, make_config())
    seen = dict(zip((row["key"] for row in batch.rows), batch.images))
    assert batch.rejects == [] and set(seen) == set(raw)
    assert_upright_phone_photo(seen["phone"])
    assert (np.asarray(seen["gradient"]) == 255).all(axis=2).mean() < 0.01
    assert seen["hidden"].getpixel((5, 5)) == BACKGROUND


def test_the_trainer_sees_the_same_pixels():
    from pipeline.datasets.fggrn_rows import pixels

    data, values = gradient_16_bit()
    tensor = pixels(data, 32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert tensor.shape == (3, 32, 32) and 0.3 < float(tensor.mean()) < 0.7  # mid-grey, not white
