"""`fgdata plan` against real runs: predicted vs measured wall time, per stage and in total.

The photos are real: the 17 good sample photos and the 5 real photos installed packages ship
(matplotlib's Grace Hopper, scikit-learn's China and flower, ultralytics' bus and Zidane), 22 in
all, each with a caption written for this check. They are made into IMAGES files (300 by default)
by re-encoding crops of them at several sizes and JPEG qualities, so no two files are equal.

Two paths a user takes on them, with the offline demo's settings (tiny random models, the rules
negatives backend) and the default shard size (one shard of 300):
- the stage commands one after another, as typed: ingest, phrases (on the captions), ground,
  negatives, `export fgclip` (no recaption: the captions are there), each its own process; twice
  (pass A, then pass B after the recipe);
- `fgdata run fggrn-demo` (recaption alongside), between the two passes.
Each command is timed from outside (its whole wall time, Python's start included) and planned with
`fgdata plan` on the same settings: from bench/results, and (pass B and the recipe) from pass A's
manifests as `--from-runs` would. Writes bench/results/plan_check.json with the load average (the
machine may be shared) and the CPU model. Not part of `make test`: `python bench/plan_check.py`
(20-40 min on 2 busy cores; --save FILE keeps the measurement, --measured FILE plans it again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from records import RESULTS, cpu_model, write_result  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core.shards import read_json  # noqa: E402
from pipeline.models.tiny import build_tiny_clip_text, build_tiny_nli, build_tiny_vlm  # noqa: E402
from pipeline.recipes import load_recipe, parse_recipe  # noqa: E402
from pipeline.reports.plan import load_bench, load_runs, plan  # noqa: E402

FGDATA = str(Path(sys.executable).parent / "fgdata")
SAMPLE = Path(__file__).parent.parent / "sample" / "images"
SITE = Path(__import__("PIL").__file__).parents[1]  # site-packages
# each photo with a caption written for this check (what a person sees in it)
PHOTOS = {
    SAMPLE / "astronaut.jpg": "A woman astronaut in an orange suit holds a white helmet next to a flag",
    SAMPLE / "brick.jpg": "A close view of a grey brick wall with rough mortar between the bricks",
    SAMPLE / "camera.jpg": "A man in a dark coat looks through a camera standing on a tripod in a field",
    SAMPLE / "cell.jpg": "A microscope image of a round cell with a dark nucleus",
    SAMPLE / "chelsea.jpg": "An orange tabby cat with green eyes looks to the side",
    SAMPLE / "clock_motion.jpg": "A blurred wall clock with black hands on a white face",
    SAMPLE / "coffee.jpg": "A cup of coffee with foam on a saucer with a spoon on a red table",
    SAMPLE / "coins.jpg": "Rows of old coins lying on a dark cloth",
    SAMPLE / "grass.jpg": "A patch of green grass with thin blades",
    SAMPLE / "gravel.jpg": "Small grey stones of gravel on the ground",
    SAMPLE / "horse.jpg": "The black silhouette of a horse standing on a white background",
    SAMPLE / "hubble_deep_field.jpg": "Many small galaxies of many colours on a black sky",
    SAMPLE / "ihc.jpg": "A stained tissue sample with brown and blue cells under a microscope",
    SAMPLE / "microaneurysms.jpg": "A grey image of the back of an eye with small dark spots",
    SAMPLE / "retina.jpg": "A red image of a retina with blood vessels spreading from a bright disc",
    SAMPLE / "rocket.jpg": "A white rocket stands on a launch pad under a blue sky",
    SAMPLE / "text.jpg": "Printed black letters on a white page",
    SITE / "matplotlib/mpl-data/sample_data/grace_hopper.jpg": "A woman in a navy uniform with medals smiles at the camera",
    SITE / "sklearn/datasets/images/china.jpg": "A Chinese temple with a curved roof among green trees",
    SITE / "sklearn/datasets/images/flower.jpg": "A pink flower with a yellow centre and green leaves",
    SITE / "ultralytics/assets/bus.jpg": "People walk past a blue bus parked on a city street",
    SITE / "ultralytics/assets/zidane.jpg": "Two men in suits stand in a room, one with a red tie",
}


def real_photos(dest: Path, count: int) -> int:
    """`count` files from the real photos: file i is a crop of photo i mod 22 (a different window
    per round), scaled and re-encoded at a varying quality; its caption beside it. Returns the
    number of distinct photos used."""
    dest.mkdir()
    photos = [(p, c) for p, c in PHOTOS.items() if p.is_file()]
    for i in range(count):
        path, caption = photos[i % len(photos)]
        round_ = i // len(photos)
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            keep = 1.0 - 0.02 * (round_ % 10)  # 100% .. 82% of each side
            left, top = int((1 - keep) * width * (round_ % 3) / 2), int((1 - keep) * height * (round_ % 2))
            crop = image.crop((left, top, left + int(keep * width), top + int(keep * height)))
            side = 640 - 16 * (round_ % 8)
            crop.thumbnail((side, side))
            crop.save(dest / f"{path.stem}-{i:04d}.jpg", quality=95 - round_ % 20)
        (dest / f"{path.stem}-{i:04d}.txt").write_text(caption)
    return len(photos)


def timed(*args: str) -> dict:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run([FGDATA, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fgdata {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - started, 2), "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}


# the stage commands' chain, as a recipe file `fgdata plan` reads (no recaption)
STAGES_RECIPE = {
    "steps": [
        {"name": "images", "stage": "ingest", "input": "SOURCE"},
        {"name": "phrases", "stage": "phrases", "input": "images"},
        {"name": "regions", "stage": "ground", "input": "phrases", "images": "images"},
        {"name": "fggrn", "stage": "negatives", "input": "regions"},
    ]
}
COMMAND_OF_STEP = {"images": "ingest", "phrases": "phrases", "regions": "ground", "fggrn": "negatives", "export fgclip": "export fgclip"}


def inputs(work: Path, count: int) -> tuple[Path, list[str], int]:
    """The photos, the settings file's arguments (the demo's tiny models) and the distinct photos used."""
    source = work / "photos"
    distinct = real_photos(source, count)
    texts = [p.read_text() for p in source.glob("*.txt")]
    settings = work / "settings.yaml"
    settings.write_text(
        f"recaption: {{model: {build_tiny_vlm(work / 'vlm', texts)}, max_new_tokens: 48}}\n"
        f"ground: {{text_encoder: {build_tiny_clip_text(work / 'clip', texts)}, detector: yolov8s-worldv2.yaml, score_threshold: 0}}\n"
        f"negatives: {{backend: rules, nli_model: {build_tiny_nli(work / 'nli', texts)}, min_contradiction: 0}}\n"
        "run: {progress: false}\n"
    )
    return source, ["--config", str(settings)], distinct


def stage_commands(source: Path, common: list[str], out: Path) -> dict:
    """The commands one after another, each timed whole; its manifest's wall and shard seconds beside."""
    commands = {
        "ingest": timed("ingest", str(source), str(out / "images"), *common),
        "phrases": timed("phrases", str(out / "images"), str(out / "phrases"), *common),
        "ground": timed("ground", str(out / "phrases"), str(out / "regions"), *common),
        "negatives": timed("negatives", str(out / "regions"), str(out / "fggrn"), *common),
        "export fgclip": timed("export", "fgclip", str(out / "fggrn"), str(out / "fgclip"), "--allow-missing-long-captions"),
    }
    for step in ("images", "phrases", "regions", "fggrn"):
        manifest = read_json(out / step / "_manifest.json")
        commands[COMMAND_OF_STEP[step]] |= {"manifest": {key: manifest[key] for key in ("executor", "rows_in", "timings")}}
    return commands


