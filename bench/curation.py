"""`python bench/curation.py`: dedup and screen against the plain libraries, on 2 shared cores.

- dedup on planted duplicates of the sample photos (re-encoded at JPEG quality 50 and 80, half size,
  a small colour shift, PNG, and a crop keeping 90% of the area): precision and recall of
  `fgdata dedup` and of a brute-force imagehash comparison of every pair, both wall times.
- dedup's pass 1 on 1000 re-encoded sample photos: a first run against a rerun that reads the hashes
  kept in OUT/_dedup_hashes (`python bench/curation.py dedup_rerun` measures that part alone).
- the grouping step (LSH bands) on 100k and 1M random 64-bit hashes: time, and its growth.
- screen throughput in images/s against NudeNet's own `NudeDetector().detect` loop over the same
  images (both load the model inside their timing), and the model call alone image by image.
Writes bench/results/curation.json.
"""

from __future__ import annotations

import io
import itertools
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from records import write_result  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core.images import decode_rgb  # noqa: E402
from pipeline.core.near_duplicates import find_duplicates  # noqa: E402
from pipeline.core.schemas import conform  # noqa: E402
from pipeline.core.shards import read_rejects  # noqa: E402
from pipeline.models.nudenet_detector import BUNDLED, NudeNetDetector  # noqa: E402
from pipeline.runner import run_stage  # noqa: E402
from pipeline.stages.fggrn.dedup import DedupStage  # noqa: E402
from pipeline.stages.fggrn.screen import ScreenStage  # noqa: E402

