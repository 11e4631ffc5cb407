"""`fgdata dedup`: exact and near-duplicate images across the whole dataset, one of each group kept.

Three passes, each spread over shards:
1. hash: every input shard's images decoded once, each to a digest of its pixels and a 64-bit pHash
   (`imagehash`); tasks on Ray, one per shard.
2. group: the hashes shuffled by bucket (each band of the pHash: see pipeline/core/near_duplicates.py)
   to `dedup.partitions` reduce tasks, which return the pairs within `dedup.max_distance`; the
   driver joins pairs into groups. Nothing compares all pairs. The same pixels give the same pHash,
   so exact duplicates are the pairs at distance 0 whose pixel digests agree.
3. write: input shard N to output shard N as every stage does (markers, resume), each duplicate a
   `duplicate` reject naming the image kept.
Captions are never a reason to drop a row, only counted: `caption_exact_repeats` across the dataset
(case and spacing aside, in pass 1) and `caption_near_repeats` within each output shard (distinct
captions with an all-MiniLM-L6-v2 cosine of `dedup.caption_similarity` or more to an earlier one of
the shard: comparing every pair across 12M rows would not be a counter's price).
The rule that picks the kept image is deterministic: the smallest (shard name, key) of the group.
Groups are transitive (a~b and b~c put a, b, c in one group), so a reject's distance to the kept
image can exceed max_distance; the detail gives it. Passes 1-2 run in planning, once OUT is claimed.
Pass 1 keeps each input shard's result in OUT/_dedup_hashes/<shard name>.parquet (written by the
task that hashed it, atomically, as shards are), with the identity of the input shard it was made
from and the versions that shape the hashes: a rerun (after a kill, say) decodes only the shards
whose entry is missing, unreadable or made from other content or versions, and reads the rest, so
its decisions are the ones a run without the entries makes. Pass 2 is redone (it reads only the
hashes). Pass 3's finished shards are skipped, and since the decisions are part of every shard's
fingerprint, a rerun that decides otherwise is refused. --overwrite deletes the entries with the rest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections import Counter
from functools import cache, partial
from importlib import metadata
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.config import Config, DedupConfig
from pipeline.core import storage
from pipeline.core.images import ImageRejected, decode_rgb
from pipeline.core.near_duplicates import duplicates_to_drop, ident, map_to_partitions, pairs_in_partition, shard_and_row
from pipeline.core.schemas import check_input_columns, conform
from pipeline.core.shards import DEDUP_HASHES_DIR, FOLDER_CONTENTS, lineage_entry, list_shards, read_shard, read_shard_schema
from pipeline.core.storage import Location, location, resolved
from pipeline.errors import FgdataError, first_line
from pipeline.models.embedding import TextEmbedder, resolve_embedding_model
from pipeline.models.reference import check_model_reference
from pipeline.stages.base import ShardResult, Stage, WorkUnit, reject

# the columns ingest writes; the columns screen adds are carried when present
REQUIRED_COLUMNS = {
    "key": pa.string(), "image": pa.binary(), "width": pa.int32(), "height": pa.int32(),
    "format": pa.string(), "short_caption": pa.string(), "source": pa.string(),
}

log = logging.getLogger(__name__)

# What shapes a kept pass-1 result besides its input shard: this code's way of hashing (raise the
# number when image_hashes, caption_digest or what decode_rgb accepts changes) and the libraries
# under it (Pillow decodes, imagehash and scipy's DCT make the pHash). Any change: hashed again.
HASHING = "fgdata dedup hashes 1 (sha256 of pixels, phash 8x8); " + "; ".join(f"{name} {metadata.version(name)}" for name in ("imagehash", "pillow", "scipy", "numpy"))
_CACHE_META = b"fgdata.dedup"
# one row per distinct key: its hashes, or (reason, detail) for an image that does not decode
_CACHE_SCHEMA = pa.schema([("key", pa.string()), ("pixels", pa.string()), ("phash", pa.uint64()), ("caption", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def image_hashes(data: bytes) -> tuple[str, int]:
    """(digest of the decoded RGB pixels and size, 64-bit pHash) of encoded image bytes."""
    image = decode_rgb(data)
    pixels = hashlib.sha256(f"{image.width}x{image.height}\0".encode() + image.tobytes()).hexdigest()[:32]
    bits = imagehash.phash(image, hash_size=8).hash.flatten()
    return pixels, int.from_bytes(np.packbits(bits).tobytes(), "big")


def normalised_caption(caption: str | None) -> str:
    """Captions that differ only in case and spacing count as the same caption."""
    return " ".join((caption or "").lower().split())


def caption_digest(caption: str | None) -> str | None:
    text = normalised_caption(caption)
    return hashlib.sha256(text.encode()).hexdigest()[:32] if text else None


def caption_near_repeats(captions: list[str | None], embed, threshold: float, block: int = 1024) -> int:
    """How many distinct captions (as normalised_caption makes them) have a cosine similarity of
    `threshold` or more to an earlier one; `embed` maps texts to unit-length vectors. The similarity
    matrix is built `block` rows at a time, so memory stays at block x len(captions)."""
    texts = list(dict.fromkeys(t for t in map(normalised_caption, captions) if t))
    if len(texts) < 2:
        return 0
    vectors = np.asarray(embed(texts), np.float32)
    order = np.arange(len(texts))
    near = 0
    for start in range(0, len(texts), block):
        similar = vectors[start : start + block] @ vectors.T >= threshold
        earlier = order[None, :] < order[start : start + block, None]
        near += int((similar & earlier).any(axis=1).sum())
    return near


@cache
def _caption_embedder(model: str) -> TextEmbedder:
    return TextEmbedder(model)  # once per process: Ray's workers run shard after shard


def _embed_captions(model: str, texts: list[str]) -> np.ndarray:
    embedder = _caption_embedder(model)
    return embedder.model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)


def hash_shard(path: str, shard: int, cache_dir: str | None = None) -> dict:
    """Pass 1 for one shard (number `shard` of the input): its keys with their pixel digests and
    pHashes (row i of `keys` is ident(shard, i)), its images that do not decode (key -> problem), and
    the caption digests of its keys. Rows without a key or with a repeated one are left to `process`,
    which rejects them. With `cache_dir` (OUT/_dedup_hashes), the result kept there for this very
    shard is read instead when it is valid, else the result is computed and kept there."""
    name = Path(path).name
    entry = None
    # only under a name --overwrite knows as fgdata's (an input shard may be named part-*.parquet)
    if cache_dir is not None and any(fnmatch.fnmatchcase(name, p) for p in FOLDER_CONTENTS[DEDUP_HASHES_DIR]):
        entry = location(cache_dir) / name
        made_from = _made_from(path)  # before the shard is read: a shard changed meanwhile never passes for this one
        cached = _read_kept(entry, made_from) if made_from else None
        if cached is not None:
            return {"name": name, "shard": shard, **cached, "kept": True}
    hashed = _hash_shard(path, shard)
    if entry is not None and made_from:
        _keep(entry, hashed, made_from)
    return hashed


def shard_identity(path: str) -> str:
    """What tells a changed input shard from the one a kept result was made from: its size and
    modification time (on a store its ETag, the content's MD5 for a plain upload), as the shard
    fingerprints take them (storage.signature), and a digest of its Parquet footer, which changes with
    any row count, row group, column chunk size or key range even when the size and time were kept
    (cp -p, rsync -t, an extracted archive). Not a digest of the whole file: on 1000 sample images
    (10 shards, 31 MB; bench/curation.py dedup_rerun) sha256 took 24 ms against 2.0 s for pass 1 and
    0.2 ms for this, cheap on a local disk, but on a store it is a download of every shard on every
    rerun, terabytes for 12M images; this is one stat (a HEAD on a store) and one read of the footer."""
    place = location(path)
    opened = storage.open_for_reading(place, cache_type="none") if storage.is_uri(place) else open(place, "rb")
    with opened as file:
        file.seek(-8, 2)
        tail = file.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length <= 0:
            raise ValueError("no Parquet footer")
        file.seek(-8 - length, 2)
        footer = file.read(length)
    return f"{storage.signature(path)}:{hashlib.sha256(footer).hexdigest()[:32]}"


def _made_from(path: str) -> dict | None:
    """What a kept result must have been made from to stand for `path` now; None when the shard
    cannot be looked at (then nothing is kept, and reading it gives its own error)."""
    try:
        return {"input": Path(path).name, "identity": shard_identity(path), "hashing": HASHING}
    except Exception:  # noqa: BLE001 - a missing or damaged shard: hashed (and reported) as without a cache
        return None


def _read_kept(entry: Location, made_from: dict) -> dict | None:
    """The result kept in `entry`, or None when it is missing, unreadable, malformed or made from
    another shard or with other versions: then it is computed again, never trusted."""
    try:
        where, filesystem = storage.arrow_target(entry)
        table = pq.read_table(where, filesystem=filesystem)
        if json.loads((table.schema.metadata or {}).get(_CACHE_META, b"null")) != made_from:
            return None
        if not table.schema.remove_metadata().equals(_CACHE_SCHEMA):
            return None
        rows = table.to_pylist()
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled file, a store's error: hashed again
        log.warning("dedup: %s is unreadable (%s); hashing its shard again", entry, first_line(exc))
        return None
    found = [r for r in rows if r["reason"] is None]
    bad = {r["key"]: (r["reason"], r["detail"]) for r in rows if r["reason"] is not None}
    keys = [r["key"] for r in found]
    if any(k is None for k in keys) or None in bad or len(set(keys) | set(bad)) != len(rows) or keys != sorted(keys):
        return None
    if any(r["pixels"] is None or r["phash"] is None for r in found):
        return None
    hashes = np.array([r["phash"] for r in found], np.uint64)
    return {"keys": keys, "pixels": [r["pixels"] for r in found], "hashes": hashes, "captions": [r["caption"] for r in found], "bad": bad}


def _keep(entry: Location, hashed: dict, made_from: dict) -> None:
    """Writes `hashed` to `entry` whole or not at all. A failure is a warning: the result is only
    a saving for a rerun, and the run goes on with what it computed."""
    count = len(hashed["keys"])
    columns = {
        "key": hashed["keys"] + list(hashed["bad"]),
        "pixels": hashed["pixels"] + [None] * len(hashed["bad"]),
        "phash": hashed["hashes"].tolist() + [None] * len(hashed["bad"]),
        "caption": hashed["captions"] + [None] * len(hashed["bad"]),
        "reason": [None] * count + [reason for reason, _ in hashed["bad"].values()],
        "detail": [None] * count + [detail for _, detail in hashed["bad"].values()],
    }
    table = pa.table(columns, schema=_CACHE_SCHEMA.with_metadata({_CACHE_META: json.dumps(made_from, sort_keys=True).encode()}))

    def write(target: Location) -> None:
        where, filesystem = storage.arrow_target(target)
        pq.write_table(table, where, filesystem=filesystem)

    try:
        storage.write_whole(entry, write)
    except Exception as exc:  # noqa: BLE001 - no space, no permission, a store's error
        log.warning("dedup: could not keep the hashes of %s in %s (%s); a rerun hashes it again", made_from["input"], entry, first_line(exc))


def _hash_shard(path: str, shard: int) -> dict:
    """hash_shard's result computed: every image of the shard decoded."""
    table = read_shard(path, columns=["key", "image", "short_caption"])
    found, bad, seen = [], {}, set()
    for key, data, caption in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        if key is None or key in seen:
            continue
        seen.add(key)
        try:
            digest, phash = image_hashes(data)
        except ImageRejected as problem:
            bad[key] = (problem.reason, problem.detail)
            continue
        found.append((key, digest, phash, caption_digest(caption)))
    found.sort()  # by key: idents then order items as the kept-image rule does, by (shard, key)
    keys, pixels, hashes, captions = (list(column) for column in zip(*found)) if found else ([], [], [], [])
    return {"name": Path(path).name, "shard": shard, "keys": keys, "pixels": pixels, "hashes": np.array(hashes, np.uint64), "captions": captions, "bad": bad}


def _hash_and_partition(path: str, shard: int, bands: int, partitions: int, cache_dir: str | None) -> tuple:
    """Pass 1 and the map side of pass 2 in one Ray task: the partitions first, then what the driver needs."""
    hashed = hash_shard(path, shard, cache_dir)
    return (*map_to_partitions(_idents(hashed), hashed["hashes"], bands, partitions), hashed)


def _pairs_of_partition(max_distance: int, *pieces) -> np.ndarray:
    return pairs_in_partition(list(pieces), max_distance)


def _idents(hashed: dict) -> np.ndarray:
    return np.array([ident(hashed["shard"], row) for row in range(len(hashed["keys"]))], np.int64)


class DedupStage(Stage):
    name = "dedup"
    output_kind = "images"
    config_section = "dedup"
    plans_in_output = True  # pass 1's results are kept in OUT/_dedup_hashes

    def __init__(self, images_dir: Path):
        self.images_dir = resolved(images_dir)  # a local path or a URI

    def lineage(self) -> list[dict]:
        return [lineage_entry(self.images_dir)]

    def check(self, config: Config) -> None:
        if config.dedup.caption_similarity:
            check_model_reference(resolve_embedding_model(config.dedup.caption_model), revision=None, trust_remote_code=False)

    def check_input(self, config: Config) -> list[Location]:
        """The checks before any work (the runner's, before it claims OUT); the input shards."""
        self.check(config)
        paths = list_shards(self.images_dir)
        for path in paths:
            check_input_columns(read_shard_schema(path), REQUIRED_COLUMNS, where=str(path))
        return paths

    def plan(self, config: Config) -> list[WorkUnit]:
        paths = self.check_input(config)
        hashed, pairs = self._hash_and_group([str(p) for p in paths], config)
        if self.output_dir is not None:
            reused = sum(bool(h.get("kept")) for h in hashed)
            log.info("dedup: pass 1 read %d of %d shards' hashes from %s, decoded the images of %d", reused, len(hashed), DEDUP_HASHES_DIR, len(hashed) - reused)
        hashes = {item: phash for shard in hashed for item, phash in zip(_idents(shard).tolist(), shard["hashes"].tolist())}
        duplicates: dict[int, list] = {}
        for item, (kept, distance) in duplicates_to_drop(hashes, pairs).items():
            (shard, row), (kept_shard, kept_row) = shard_and_row(item), shard_and_row(kept)
            mine, theirs = hashed[shard], hashed[kept_shard]
            same = mine["pixels"][row] == theirs["pixels"][kept_row]
            duplicates.setdefault(shard, []).append((mine["keys"][row], theirs["name"], theirs["keys"][kept_row], distance, same))
        caption_repeats = _caption_repeats(hashed)
        return [
            WorkUnit(
                path.name,
                {
                    "path": str(path),
                    # sorted tuples: the payload's repr is part of the shard's fingerprint
                    "duplicates": tuple(sorted(duplicates.get(shard["shard"], []))),
                    "unusable": tuple(sorted((key, *problem) for key, problem in shard["bad"].items())),
                    "caption_repeats": caption_repeats[shard["shard"]],
                },
            )
            for path, shard in zip(paths, hashed)
        ]

    def _hash_and_group(self, paths: list[str], config: Config) -> tuple[list[dict], np.ndarray]:
        """Passes 1 and 2: on Ray when it runs (the `dedup` command and recipes start it), else here."""
        settings: DedupConfig = config.dedup
        cache_dir = None if self.output_dir is None else str(location(self.output_dir) / DEDUP_HASHES_DIR)
        if not ray.is_initialized():
            hashed = [hash_shard(path, shard, cache_dir) for shard, path in enumerate(paths)]
            idents = np.concatenate([_idents(h) for h in hashed]) if hashed else np.empty(0, np.int64)
            hashes = np.concatenate([h["hashes"] for h in hashed]) if hashed else np.empty(0, np.uint64)
            return hashed, pairs_in_partition(map_to_partitions(idents, hashes, settings.bands, 1), settings.max_distance)
        partitions = settings.partitions or max(1, int(ray.cluster_resources().get("CPU", 1)))
        options = {"num_cpus": config.run.cpus_per_task, "max_retries": config.run.max_retries, "retry_exceptions": True}
        mapper = ray.remote(_hash_and_partition).options(num_returns=partitions + 1, name="fgdata-dedup-hash", **options)
        reducer = ray.remote(_pairs_of_partition).options(name="fgdata-dedup-group", **options)
        mapped = [mapper.remote(path, shard, settings.bands, partitions, cache_dir) for shard, path in enumerate(paths)]
        reduced = [reducer.remote(settings.max_distance, *(refs[p] for refs in mapped)) for p in range(partitions)]
        results = _get_all([refs[partitions] for refs in mapped] + reduced)
        hashed, parts = results[: len(mapped)], results[len(mapped) :]
        return hashed, np.concatenate(parts) if parts else np.empty((0, 3), np.int64)

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
        provenance = {"image_hash": f"imagehash {imagehash.__version__} phash 64-bit"}
        settings: DedupConfig = config.dedup
        if settings.caption_similarity:
            embed = partial(_embed_captions, settings.caption_model)
            counters["caption_near_repeats"] = caption_near_repeats([row["short_caption"] for row in rows], embed, settings.caption_similarity)
            provenance["caption_similarity"] = f"{settings.caption_model} cosine >= {settings.caption_similarity:g}, within each shard"
        return ShardResult(rows_in=table.num_rows, table=conform(rows, "images"), rejects=rejects, counters=counters, provenance=provenance)


def _get_all(refs: list) -> list:
    """Every result; a task's FgdataError (an unreadable shard) as the same one-line error once all
    are settled: a failed result left unread would be logged by Ray as an unhandled error."""
    results, failure = [], None
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            failure = failure or exc
    if failure is not None:
        if isinstance(failure.cause, FgdataError):
            raise FgdataError(str(failure.cause)) from None
        raise failure
    return results


def _caption_repeats(hashed: list[dict]) -> list[int]:
    """Per shard: rows whose caption (case and spacing aside) an earlier row, in (shard, key) order,
    already has, counted across the whole dataset."""
    seen: set[str] = set()
    repeats = [0] * len(hashed)
    for (_, _, shard), digest in sorted(((h["name"], key, h["shard"]), d) for h in hashed for key, d in zip(h["keys"], h["captions"]) if d):
        repeats[shard] += digest in seen
        seen.add(digest)
    return repeats
