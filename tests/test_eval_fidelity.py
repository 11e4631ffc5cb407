"""`fgdata eval` on the benchmarks as their reference evaluators read them.

- EXIF: FG-CLIP's fgclip/eval/fgovd_eval.py:86-97 (0fcea59) opens an image with
  `Image.open(path).convert('RGB')`, which ignores EXIF orientation, and makes the box relative to
  that `img.size`; HierarCaps' code/evaluation/hierarchical_retrieval.py opens its images the same
  way. Pixels and boxes stay in the stored frame; `exif_rotate` turns both.
- The FG-OVD figure: fgovd_eval.py:65-66 `itemnum = len(jsonlist)` (every line of the file) and
  :129 `pred_true / itemnum`; a box without negatives is alone in its softmax, so it counts right.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.images import decode_rgb
from pipeline.eval import evaluate as ev

ORIENTATION = 0x0112  # the EXIF tag


def oriented_image(size, red_box, orientation: int, fmt: str = "PNG") -> bytes:
    """A blue image, stored `size` (w, h), red inside `red_box` (pixels), tagged with `orientation`."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), red_box)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def red_bounds(image: Image.Image) -> list[float]:
    """The 0-1 box of the red pixels."""
    red = torch.from_numpy(np.array(image)).float()
    mask = (red[..., 0] > 128) & (red[..., 2] < 128)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    width, height = image.size
    return [xs.min().item() / width, ys.min().item() / height, (xs.max().item() + 1) / width, (ys.max().item() + 1) / height]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_turns_with_the_pixels_for_every_exif_orientation(orientation):
    """oriented_box moves a stored-frame box where PIL's exif_transpose moves its pixels."""
    stored = (40, 24)
    data = oriented_image(stored, (8, 4, 20, 12), orientation)
    box = [8 / 40, 4 / 24, 20 / 40, 12 / 24]
    assert red_bounds(decode_rgb(data, upright=False)) == pytest.approx(box)
    assert red_bounds(decode_rgb(data)) == pytest.approx(ev.oriented_box(box, orientation))


def box_colours(encoder, items, upright: bool) -> list[torch.Tensor]:
    """What each box feature sees, with a stand-in model whose patch grid is the pixels themselves."""
    return [colour for regions in ev.encode_items(encoder, items, upright)[1] for colour in regions]


@pytest.fixture(scope="module")
def pixel_encoder(tmp_path_factory):
    """The real Encoder on a tiny CLIP, its features replaced by the image's own pixels (mean 0,
    std 1): a box feature is then the normalised mean colour under the box."""
    from pipeline.models.tiny import build_tiny_clip

    encoder = ev.Encoder(str(build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", ["a red square"] * 10)))
    encoder.parts.mean, encoder.parts.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return encoder


@pytest.mark.parametrize("exif_rotate", [False, True])
def test_an_fg_ovd_box_on_an_orientation_6_jpeg_covers_its_object(tmp_path, pixel_encoder, monkeypatch, exif_rotate):
    """A 64 x 32 JPEG stored sideways (orientation 6: shown turned a quarter clockwise), its red
    object in the stored left quarter: the box sits on it whether or not the image is turned, as
    long as pixels and box are in the same frame."""
    monkeypatch.setattr(ev, "image_and_patch_features", lambda model, batch: (batch.mean(dim=(2, 3)), batch))
    (tmp_path / "photo.jpg").write_bytes(oriented_image((64, 32), (0, 0, 16, 32), 6, "JPEG"))
    line = {"img_path": "photo.jpg", "bbox": [0, 0, 16, 32], "pos_expression": "a red square", "neg_expression": ["a blue square"]}
    (tmp_path / "fg.jsonl").write_text(json.dumps(line) + "\n")
    (item,) = ev.fgovd_items(tmp_path / "fg.jsonl", None, exif_rotate=exif_rotate)
    expected_box = [0.0, 0.0, 1.0, 0.25] if exif_rotate else [0.0, 0.0, 0.25, 1.0]  # turned: the stored left strip is the top
    assert item["boxes"][0][0] == pytest.approx(expected_box)
    (colour,) = box_colours(pixel_encoder, [item], upright=exif_rotate)
    assert colour[0] > 0.95 and colour[2] < 0.2, colour  # red under the box, not blue


def test_the_reference_frame_is_the_default_for_fg_ovd_and_hierarcaps(tmp_path):
    import inspect

    assert inspect.signature(ev.fgovd_items).parameters["exif_rotate"].default is False
    assert inspect.signature(ev.fgovd_benchmark).parameters["exif_rotate"].default is False
    assert inspect.signature(ev.hierarchy_metrics).parameters["exif_rotate"].default is False
    # HierarCaps' images: the stored frame (64 wide, 32 high) unless turned
    data = oriented_image((64, 32), (0, 0, 16, 32), 6)
    view = ev.ProcessorView(None, None, None, int(Image.BICUBIC), 1 / 255, (0.0,) * 3, (1.0,) * 3)
    assert ev.view_pixels(data, view, upright=False).shape == (3, 32, 64)
    assert ev.view_pixels(data, view, upright=True).shape == (3, 64, 32)

    class Views:
        def texts(self, texts, long=False):
            return torch.nn.functional.normalize(torch.rand(len(texts), 3, generator=torch.Generator().manual_seed(0)) + 0.1, dim=-1)

        def views(self, images, upright=True):
            self.upright = upright
            return torch.ones(len(images), 3)

    encoder = Views()
    ev.hierarchy_metrics(encoder, [["a", "b", "c", "d"]], [data])
    assert encoder.upright is False


class TextStub:
    """Region features [1]; a text's score is its number (no image is encoded)."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def texts(self, texts, long=False):
        return torch.tensor([[self.scores[t]] for t in texts])

    def images(self, images, boxes=None, upright=True):
        return torch.zeros(len(images), 1), [torch.ones(len(b), 1) for b in boxes]


def test_fg_ovd_accuracy_is_over_every_line_of_the_file_with_the_scored_share_beside_it(tmp_path):
    (tmp_path / "a.png").write_bytes(oriented_image((32, 32), (0, 0, 8, 8), 1))
    lines = [
        {"img_path": "a.png", "bbox": [0, 0, 8, 8], "pos_expression": "right", "neg_expression": ["low"]},  # right
        {"img_path": "a.png", "bbox": [0, 0, 8, 8], "pos_expression": "wrong", "neg_expression": ["high"]},  # wrong
        {"img_path": "a.png", "bbox": [0, 0, 8, 8], "pos_expression": "alone", "neg_expression": []},  # right in the reference's softmax of one
        {"img_path": "missing.png", "bbox": [0, 0, 8, 8], "pos_expression": "right", "neg_expression": ["low"]},  # skipped: wrong
    ]
    (tmp_path / "fg.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    scores = {"right": 0.9, "low": 0.1, "wrong": 0.2, "high": 0.8, "alone": 0.5}
    result = ev.fgovd_benchmark(TextStub(scores), tmp_path / "fg.jsonl", None)
    assert result["lines"] == 4 and result["lines_right"] == 2 and result["accuracy"] == pytest.approx(2 / 4)  # the reference's figure
    assert result["boxes"] == 2 and result["right"] == 1 and result["accuracy_scored"] == pytest.approx(1 / 2)
    assert result["left_out_no_negatives"] == 1 and result["lines_skipped"] == 1 and result["skipped"] == {"image_not_found": 1}
    table = ev.format_table({"model": "m", "fg_ovd_benchmark": result})
    assert "fg_ovd_benchmark.accuracy " in table and "fg_ovd_benchmark.accuracy_scored" in table
