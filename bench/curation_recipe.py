"""`python bench/curation_recipe.py [RECIPE]`: how many images the `fggrn` recipe's dedup and screen
steps remove before recaption, and what that saves in `fgdata plan`'s bill.

The source folder: every sample photo with its caption sidecar (the two broken files included, as
a crawl has them), and each decodable photo's planted copies from bench/curation.py (JPEG quality
50 and 80, half size, a colour shift, PNG, a 90% centre crop), each with the original's caption.
The recipe's steps up to `screened` run in this process (the local executor: 2 shared cores).
The saving: `fgdata plan RECIPE --images 12000000 --gpu h100 --json` over the steps after
`screened`, once for all rows and once for the share screen lets through (and once for 99%: the saving per
point removed, to scale to a crawl's own share); the difference is what the removed share would
have cost (start-up costs cancel out). A stage without a GPU record has no
figure, and the saving is then null with the planner's reason. Writes bench/results/curation_recipe.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from curation import SAMPLE, VARIANTS, variant  # noqa: E402
from records import write_result  # noqa: E402

from pipeline.core.images import ImageRejected, decode_rgb  # noqa: E402
from pipeline.core.shards import read_json  # noqa: E402
from pipeline.recipes import load_recipe  # noqa: E402
from pipeline.recipes.run import run_recipe  # noqa: E402

PLANNED_IMAGES = 12_000_000
LAST_CURATION_STEP = "screened"


def build_source(folder: Path) -> dict:
    folder.mkdir(parents=True)
    originals = planted = 0
    for path in sorted(SAMPLE.glob("*.jpg")):
        sidecars = [p for p in (path.with_suffix(".txt"), path.with_suffix(".json")) if p.exists()]
        shutil.copy(path, folder / path.name)
        for sidecar in sidecars:
            shutil.copy(sidecar, folder / sidecar.name)
        originals += 1
        try:
            image = decode_rgb(path.read_bytes())
        except ImageRejected:
            continue  # a broken sample file has no copies
        for kind in VARIANTS:
            name = f"{path.stem}-{kind}"
            (folder / f"{name}.{'png' if kind == 'png' else 'jpg'}").write_bytes(variant(image, kind))
            for sidecar in sidecars:
                shutil.copy(sidecar, folder / f"{name}{sidecar.suffix}")
            planted += 1
    return {"files": originals + planted, "sample_files": originals, "planted_copies": planted, "variants": list(VARIANTS)}


def manifest_summary(dataset: Path) -> dict:
    manifest = read_json(dataset / "_manifest.json")
    return {key: manifest[key] for key in ("rows_in", "rows_out", "rows_rejected", "counters", "provenance")}


def plan_gpu_hours(recipe: str, steps: list[str], images: int) -> dict:
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "fgdata"), "plan", recipe, "--images", str(images), "--gpu", "h100", "--stages", ",".join(steps), "--json"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    bill = json.loads(result.stdout)
    return {stage["step"]: {"gpu_hours": stage["gpu_hours"], "cpu_core_hours": stage["cpu_core_hours"], "basis": stage["basis"]} for stage in bill["stages"]}


def saving(before: dict, after: dict, figure: str) -> float | None:
    """What the removed share would have cost in `figure`, or None when a step has no figure."""
    values = [(before[step][figure], after[step][figure]) for step in before if before[step][figure] is not None or after[step][figure] is not None]
    if not values or any(b is None or a is None for b, a in values):
        return None
    return round(sum(b - a for b, a in values), 2)


def main() -> None:
    recipe_name = sys.argv[1] if len(sys.argv) > 1 else "fggrn"
    recipe = load_recipe(recipe_name)
    names = [step.name for step in recipe.steps]
    curated = replace(recipe, steps=recipe.steps[: names.index(LAST_CURATION_STEP) + 1])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = build_source(work / "source")
        settings = work / "settings.yaml"
        settings.write_text(json.dumps({"run": {"executor": "local", "progress": False}, "ingest": {"rows_per_shard": 32}}))
        started = time.perf_counter()
        run_recipe(curated, work / "source", work / "out", settings)
        seconds = round(time.perf_counter() - started, 1)
        steps = {step.name: {"stage": step.stage, **manifest_summary(work / "out" / step.name)} for step in curated.steps}
    ingested = steps[curated.steps[0].name]["rows_out"]
    passed = steps[LAST_CURATION_STEP]["rows_out"]
    removed = ingested - passed
    fraction = removed / ingested
    downstream = names[len(curated.steps) :]
    before = plan_gpu_hours(recipe_name, downstream, PLANNED_IMAGES)
    after = plan_gpu_hours(recipe_name, downstream, round(PLANNED_IMAGES * (1 - fraction)))
    one_percent = plan_gpu_hours(recipe_name, downstream, round(PLANNED_IMAGES * 0.99))
    write_result(
        "curation_recipe",
        {
            "recipe": recipe_name,
            "source": source,
            "steps": steps,
            "seconds": seconds,
            "before_recaption": {"ingested": ingested, "removed": removed, "passed": passed, "removed_fraction": round(fraction, 4)},
            "plan": {
                "command": f"fgdata plan {recipe_name} --images {PLANNED_IMAGES} --gpu h100 --stages {','.join(downstream)} --json",
                "images_after_curation": round(PLANNED_IMAGES * (1 - fraction)),
                "per_step_all_images": before,
                "per_step_after_curation": after,
                "gpu_hours_saved": saving(before, after, "gpu_hours"),
                "cpu_core_hours_saved": saving(before, after, "cpu_core_hours"),
                # a crawl's duplicate and NSFW share is its own: the saving per point removed scales to it
                "gpu_hours_saved_per_percent_removed": saving(before, one_percent, "gpu_hours"),
                "cpu_core_hours_saved_per_percent_removed": saving(before, one_percent, "cpu_core_hours"),
                "how": "the plan of the steps after screened for all images minus the same plan for the images screen lets through "
                       "(the planted share here is far above a crawl's: scale by the per-percent figures). A null GPU figure: a step has "
                       "no h100 record (its basis says why); each step's cost is linear in its rows, so with records "
                       "saved GPU-h = removed_fraction x (GPU-h of recaption + ground + negatives) for all images",
            },
            "note": "source: every sample photo plus 6 planted copies of each decodable one; dedup and screen at their defaults; local executor on 2 shared cores",
        },
    )


if __name__ == "__main__":
    main()
