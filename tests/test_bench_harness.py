"""bench/gpu.py, the GPU harness, run end to end with --tiny on CPU: it runs where the GPU machine's
packages are missing, writes records `fgdata plan` reads, and the planner uses them once they come
from a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.recipes import load_recipe
from pipeline.reports.plan import RANDOM_REAL_ARCH, TINY_RANDOM, load_bench, plan

ROOT = Path(__file__).resolve().parents[1]

# The GPU machine has torch, transformers, accelerate, pyarrow and pandas, but not Ray, spaCy,
# ultralytics or (perhaps) sentence-transformers: None in sys.modules makes their import fail there.
_AS_ON_THE_GPU_MACHINE = """
import runpy, sys
for name in ("ray", "spacy", "ultralytics", "sentence_transformers"):
    sys.modules[name] = None
sys.argv = ["bench/gpu.py", *sys.argv[1:]]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""


def _harness(results: Path, *args: str, blocked: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", _AS_ON_THE_GPU_MACHINE] if blocked else [sys.executable, "bench/gpu.py"]
    done = subprocess.run([*command, "--tiny", "--results", str(results), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def _as_from_gpu(results: Path, gpu: str) -> None:
    """Relabels the --tiny records as measured on `gpu`, with random weights of the real architecture:
    what the harness writes on a GPU, with tiny numbers in it."""
    for path in results.glob("gpu_cpu_*.json"):
        record = json.loads(path.read_text())
        record["machine"]["gpu"], record["weights"] = gpu, RANDOM_REAL_ARCH
        path.write_text(json.dumps(record))


def test_harness_runs_without_ray_spacy_ultralytics_and_the_planner_reads_its_records(tmp_path):
    done = _harness(tmp_path, "--only", "recaption", "ground", "negatives", blocked=True)
    assert "ground: skipped, ultralytics is not installed here" in done.stdout
    summary = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert "ultralytics is not installed" in summary["skipped"]["ground"] and not summary["failed"]
    assert summary["benchmarks"]["nli"]["fgdata_nli_pairs_per_s"] > 0  # NliScorer needs no sentence-transformers
    assert sorted(p.name for p in tmp_path.glob("gpu_cpu_*.json")) == ["gpu_cpu_negatives.json", "gpu_cpu_recaption.json"]
    recaption = json.loads((tmp_path / "gpu_cpu_recaption.json").read_text())
    assert recaption["random_weights"] is True and recaption["architecture"].startswith("Qwen2_5_VLForConditionalGeneration")
    assert recaption["raw_generate_images_per_s"] > 0 and recaption["fgdata_images_per_s"] > 0 and recaption["mean_generated_tokens"] > 0
    # CPU records: the planner takes them as tiny random models on CPU, never as a GPU figure
    measures, _ = load_bench(tmp_path)
    assert {(m.stage, m.device, m.weights) for m in measures} == {("recaption", "cpu", TINY_RANDOM), ("negatives", "cpu", TINY_RANDOM)}
    bill = plan(load_recipe("fggrn"), 1000, load_config(), gpu="h100", measures=measures)
    stages = {s["stage"]: s for s in bill["stages"]}
    assert stages["recaption"]["gpu_hours"] is None and "make bench-gpu" in stages["recaption"]["basis"]

    _as_from_gpu(tmp_path, "NVIDIA H100 80GB HBM3")
    measures, _ = load_bench(tmp_path)
    bill = plan(load_recipe("fggrn"), 12_000_000, load_config(), gpu="h100", gpus=8, measures=measures)
    stages = {s["stage"]: s for s in bill["stages"]}
    for stage in ("recaption", "negatives"):
        assert stages[stage]["gpu_hours"] > 0 and "extrapolated" not in stages[stage]["basis"]
        assert "random weights of the real architecture" in stages[stage]["basis"]
    assert stages["recaption"]["per_worker_per_s"] == pytest.approx(recaption["fgdata_images_per_s"])
    assert stages["recaption"]["fixed_seconds"] == pytest.approx(recaption["load_seconds"], rel=0.05, abs=0.05)
    assert stages["ground"]["gpu_hours"] is None  # not measured: still says so
    assert bill["gpu_records"] == ["NVIDIA H100 80GB HBM3"]


def test_harness_with_every_package_measures_ground_and_hierarcaps_and_records_from_another_gpu_are_extrapolated(tmp_path):
    _harness(tmp_path, "--only", "ground", "hierarcaps")
    summary = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert not summary["skipped"] and not summary["failed"]
    ground = json.loads((tmp_path / "gpu_cpu_ground.json").read_text())
    assert ground["raw_ultralytics_predict_images_per_s"] > 0 and ground["fgdata_images_per_s"] > 0 and ground["distinct_phrases"] > 1
    assert summary["benchmarks"]["nli"]["fgdata_nli_pairs_per_s"] > 0
    _as_from_gpu(tmp_path, "NVIDIA A100-SXM4-80GB")
    measures, _ = load_bench(tmp_path)
    # the steps these records measure (seed, augment, distill and negatives have none)
    bill = plan(load_recipe("hierarcaps"), 73_000, load_config(), gpu="h100", measures=measures, stages=["hierarcaps-generate", "hierarcaps-filter"])
    for stage in bill["stages"]:
        assert "extrapolated from NVIDIA A100-SXM4-80GB by memory bandwidth" in stage["basis"], stage
    ground_plan = plan(load_recipe("fggrn"), 1000, load_config(), gpu="h100", measures=measures, stages=["ground"])["stages"][0]
    assert ground_plan["per_worker_per_s"] == pytest.approx(ground["fgdata_images_per_s"] * 3.35 / 2.0)