def recipe_run(source: Path, common: list[str], out: Path) -> dict:
    run = timed("run", "fggrn-demo", str(source), str(out), *common)
    run["steps"] = {step.name: read_json(out / step.name / "_manifest.json")["timings"] for step in load_recipe("fggrn-demo").steps}
    return run


def keep_manifests(out: Path, runs: Path) -> None:
    """The manifests of a pass, for --from-runs once the work folder is gone."""
    for manifest in out.glob("*/_manifest.json"):
        (runs / manifest.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest, runs / manifest.parent.name / manifest.name)


def measure(work: Path, count: int, runs: Path) -> dict:
    """Pass A of the stage commands, `fgdata run fggrn-demo`, then pass B of the stage commands;
    pass A's manifests kept under `runs` for planning from them."""
    source, common, distinct = inputs(work, count)
    passes = {"stage_commands_a": stage_commands(source, common, work / "a")}
    keep_manifests(work / "a", runs)
    passes["fggrn_demo"] = recipe_run(source, common, work / "recipe")
    passes["stage_commands_b"] = stage_commands(source, common, work / "b")
    return {"images": count, "distinct_photos": distinct, "settings": (work / "settings.yaml").read_text(), **passes}


def _error(predicted: float, measured: float) -> float:
    return round(predicted / measured - 1, 3)