SAMPLE = ROOT / "sample" / "images"
VARIANTS = ("q50", "q80", "half", "shift", "png", "crop90")


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def variant(image: Image.Image, kind: str) -> bytes:
    w, h = image.size
    if kind in ("q50", "q80"):
        return encode(image, quality=int(kind[1:]))
    if kind == "half":
        return encode(image.resize((w // 2, h // 2), Image.Resampling.BICUBIC), quality=90)
    if kind == "shift":
        return encode(Image.fromarray(np.clip(np.asarray(image).astype(np.int16) + np.array([8, -4, 4]), 0, 255).astype(np.uint8)), quality=90)
    if kind == "png":
        return encode(image, "PNG")
    side = math.sqrt(0.9)  # crop90: the centre keeping 90% of the area
    cw, ch = round(w * side), round(h * side)
    return encode(image.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)), quality=90)


def row(key: str, data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        return {"key": key, "image": data, "width": image.width, "height": image.height, "format": image.format, "short_caption": None, "source": key}


def write_dataset(folder: Path, shards: list[list[dict]]) -> Path:
    (folder / "train").mkdir(parents=True)
    for index, rows in enumerate(shards):
        pq.write_table(conform(rows, "images"), folder / "train" / f"part-{index:05d}.parquet")
    return folder


def scores(found: set[str], truth: set[str]) -> dict:
    hits = len(found & truth)
    return {"precision": round(hits / len(found), 3) if found else 1.0, "recall": round(hits / len(truth), 3), "found": len(found), "planted": len(truth)}


def bench_dedup(work: Path, max_distance: int) -> dict:
    photos = sorted(p for p in SAMPLE.glob("*.jpg") if not p.stem.startswith("broken"))
    originals = [row(p.stem, p.read_bytes()) for p in photos]
    copies = [row(f"{p.stem}~{kind}", variant(Image.open(p).convert("RGB"), kind)) for p in photos for kind in VARIANTS]
    images = write_dataset(work / "planted", [originals[:9] + copies[: len(copies) // 2], originals[9:] + copies[len(copies) // 2 :]])
    truth = {r["key"] for r in copies}
    config = load_config(None, ["run.progress=false", "run.executor=local", f"dedup.max_distance={max_distance}"])
    started = time.perf_counter()
    run_stage(DedupStage(images), work / "dedup", config)
    fgdata_s = time.perf_counter() - started
    rejected = {r["key"] for r in read_rejects(work / "dedup").to_pylist() if r["reason"] == "duplicate"}

    # brute force: imagehash's pHash of every image, every pair compared, the later key of a pair dropped
    started = time.perf_counter()
    rows = originals + copies
    hashes = {r["key"]: imagehash.phash(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows}
    brute = {max(a, b, key=lambda k: ("~" in k, k)) for a, b in itertools.combinations(hashes, 2) if hashes[a] - hashes[b] <= max_distance}
    brute_s = time.perf_counter() - started
    by_kind = {kind: scores({k for k in rejected if k.endswith(f"~{kind}")}, {k for k in truth if k.endswith(f"~{kind}")})["recall"] for kind in VARIANTS}
    return {
        "images": len(rows), "max_distance": max_distance, "bands": config.dedup.bands,
        "fgdata": {**scores(rejected, truth), "seconds": round(fgdata_s, 2), "recall_by_variant": by_kind},
        "brute_force_imagehash": {**scores(brute, truth), "seconds": round(brute_s, 2)},
        "same_decisions": rejected == brute,
    }


def bench_dedup_rerun(work: Path, images: int = 1000, shards: int = 10) -> dict:
    """Pass 1 of dedup (decode, pixel digest, pHash of every image) on a first run and on a rerun
    that finds its results kept in OUT/_dedup_hashes; also what checking a kept result costs (the
    input shard's identity) against hashing the whole shard file with sha256."""
    import hashlib

    from pipeline.core.shards import DEDUP_HASHES_DIR, list_shards
    from pipeline.stages.fggrn.dedup import hash_shard, shard_identity

    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLE.glob("*.jpg")) if not p.stem.startswith("broken")]
    rows = [row(f"{i:05d}", encode(photos[i % len(photos)], quality=50 + i % 46)) for i in range(images)]
    per = math.ceil(images / shards)
    folder = write_dataset(work / "rerun_in", [rows[i : i + per] for i in range(0, images, per)])
    paths = [str(p) for p in list_shards(folder)]
    cache = str(work / "rerun_out" / DEDUP_HASHES_DIR)
    seconds = {}
    for attempt in ("first_run", "rerun"):
        started = time.perf_counter()
        hashed = [hash_shard(path, shard, cache) for shard, path in enumerate(paths)]
        seconds[attempt] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    for path in paths:
        shard_identity(path)
    identity_s = time.perf_counter() - started
    started = time.perf_counter()
    for path in paths:
        hashlib.sha256(Path(path).read_bytes()).hexdigest()
    sha256_s = time.perf_counter() - started
    return {
        "images": sum(len(h["keys"]) for h in hashed), "shards": len(paths), "input_mb": round(sum(Path(p).stat().st_size for p in paths) / 2**20, 1),
        "pass1_seconds": seconds, "speedup": round(seconds["first_run"] / max(seconds["rerun"], 1e-9), 1),
        "shard_identity_seconds": round(identity_s, 4), "sha256_of_shards_seconds": round(sha256_s, 4),
        "note": "hash_shard over every input shard in this process (executor local), local disk; the rerun reads "
        "OUT/_dedup_hashes/<shard>.parquet after checking the shard's identity (size, mtime, Parquet footer digest)",
    }


def bench_grouping(sizes=(100_000, 1_000_000), bands: int = 5, max_distance: int = 4) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
        hashes[1::1000] = hashes[::1000][: len(hashes[1::1000])] ^ np.uint64(0b1011)  # planted pairs at distance 3
        idents = np.arange(n, dtype=np.int64)
        started = time.perf_counter()
        dropped = find_duplicates(idents, hashes, bands, max_distance)
        out[str(n)] = {"seconds": round(time.perf_counter() - started, 2), "duplicates": len(dropped), "planted": len(hashes[1::1000])}
    first, last = (out[str(n)]["seconds"] for n in (sizes[0], sizes[-1]))
    out["growth"] = {"size_ratio": sizes[-1] / sizes[0], "time_ratio": round(last / first, 2)}
    return {"bands": bands, "max_distance": max_distance, **out}


def bench_screen(work: Path, copies: int = 12, rounds: int = 3) -> dict:
    """The two sides alternate `rounds` times; images/s and the ratio are from the median times (and
    the best): the machine is shared, and whichever runs while another job is busy loses by chance."""
    from nudenet import NudeDetector

    photos = [p.read_bytes() for p in sorted(SAMPLE.glob("*.jpg")) if not p.stem.startswith("broken")]
    data = [photos[i % len(photos)] for i in range(len(photos) * copies)]
    images = write_dataset(work / "screen_in", [[row(f"{i:05d}", d) for i, d in enumerate(data)]])
    config = load_config(None, ["run.progress=false", "run.executor=local"])
    fgdata_s, raw_s = [], []
    for attempt in range(rounds):
        started = time.perf_counter()
        run_stage(ScreenStage(images), work / f"screen{attempt}", config)
        fgdata_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        detector = NudeDetector()
        for d in data:
            detector.detect(d)
        raw_s.append(time.perf_counter() - started)
    # the model call alone, image by image, the two sides alternating (robust to load that drifts):
    # fgdata's decode (Pillow, upright 8-bit RGB) + NudeNetDetector.detect against detect(bytes)
    ours, raw = NudeNetDetector(BUNDLED), NudeDetector()
    paired = {"fgdata": 0.0, "nudenet": 0.0}
    for d in data:
        started = time.perf_counter()
        raw.detect(d)
        paired["nudenet"] += time.perf_counter() - started
        started = time.perf_counter()
        ours.detect(decode_rgb(d))
        paired["fgdata"] += time.perf_counter() - started
    return {
        "images": len(data),
        "paired_per_image": {side: round(len(data) / seconds, 1) for side, seconds in paired.items()} | {"ratio": round(paired["nudenet"] / paired["fgdata"], 2)},
        "fgdata_images_per_s": round(len(data) / statistics.median(fgdata_s), 1),
        "nudenet_detect_loop_images_per_s": round(len(data) / statistics.median(raw_s), 1),
        "ratio": round(statistics.median(raw_s) / statistics.median(fgdata_s), 2),
        "ratio_of_best": round(min(raw_s) / min(fgdata_s), 2),
        "seconds": {"fgdata": [round(t, 2) for t in fgdata_s], "nudenet": [round(t, 2) for t in raw_s]},
        "note": "median of alternating rounds; fgdata: run_stage in this process (plan, model load, decode with Pillow, "
        "detect, write shards, manifest); nudenet: NudeDetector() + detect(bytes) per image",
    }


def main() -> None:
    if sys.argv[1:] == ["dedup_rerun"]:  # that part alone, into the existing record (its own date)
        import json
        from datetime import datetime, timezone

        from records import RESULTS, machine

        with tempfile.TemporaryDirectory() as tmp:
            part = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average": machine()["load_average"], **bench_dedup_rerun(Path(tmp))}
        path = RESULTS / "curation.json"
        record = json.loads(path.read_text()) if path.exists() else {"benchmark": "curation", "machine": machine()}
        path.write_text(json.dumps({**record, "dedup_rerun": part}, indent=2) + "\n")
        print(json.dumps(part, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {
            "dedup_planted": bench_dedup(work, max_distance=4),
            "dedup_rerun": bench_dedup_rerun(work),
            "grouping": bench_grouping(),
            "screen": bench_screen(work),
        }
    write_result("curation", result)


if __name__ == "__main__":
    main()
