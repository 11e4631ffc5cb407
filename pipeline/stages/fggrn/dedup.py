"""`fgdata dedup`: exact and near-duplicate images across the whole dataset, one of each group kept.

Three passes, each spread over shards:
1. hash: every input shard's images decoded once, each to a digest of its pixels and a 64-bit pHash
   (`imagehash`); tasks on Ray, one per shard.
2. group: the hashes shuffled by bucket (exact pixels, and each band of the pHash: see
   pipeline/core/near_duplicates.py) to `dedup.partitions` reduce tasks, which return the pairs
   within `dedup.max_distance`; the driver joins pairs into groups. Nothing compares all pairs.
3. write: input shard N to output shard N as every stage does (markers, resume), each duplicate a
   `duplicate` reject naming the image kept.
The rule that picks the kept image is deterministic: the smallest (shard name, key) of the group.
Groups are transitive (a~b and b~c put a, b, c in one group), so a reject's distance to the kept
image can exceed max_distance; the detail gives it. Passes 1-2 run in planning and are redone
on a rerun (they decode each image once); pass 3's finished shards are skipped, and since the
decisions are part of every shard's fingerprint, a rerun that decides otherwise is refused.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import ray

from pipeline.config import Config, DedupConfig
from pipeline.core.images import ImageRejected, decode_rgb
from pipeline.core.near_duplicates import HashedItem, duplicates_to_drop, map_to_partitions, pairs_in_partition
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import lineage_entry, list_shards, read_shard, read_shard_schema
from pipeline.core.storage import resolved
from pipeline.stages.base import ShardResult, Stage, WorkUnit, reject

# the columns ingest writes; the columns screen adds are carried when present
REQUIRED_COLUMNS = {
    "key": pa.string(), "image": pa.binary(), "width": pa.int32(), "height": pa.int32(),
    "format": pa.string(), "short_caption": pa.string(), "source": pa.string(),
}


def image_hashes(data: bytes) -> tuple[str, int]:
    """(digest of the decoded RGB pixels and size, 64-bit pHash) of encoded image bytes."""
    image = decode_rgb(data)
    pixels = hashlib.sha256(f"{image.width}x{image.height}\0".encode() + image.tobytes()).hexdigest()[:32]
    bits = imagehash.phash(image, hash_size=8).hash.flatten()
    return pixels, int.from_bytes(np.packbits(bits).tobytes(), "big")


def caption_digest(caption: str | None) -> str | None:
    """Captions that differ only in case and spacing count as the same caption."""
    text = " ".join((caption or "").lower().split())
    return hashlib.sha256(text.encode()).hexdigest()[:32] if text else None


def hash_shard(path: str) -> dict:
    """Pass 1 for one shard: its HashedItems, its images that do not decode (key -> problem), and
    (ident, caption digest) of its captions. Rows without a key or with a repeated one are left to
    `process`, which rejects them."""
    name = Path(path).name
    table = read_shard(path, columns=["key", "image", "short_caption"])
    items, bad, captions, seen = [], {}, [], set()
    for key, data, caption in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        if key is None or key in seen:
            continue
        seen.add(key)
        try:
            pixels, phash = image_hashes(data)
        except ImageRejected as problem:
            bad[key] = (problem.reason, problem.detail)
            continue
        items.append(HashedItem((name, key), pixels, phash))
        captions.append(((name, key), caption_digest(caption)))
    return {"items": items, "bad": bad, "captions": captions}


def _hash_and_partition(path: str, bands: int, partitions: int) -> tuple:
    """Pass 1 and the map side of pass 2 in one Ray task: the partitions first, then what the driver needs."""
    hashed = hash_shard(path)
    return (*map_to_partitions(hashed["items"], bands, partitions), hashed)


def _pairs_of_partition(max_distance: int, *pieces: list) -> list:
    return pairs_in_partition((entry for piece in pieces for entry in piece), max_distance)


class DedupStage(Stage):
    name = "dedup"
    output_kind = "images"
    config_section = "dedup"

    def __init__(self, images_dir: Path):
        self.images_dir = resolved(images_dir)  # a local path or a URI

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.images_dir)]

    def plan(self, config: Config) -> list[WorkUnit]:
        paths = list_shards(self.images_dir)
        for path in paths:
            check_input_columns(read_shard_schema(path), REQUIRED_COLUMNS, where=str(path))
        hashed, dropped = self._find_duplicates([str(p) for p in paths], config)
        caption_repeats = _caption_repeats(hashed)
        units = []
        for path, shard in zip(paths, hashed):
            mine = {ident[1]: found for ident, found in dropped.items() if ident[0] == path.name}
            payload = {
                "path": str(path),
                # sorted tuples: the payload's repr is part of the shard's fingerprint
                "duplicates": tuple(sorted((key, *kept, distance, same) for key, (kept, distance, same) in mine.items())),
                "unusable": tuple(sorted((key, *problem) for key, problem in shard["bad"].items())),
                "caption_repeats": caption_repeats.get(path.name, 0),
            }
            units.append(WorkUnit(path.name, payload))
        return units

    def _find_duplicates(self, paths: list[str], config: Config) -> tuple[list[dict], dict]:
        """Passes 1 and 2: on Ray when it runs (the `dedup` command and recipes start it), else here."""
        settings: DedupConfig = config.dedup
        if not ray.is_initialized():
            hashed = [hash_shard(path) for path in paths]
            items = [item for shard in hashed for item in shard["items"]]
            (entries,) = map_to_partitions(items, settings.bands, 1)
            return hashed, duplicates_to_drop(items, pairs_in_partition(entries, settings.max_distance))
        partitions = settings.partitions or max(1, int(ray.cluster_resources().get("CPU", 1)))
        options = {"num_cpus": config.run.cpus_per_task, "max_retries": config.run.max_retries, "retry_exceptions": True}
        mapper = ray.remote(_hash_and_partition).options(num_returns=partitions + 1, name="fgdata-dedup-hash", **options)
        reducer = ray.remote(_pairs_of_partition).options(name="fgdata-dedup-group", **options)
        mapped = [mapper.remote(path, settings.bands, partitions) for path in paths]
        reduced = [reducer.remote(settings.max_distance, *(refs[p] for refs in mapped)) for p in range(partitions)]
        hashed = ray.get([refs[partitions] for refs in mapped])
        pairs = [pair for part in ray.get(reduced) for pair in part]
        return hashed, duplicates_to_drop([item for shard in hashed for item in shard["items"]], pairs)

    def process(self, unit: WorkUnit, config: Config, model=None, prepared=None) -> ShardResult:
        payload = unit.payload
        table = read_shard(payload["path"])
        drop = {key: (kept_shard, kept_key, distance, same) for key, kept_shard, kept_key, distance, same in payload["duplicates"]}
        unusable = {key: (reason, detail) for key, reason, detail in payload["unusable"]}
        rows, rejects = [], []
        counters: Counter = Counter(caption_exact_repeats=payload["caption_repeats"])
        seen: set[str] = set()
        for index, row in enumerate(table.to_pylist()):
            key = row["key"]
            if key is None:
                rejects.append(reject(f"<row {index}>", ("missing_key", "the row has no key"), payload["path"]))
            elif key in seen:
                rejects.append(reject(key, ("duplicate_key", f"key {key!r} appears more than once in the shard"), payload["path"]))
            elif key in unusable:
                rejects.append(reject(key, unusable[key], payload["path"]))
            elif key in drop:
                kept_shard, kept_key, distance, same = drop[key]
                what = "the same pixels as" if same else f"a near-duplicate (pHash distance {distance}) of"
                rejects.append(reject(key, ("duplicate", f"{what} {kept_key!r} in {kept_shard}, which is kept"), payload["path"]))
                counters["exact_duplicates" if same else "near_duplicates"] += 1
            else:
                rows.append(row)
            seen.add(key)
        return ShardResult(
            rows_in=table.num_rows, table=conform(rows, "images"), rejects=rejects, counters=counters,
            provenance={"image_hash": f"imagehash {imagehash.__version__} phash 64-bit"},
        )


def _caption_repeats(hashed: list[dict]) -> dict[str, int]:
    """Per shard: rows whose caption (case and spacing aside) an earlier row, in (shard, key) order,
    already has, counted across the whole dataset."""
    seen: set[str] = set()
    repeats: Counter = Counter()
    for ident, digest in sorted(c for shard in hashed for c in shard["captions"] if c[1] is not None):
        repeats[ident[0]] += digest in seen
        seen.add(digest)
    return dict(repeats)
