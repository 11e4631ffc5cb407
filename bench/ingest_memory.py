"""`python bench/ingest_memory.py --record before|after`: the peak memory of an ingest worker.

1,000 images made from the sample photos (each resized to a longest side of 256-1600 px and
re-encoded as JPEG at quality 70-95, so sizes spread as web photos do) are ingested with the
default settings. The shards run one after another in one fresh process, as a Ray worker runs
the shard tasks it is given, and that process reports its peak resident memory (ru_maxrss) and
its memory once imports are done, so the difference is what ingesting the shards holds.

Writes the measurement under `before` or `after` in bench/results/ingest_memory.json, keeping
the other, with the commit it ran on. About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample" / "images"
RESULT = ROOT / "bench" / "results" / "ingest_memory.json"
IMAGES = 1000

# Runs in the measured process: imports, then every planned shard through run_shard, as a worker does.
_WORKER = """
import json, resource, sys, time
from pathlib import Path
from pipeline.config import load_config
from pipeline.stages.base import run_shard
from pipeline.stages.fggrn.ingest import IngestStage
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
config = load_config(None, ["run.progress=false"])
stage = IngestStage(Path(sys.argv[1]))
units = stage.plan(config)
started = time.perf_counter()
for unit in units:
    run_shard(stage, unit, sys.argv[2], config)
print(json.dumps({"shards": len(units), "seconds": round(time.perf_counter() - started, 2),
                  "imports_rss_mb": round(imported / 1024), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def make_images(dest: Path, count: int, seed: int = 0) -> int:
    """`count` JPEGs from the good sample photos, resized and re-encoded; returns their bytes."""
    rng = random.Random(seed)
    photos = []
    for path in sorted(SAMPLE.glob("*.jpg")):
        try:
            photos.append(Image.open(path).convert("RGB"))
        except OSError:
            continue  # the deliberately broken sample files
    total = 0
    for index in range(count):
        photo = photos[index % len(photos)]
        side = rng.randint(256, 1600)
        scale = side / max(photo.size)
        image = photo.resize((max(8, round(photo.width * scale)), max(8, round(photo.height * scale))), Image.BICUBIC)
        path = dest / f"photo-{index:04d}.jpg"
        image.save(path, "JPEG", quality=rng.randint(70, 95))
        (dest / f"photo-{index:04d}.txt").write_text(f"a sample photo, copy {index}")
        total += path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", choices=("before", "after"), required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "photos"
        source.mkdir()
        started = time.perf_counter()
        image_bytes = make_images(source, IMAGES)
        made_s = time.perf_counter() - started
        done = subprocess.run([sys.executable, "-c", _WORKER, str(source), str(Path(work) / "out")], capture_output=True, text=True, cwd=ROOT, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    record = json.loads(RESULT.read_text()) if RESULT.exists() else {"benchmark": "ingest_memory", "images": IMAGES}
    record[args.record] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit, "image_megabytes": round(image_bytes / 1e6, 1),
        **measured, "held_by_ingest_mb": measured["peak_rss_mb"] - measured["imports_rss_mb"], "images_made_s": round(made_s, 1),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
