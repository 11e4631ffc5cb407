"""Training data from shards: FgGRN rows joined with their image bytes.

FgGRN rows are streamed shard by shard (shard N of fggrn/ holds the keys of shard N of images/,
as every stage maps shard N to shard N), shuffled within a buffer, decoded in data-loader worker
processes. The order is fixed by the seed and the epoch, so a resumed run skips exactly the
samples the killed run had consumed.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.box_checks import check_box, shown
from pipeline.core.images import decode_rgb
from pipeline.core.shards import find_ancestor, list_shards, read_shard, shard_path
from pipeline.core.storage import location
from pipeline.datasets.fgclip_export import long_expression, released_long_exprs
from pipeline.errors import FgdataError

log = logging.getLogger(__name__)

def fgclip_sources(fggrn_dirs: list[Path], images_dir: Path | None) -> list[tuple[Path, Path]]:
    """(fggrn shard, images shard) pairs, the images found through lineage unless given."""
    pairs = []
    for fggrn in fggrn_dirs:
        # a Path, or a UPath for a URI: the rows are read through the store's filesystem
        images = location(images_dir) if images_dir else find_ancestor(location(fggrn), "images")
        if images is None:
            raise FgdataError(f"cannot find the image shards {fggrn} descends from; pass --images DIR")
        for shard in list_shards(location(fggrn)):
            image_shard = shard_path(images, shard.name)
            if not image_shard.exists():
                raise FgdataError(f"{shard} has no image shard {image_shard}; pass --images DIR")
            pairs.append((shard, image_shard))
    return pairs


def pixels(image_bytes: bytes, size: int, mean, std, upright: bool = True) -> torch.Tensor:
    """Decoded (EXIF orientation applied unless not `upright`), squashed to size x size (so
    normalised boxes stay where they were), normalised."""
    image = decode_rgb(image_bytes, upright).resize((size, size), Image.BICUBIC)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def fgclip_rows(pairs: list[tuple[Path, Path]], max_boxes: int | None, counts: Counter | None = None, with_images: bool = True):
    """Rows with their image bytes and (box, phrase, negatives) per usable region, the first
    `max_boxes` (None: all), in shard order, and each kept region's `long_exprs` (its released one,
    else `region_long_text`). A row without an image is skipped and a region that
    fails `check_region` dropped, each counted by reason in `counts` (callers log the summary
    once: a stream reads the rows again every epoch). `with_images=False` reads only the image
    keys and yields rows without bytes: the trainer's cheap pass that counts usable rows."""
    counts = Counter() if counts is None else counts
    for fggrn_shard, image_shard in pairs:
        columns = read_shard(image_shard, columns=["key", "image"] if with_images else ["key"]).to_pydict()
        images = dict(zip(columns["key"], columns["image"] if with_images else [None] * len(columns["key"])))
        table = read_shard(fggrn_shard)
        if not {"key", "regions", "long_caption", "short_caption"} <= set(table.column_names):
            raise FgdataError(f"{fggrn_shard}: needs columns key, regions, long_caption and short_caption (an FgGRN dataset)")
        for row in table.to_pylist():
            counts["rows"] += 1
            if row["key"] not in images:
                counts["skipped_no_image"] += 1
                continue
            boxes, long_exprs, flagged = [], [], []
            for region, released in zip(row["regions"] or [], released_long_exprs(row)):
                usable, problem = check_region(region)
                if problem:
                    counts[f"dropped_{problem[0]}"] += 1
                elif max_boxes is None or len(boxes) < max_boxes:
                    boxes.append(usable)
                    # FgGRN's flag_short_neg: FG-CLIP's loader puts a box in the hard-negative loss
                    # only when its flag says so (train_fgclip.py:271), whatever negatives it lists
                    flagged.append(region.get("negatives_flag") in (None, "ok"))
                    long_exprs.append(released or region_long_text(row, region))
            counts["rows_usable"] += 1
            yield {
                "key": row["key"],
                "image": images[row["key"]],
                "long": row["long_caption"] or row["short_caption"] or "",
                "short": row["short_caption"] or "",
                "boxes": boxes,
                "long_exprs": long_exprs,
                "flagged": flagged,
            }


def region_long_text(row: dict, region: dict) -> str:
    """FG-CLIP's `long_expr` for a region without a released one: the phrase with its modifiers from
    the long caption, as `fgdata export fgclip` writes it (export_fgclip.long_expression), or the
    phrase itself where the row lacks what that needs (caption spans, phrase_source)."""
    try:
        text, _ = long_expression(row, region)
    except (KeyError, TypeError, AttributeError):  # a row without spans or captions of the usual types
        return region["phrase"]
    return text if text.strip() else region["phrase"]


def check_region(region) -> tuple[tuple[list[float], str, list[str]] | None, tuple[str, str] | None]:
    """((box clamped to the image, phrase, negatives), None) for a region the trainer can use, or
    (None, (reason, detail)): a bad box must never reach RoIAlign. Blank negatives are left out."""
    if not isinstance(region, dict) or not isinstance(region.get("phrase"), str) or not region["phrase"].strip():
        return None, ("region_without_phrase", f"region {shown(region)}")
    box, problem = check_box(region.get("box_norm"))
    if problem:
        return None, problem
    negatives = [n["text"] for n in region.get("negatives") or [] if isinstance(n, dict) and isinstance(n.get("text"), str) and n["text"].strip()]
    return (box, region["phrase"], negatives), None