def compare_commands(bill: dict, commands: dict) -> dict:
    per_command = {
        s["step"]: {"predicted_s": round(s["wall_seconds"] or 0, 2), "measured_s": commands[COMMAND_OF_STEP[s["step"]]]["seconds"],
                    "error": _error(s["wall_seconds"] or 0, commands[COMMAND_OF_STEP[s["step"]]]["seconds"]), "basis": s["basis"]}
        for s in bill["stages"]
    }
    measured = sum(c["seconds"] for c in commands.values())
    predicted = bill["total"]["wall_seconds"]
    return {"per_command": per_command, "predicted_s": round(predicted, 2), "measured_s": round(measured, 2), "error": _error(predicted, measured),
            "load_warning": bill["load_warning"]}


def compare_run(bill: dict, run: dict) -> dict:
    return {
        "predicted_s": round(bill["total"]["wall_seconds"], 2), "measured_s": run["seconds"], "error": _error(bill["total"]["wall_seconds"], run["seconds"]),
        "predicted_steps_s": {s["step"]: round(s["wall_seconds"] or 0, 2) for s in bill["stages"]},
        "measured_steps_manifest_wall_s": {step: timings["wall_seconds"] for step, timings in run["steps"].items()},
        "load_warning": bill["load_warning"],
    }


def check(measured: dict, work: Path, runs: Path, results: Path = RESULTS) -> dict:
    """Each pass planned from the bench records, and pass B and the recipe also from pass A's runs."""
    settings = work / "settings.yaml"
    settings.write_text(measured["settings"])
    config = load_config(settings)
    bench, startup = load_bench(results)
    mine = load_runs([runs]) + bench
    stages_recipe = parse_recipe(STAGES_RECIPE, "stage-commands", "bench/plan_check.py")
    as_commands = {"commands": True, "export": "fgclip", "startup": startup}
    plans = {
        "stage_commands_from_bench": plan(stages_recipe, measured["images"], config, measures=bench, **as_commands),
        "stage_commands_from_runs": plan(stages_recipe, measured["images"], config, measures=mine, **as_commands),
        "fggrn_demo_from_bench": plan(load_recipe("fggrn-demo"), measured["images"], config, measures=bench, startup=startup),
        "fggrn_demo_from_runs": plan(load_recipe("fggrn-demo"), measured["images"], config, measures=mine, startup=startup),
    }
    comparison = {
        "stage_commands_a_from_bench": compare_commands(plans["stage_commands_from_bench"], measured["stage_commands_a"]),
        "stage_commands_b_from_bench": compare_commands(plans["stage_commands_from_bench"], measured["stage_commands_b"]),
        "stage_commands_b_from_runs_a": compare_commands(plans["stage_commands_from_runs"], measured["stage_commands_b"]),
        "fggrn_demo_from_bench": compare_run(plans["fggrn_demo_from_bench"], measured["fggrn_demo"]),
        "fggrn_demo_from_runs_a": compare_run(plans["fggrn_demo_from_runs"], measured["fggrn_demo"]),
    }
    return {"comparison": comparison, "plans": plans}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--measured", type=Path, help="a measurement this script saved earlier (--save) with its runs beside it: plan and compare only")
    parser.add_argument("--save", type=Path, help="save the measurement here, and pass A's manifests in <save>.runs/")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the bench records to plan from (default bench/results)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.measured:
            measured, runs = json.loads(args.measured.read_text()), args.measured.with_suffix(".runs")
        else:
            runs = args.save.with_suffix(".runs") if args.save else work / "runs"
            load_before = [round(v, 2) for v in os.getloadavg()]
            measured = measure(work, args.images, runs)
            measured |= {"load_average": {"start": load_before, "end": [round(v, 2) for v in os.getloadavg()]}, "cpu_model": cpu_model()}
            if args.save:
                args.save.write_text(json.dumps(measured, indent=2))
        checked = check(measured, work, runs, args.results)
    write_result(
        "plan_check",
        {
            "what": "fgdata plan's wall time against the commands' measured wall time (whole process, Python's start included), "
            f"{measured['images']} files from {measured['distinct_photos']} distinct real photos (crops re-encoded), captions written for the check",
            "records": str(args.results),
            "measured": measured,
            **checked,
        },
    )


if __name__ == "__main__":
    main()
