"""Training data from shards: FgGRN rows joined with their image bytes, and HierarCaps chains.

FgGRN rows are streamed shard by shard (shard N of fggrn/ holds the keys of shard N of images/,
as every stage maps shard N to shard N), shuffled within a buffer, decoded in data-loader worker
processes. The order is fixed by the seed and the epoch, so a resumed run skips exactly the
samples the killed run had consumed.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import FgdataError
from pipeline.shards import find_ancestor, list_shards, read_shard

log = logging.getLogger(__name__)


def fgclip_sources(fggrn_dirs: list[Path], images_dir: Path | None) -> list[tuple[Path, Path]]:
    """(fggrn shard, images shard) pairs, the images found through lineage unless given."""
    pairs = []
    for fggrn in fggrn_dirs:
        images = Path(images_dir) if images_dir else find_ancestor(Path(fggrn), "images")
        if images is None:
            raise FgdataError(f"cannot find the image shards {fggrn} descends from; pass --images DIR")
        for shard in list_shards(Path(fggrn)):
            image_shard = images / shard.name
            if not image_shard.exists():
                raise FgdataError(f"{shard} has no image shard {image_shard}; pass --images DIR")
            pairs.append((shard, image_shard))
    return pairs


def pixels(image_bytes: bytes, size: int, mean, std) -> torch.Tensor:
    """Decoded, squashed to size x size (so normalised boxes stay where they were), normalised."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB").resize((size, size), Image.BICUBIC)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def fgclip_rows(pairs: list[tuple[Path, Path]], max_boxes: int | None):
    """Rows with their image bytes and (box, phrase, negatives) per region, the first `max_boxes`
    (None: all), in shard order; rows without an image are logged and skipped."""
    for fggrn_shard, image_shard in pairs:
        images = dict(zip(*read_shard(image_shard, columns=["key", "image"]).to_pydict().values()))
        for row in read_shard(fggrn_shard).to_pylist():
            if row["key"] not in images:
                log.warning("%s: no image for key %s, skipped", fggrn_shard.name, row["key"])
                continue
            yield {
                "key": row["key"],
                "image": images[row["key"]],
                "long": row["long_caption"] or row["short_caption"] or "",
                "short": row["short_caption"] or "",
                "boxes": [(r["box_norm"], r["phrase"], [n["text"] for n in r["negatives"]]) for r in row["regions"][:max_boxes]],
            }


class FgclipStream(torch.utils.data.IterableDataset):
    """Endless stream of decoded samples: epoch e shuffles shard order and rows (buffer) with seed + e."""

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
            buffer = []
            for index, row in enumerate(fgclip_rows(order, s.max_boxes)):
                if index % streams != stream:
                    continue
                buffer.append(row)
                if len(buffer) >= s.shuffle_buffer:
                    row = buffer.pop(rng.randrange(len(buffer)))
                    if skip:
                        skip -= 1
                    else:
                        yield self._decode(row)
            rng.shuffle(buffer)
            for row in buffer:
                if skip:
                    skip -= 1
                else:
                    yield self._decode(row)
            epoch += 1

    def _decode(self, row: dict) -> dict:
        return {**row, "pixels": pixels(row["image"], self.settings.image_size, self.mean, self.std), "image": None}


def collate_fgclip(samples: list[dict]) -> dict:
    boxes, phrases, negatives = [], [], []
    for index, sample in enumerate(samples):
        for box, phrase, negs in sample["boxes"]:
            boxes.append([float(index), *box])
            phrases.append(phrase)
            negatives.append(negs)
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "long": [s["long"] for s in samples],
        "short": [s["short"] for s in samples],
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 5),
        "phrases": phrases,
        "negatives": negatives,
    }