def count_fgclip_rows(pairs: list[tuple[Path, Path]], max_boxes: int | None, hard_negatives: int = 0) -> Counter:
    """Rows, usable rows and skips by reason over every pair, without reading image bytes; with
    `hard_negatives` (K), the kept boxes by their part in the hard-negative loss: in it (flagged,
    K negatives or more), flagged with fewer than K, or not flagged. Logged once here, so the
    stream that reads the rows every epoch stays quiet."""
    counts = Counter(rows=0, rows_usable=0)
    for row in fgclip_rows(pairs, max_boxes, counts, with_images=False):
        for (_, _, negatives), flagged in zip(row["boxes"], row["flagged"]) if hard_negatives else ():
            counts["hard_negative_boxes" if flagged and len(negatives) >= hard_negatives else "hard_negative_boxes_too_few" if flagged else "hard_negative_boxes_not_flagged"] += 1
    skipped = {k: v for k, v in sorted(counts.items()) if k.startswith(("skipped_", "dropped_"))}
    if skipped:
        log.warning("fgclip data: %d of %d rows usable; %s", counts["rows_usable"], counts["rows"], ", ".join(f"{k} {v}" for k, v in skipped.items()))
    if hard_negatives:
        # said on every run: boxes left out of a loss must never go unseen
        log.log(
            logging.WARNING if counts["hard_negative_boxes_too_few"] else logging.INFO,
            "fgclip hard negatives: %d boxes in the loss, %d flagged but with fewer than %d negatives left out, %d not flagged left out",
            counts["hard_negative_boxes"], counts["hard_negative_boxes_too_few"], hard_negatives, counts["hard_negative_boxes_not_flagged"],
        )
    return counts


class FgclipStream(torch.utils.data.IterableDataset):
    """Endless stream of decoded samples: epoch e shuffles shard order and rows (buffer) with seed + e;
    it ends only when a whole pass has no row for it."""

    def __init__(self, pairs, settings, mean, std, skip_batches: int = 0, rank: int = 0, world: int = 1):
        self.pairs, self.settings, self.mean, self.std = pairs, settings, mean, std
        self.skip_batches, self.rank, self.world = skip_batches, rank, world

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream, streams = self.rank * workers + worker, self.world * workers
        s = self.settings
        # the loader takes batches from its workers in turn: of the batches already consumed,
        # this worker made every workers-th one, starting with its id
        skip = -(-max(0, self.skip_batches - worker) // workers) * s.batch_size
        epoch = 0
        while True:
            rng = random.Random(s.seed * 1_000_003 + epoch)
            order = list(self.pairs)
            rng.shuffle(order)
            buffer, seen = [], 0
            for index, row in enumerate(fgclip_rows(order, s.max_boxes)):
                if index % streams != stream:
                    continue
                seen += 1
                buffer.append(row)
                if len(buffer) >= s.shuffle_buffer:
                    row = buffer.pop(rng.randrange(len(buffer)))
                    if skip:
                        skip -= 1
                    else:
                        yield self._decode(row, epoch)
            rng.shuffle(buffer)
            for row in buffer:
                if skip:
                    skip -= 1
                else:
                    yield self._decode(row, epoch)
            if not seen:
                return  # a pass with nothing for this stream would repeat forever
            epoch += 1

    def _decode(self, row: dict, epoch: int) -> dict:
        return {**row, "region_texts": region_texts(row, self.settings.seed, epoch), "pixels": pixels(row["image"], self.settings.image_size, self.mean, self.std), "image": None}


def region_texts(row: dict, seed: int, epoch: int) -> list[str]:
    """Each box's text for the regional loss: its phrase (short_expr) or its long_expr, drawn at
    random as FG-CLIP's loader does (train_fgclip.py:230); the draw depends only on the seed, the
    epoch and the row's key, so a resumed run draws the same."""
    rng = random.Random(f"{seed}/{epoch}/{row['key']}")
    return [rng.choice([phrase, long]) for (_, phrase, _), long in zip(row["boxes"], row["long_exprs"])]


def collate_fgclip(samples: list[dict]) -> dict:
    """One batch; per box (in image order): its box, its phrase (short_expr, the hard-negative
    positive), its region text (short_expr or long_expr, the regional loss's), its negatives and
    whether it is flagged for the hard-negative loss."""
    boxes, phrases, texts, negatives, flagged = [], [], [], [], []
    for index, sample in enumerate(samples):
        for (box, phrase, negs), text, flag in zip(sample["boxes"], sample["region_texts"], sample["flagged"]):
            boxes.append([float(index), *box])
            phrases.append(phrase)
            texts.append(text)
            negatives.append(negs)
            flagged.append(flag)
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "long": [s["long"] for s in samples],
        "short": [s["short"] for s in samples],
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5),
        "phrases": phrases,
        "region_texts": texts,
        "negatives": negatives,
        "flagged": flagged,
    }
