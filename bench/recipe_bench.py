"""`fgdata run` against the stage-by-stage commands, wall time, on the bundled sample x COPIES.

Both sides run the same commands a user types (console script subprocesses, Ray start-up and
model loading included) with the offline demo's settings and tiny random models. The recipe is
fggrn-demo, the demo's shape (phrases from the alt-text, recaption alongside: a random VLM's long
captions are all rejected, so the fggrn chain would leave ground and negatives nothing to do).
Writes bench/results/recipe_vs_stages.json. Not part of `make test`: `python bench/recipe_bench.py`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from records import write_result  # noqa: E402
from run import copy_sample_photos  # noqa: E402

from pipeline.core.shards import read_json  # noqa: E402
from pipeline.models.tiny import build_tiny_clip_text, build_tiny_nli, build_tiny_vlm  # noqa: E402

FGDATA = str(Path(sys.executable).parent / "fgdata")
STEPS = ("images", "phrases", "regions", "fggrn", "captions")


def timed_command(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([FGDATA, *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = copy_sample_photos(work / "images-src", args.copies)
        images = len(list(source.glob("*.jpg")))
        texts = [p.read_text() for p in source.glob("*.txt")][:50]
        settings = work / "settings.yaml"
        settings.write_text(
            "ingest: {rows_per_shard: 8}\n"
            f"recaption: {{model: {build_tiny_vlm(work / 'vlm', texts)}, max_new_tokens: 48}}\n"
            f"ground: {{text_encoder: {build_tiny_clip_text(work / 'clip', texts)}, detector: yolov8s-worldv2.yaml, score_threshold: 0}}\n"
            f"negatives: {{backend: rules, nli_model: {build_tiny_nli(work / 'nli', texts)}, min_contradiction: 0}}\n"
            "run: {progress: false}\n"
        )
        common = ["--config", str(settings)]
        stages_out = work / "stages"
        # the commands `make demo` runs, each its own job
        stage_seconds = {
            "ingest": timed_command("ingest", str(source), str(stages_out / "images"), *common),
            "phrases": timed_command("phrases", str(stages_out / "images"), str(stages_out / "phrases"), *common),
            "ground": timed_command("ground", str(stages_out / "phrases"), str(stages_out / "regions"), *common),
            "negatives": timed_command("negatives", str(stages_out / "regions"), str(stages_out / "fggrn"), *common),
            "recaption": timed_command("recaption", str(stages_out / "images"), str(stages_out / "captions"), *common),
        }
        recipe_out = work / "recipe"
        recipe_seconds = timed_command("run", "fggrn-demo", str(source), str(recipe_out), *common)
        rows = {}
        for step in STEPS:
            ours, theirs = read_json(recipe_out / step / "_manifest.json"), read_json(stages_out / step / "_manifest.json")
            rows[step] = {key: ours[key] for key in ("rows_in", "rows_out", "rows_rejected")} | {"shards": len(ours["shards"])}
            if rows[step]["rows_out"] != theirs["rows_out"]:
                raise SystemExit(f"{step}: the recipe wrote {ours['rows_out']} rows, the stages {theirs['rows_out']}")
    stages_total = sum(stage_seconds.values())
    write_result(
        "recipe_vs_stages",
        {
            "what": "wall seconds: `fgdata run fggrn-demo` (one Ray job) vs the five stage commands of `make demo` run one after another, start-up included",
            "images": images,
            "copies": args.copies,
            "settings": "make demo's: rows_per_shard 8, tiny random VLM (48 new tokens), YOLO-World v2 s + tiny CLIP text tower, rules + tiny NLI",
            "stage_seconds": {name: round(value, 2) for name, value in stage_seconds.items()},
            "stages_total_seconds": round(stages_total, 2),
            "recipe_seconds": round(recipe_seconds, 2),
            "speedup": round(stages_total / recipe_seconds, 3),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
