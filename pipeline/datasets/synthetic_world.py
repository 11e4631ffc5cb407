"""A synthetic world whose right answers are known, for proving that the trainer learns.

Images of coloured shapes (size, fill pattern, colour, shape) at known positions on a dark
background, each with a short caption, a long caption, one region per shape with its phrase and
box, 10 attribute-swap hard negatives per region, and a generic→specific hierarchy per image
(`shape => circle => red circle => <short caption>`) with a negative chain. Written as real
datasets (images, fggrn, hierarcaps) that `fgdata train` and `fgdata eval` read like any other.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.core.schemas import conform
from pipeline.core.shards import MANIFEST_FILE, shard_name, write_json, write_shard

SHAPES = ["circle", "square", "triangle"]
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
    "purple": (150, 60, 190), "orange": (240, 140, 30), "cyan": (40, 200, 210), "white": (235, 235, 235),
}
SIZES = {"small": 0.22, "large": 0.4}  # side as a fraction of the image
PATTERNS = ["solid", "striped", "outlined"]
OTHER_ROOTS = ["animal", "plant", "vehicle", "person"]  # top-tier negatives: not shapes
GENERATOR = "fgdata synthetic world v1"


def _phrase(size: str, pattern: str, colour: str, shape: str) -> str:
    return f"a {size} {pattern} {colour} {shape}"


def hard_negatives(size: str, pattern: str, colour: str, shape: str) -> list[tuple[str, str]]:
    """The 10 phrases that change exactly one attribute and keep the shape: 7 colours, 1 size, 2 patterns."""
    out = [(_phrase(size, pattern, c, shape), "colour") for c in COLOURS if c != colour]
    out += [(_phrase(s, pattern, colour, shape), "size") for s in SIZES if s != size]
    out += [(_phrase(size, p, colour, shape), "pattern") for p in PATTERNS if p != pattern]
    return out


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour, pattern: str) -> None:
    x1, y1, x2, y2 = box
    fill = colour if pattern in ("solid", "striped") else None
    outline_width = 2
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=colour, width=outline_width)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=colour, width=outline_width)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill, outline=colour, width=outline_width)
    if pattern == "striped":  # dark stripes across the filled shape
        for y in range(y1 + 2, y2, 4):
            draw.line([(x1, y), (x2, y)], fill=(25, 25, 25), width=1)


def _place(rng: random.Random, side: int, size_px: int, taken: list[tuple[int, int, int, int]]):
    for _ in range(100):
        x, y = rng.randint(1, side - size_px - 1), rng.randint(1, side - size_px - 1)
        box = (x, y, x + size_px, y + size_px)
        if all(box[2] <= t[0] or box[0] >= t[2] or box[3] <= t[1] or box[1] >= t[3] for t in taken):
            return box
    return None


def _where(box, side: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / side, (box[1] + box[3]) / 2 / side
    return f"at the {'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}"


def make_item(index: int, rng: random.Random, side: int) -> tuple[dict, dict, dict]:
    """(images row, fggrn row, hierarcaps row) of one image with one or two shapes."""
    image = Image.new("RGB", (side, side), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    objects, taken = [], []
    for _ in range(rng.choice([1, 2])):
        size, pattern, colour, shape = rng.choice(list(SIZES)), rng.choice(PATTERNS), rng.choice(list(COLOURS)), rng.choice(SHAPES)
        box = _place(rng, side, int(SIZES[size] * side), taken)
        if box is None:
            continue
        taken.append(box)
        _draw(draw, shape, box, COLOURS[colour], pattern)
        objects.append((size, pattern, colour, shape, box))
    phrases = [_phrase(*obj[:4]) for obj in objects]
    short = " and ".join(phrases)
    long_parts = [f"{p} {_where(obj[4], side)}" for p, obj in zip(phrases, objects)]
    long = "An image on a dark grey background showing " + " and ".join(long_parts) + "."
    regions, offset = [], 0
    for phrase, (size, pattern, colour, shape, box) in zip(phrases, objects):
        start = short.index(phrase, offset)
        offset = start + len(phrase)
        regions.append(
            {
                "phrase": phrase, "start": start, "end": offset, "head": shape,
                "box": [float(v) for v in box], "box_norm": [v / side for v in box], "score": 1.0,
                "negatives": [{"text": t, "attribute": a, "entailment": 0.0, "contradiction": 1.0, "neutral": 0.0} for t, a in hard_negatives(size, pattern, colour, shape)],
                "negatives_flag": "ok",
            }
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    key = f"world-{index:06d}"
    image_row = {"key": key, "image": buffer.getvalue(), "width": side, "height": side, "format": "PNG", "short_caption": short, "source": GENERATOR}
    fggrn_row = {
        "key": key, "short_caption": short, "long_caption": long, "phrase_source": "short_caption", "width": side, "height": side,
        "regions": regions, "detector": GENERATOR, "detector_is_random": False, "grounding": "{}",
        "negatives_backend": GENERATOR, "nli_model": "none", "nli_is_random": False, "negatives_settings": "{}",
    }
    size, pattern, colour, shape, _ = objects[0]
    other_shape = rng.choice([s for s in SHAPES if s != shape])
    other_colour = rng.choice([c for c in COLOURS if c != colour])
    hierarchy_row = {
        "key": key, "split": "train", "tiers": ["shape", shape, f"{colour} {shape}", short],
        "negative_tiers": [rng.choice(OTHER_ROOTS), other_shape, f"{other_colour} {shape}", short.replace(f" {colour} {shape}", f" {other_colour} {shape}", 1)],
        "image_url": None, "source": GENERATOR,
    }
    return image_row, fggrn_row, hierarchy_row


def write_world(out_dir: Path, count: int, seed: int = 0, side: int = 64, rows_per_shard: int = 256) -> dict[str, Path]:
    """Writes OUT/images, OUT/fggrn and OUT/hierarcaps, `count` items, deterministic for `seed`."""
    rng = random.Random(seed)
    items = [make_item(i, rng, side) for i in range(count)]
    out_dir = Path(out_dir)
    paths = {kind: out_dir / kind for kind in ("images", "fggrn", "hierarcaps")}
    for position, kind in enumerate(paths):
        rows = [item[position] for item in items]
        for shard, start in enumerate(range(0, count, rows_per_shard)):
            chunk = rows[start : start + rows_per_shard]
            stats = {"shard": shard_name(shard), "rows_in": len(chunk), "rows_out": len(chunk), "rows_rejected": 0, "counters": {}, "provenance": {"generator": GENERATOR}, "seconds": 0.0}
            write_shard(paths[kind], shard_name(shard), conform(chunk, kind), kind, [], stats)
        inputs = [{"path": str(paths["images"].resolve()), "stage": "synthetic-world"}] if kind != "images" else []
        write_json(paths[kind] / MANIFEST_FILE, {"stage": "synthetic-world", "kind": kind, "inputs": inputs, "rows_out": count, "config": {"seed": seed, "side": side}})
    (out_dir / "world.json").write_text(json.dumps({"generator": GENERATOR, "items": count, "seed": seed, "side": side}))
    return paths
