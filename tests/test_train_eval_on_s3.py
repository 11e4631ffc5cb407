"""`fgdata train`, `fgdata hierarcaps distill`, `fgdata hierarcaps generate` and `fgdata eval` read
their datasets from an object store (`s3://`, against moto's S3 server) and give exactly what they
give on the same data on a local disk. A model is trained into a local folder: a URI `--out` of
train or distill is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_caption_shard
from object_store import all_objects, bucket, put_object, s3_rows, s3_server  # noqa: F401 (fixtures)
from PIL import Image
from safetensors.torch import load_file
from synthetic import synthetic_chains
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import storage
from pipeline.core.schemas import conform
from pipeline.core.shards import DATA_DIR, MANIFEST_FILE, list_shards, read_json, read_rejects, read_shard
from pipeline.datasets.synthetic_world import COLOURS, PATTERNS, SHAPES, SIZES, write_world

# two data-loader workers: forks of the trainer, each reading the store through clients of its own
FAST = ["fgclip.num_workers=2", "fgclip.batch_size=8", "fgclip.learning_rate=1e-3", "fgclip.warmup_steps=2", "fgclip.shuffle_buffer=16",
        "fgclip.max_steps=4", "fgclip.log_every=2", "radial.max_steps=4", "radial.batch_size=8", "radial.log_every=2", "run.progress=false"]


def fgdata(*args: str):
    """The command in this process (the store's endpoint is in its environment)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def upload_folder(local: Path, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            put_object(f"{uri}/{path.relative_to(local).as_posix()}", path.read_bytes())


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def store(s3_server, tmp_path_factory):  # noqa: F811 (the fixture)
    """A synthetic world (images, fggrn, hierarcaps; two shards each) on local disk and the same on
    the store, its lineage pointing at the store's images; a tiny CLIP; validated chains for distill."""
    from pipeline.models.tiny import build_tiny_clip

    root = tmp_path_factory.mktemp("s3world")
    uri = "s3://fgdata-train-eval"
    storage.location(uri).fs.mkdir("fgdata-train-eval")
    world = write_world(root / "world", 24, seed=3, rows_per_shard=12)
    for kind in ("images", "fggrn", "hierarcaps"):
        upload_folder(world[kind], f"{uri}/{kind}")
        if kind != "images":  # found through lineage on the store, as a stage writing there records it
            manifest = read_json(f"{uri}/{kind}/{MANIFEST_FILE}")
            manifest["inputs"] = [{**entry, "path": f"{uri}/images"} for entry in manifest["inputs"]]
            put_object(f"{uri}/{kind}/{MANIFEST_FILE}", json.dumps(manifest).encode())
    vocabulary = [f"a {s} {p} {c} {shape}" for s in SIZES for p in PATTERNS for c in COLOURS for shape in SHAPES]
    vocabulary += ["An image on a dark grey background showing at the top bottom left right and a photo of shape animal plant vehicle person"] * 5
    chains = synthetic_chains(300, seed=1)
    (root / "chains" / DATA_DIR).mkdir(parents=True)
    rows = [{"key": f"chain-{i:05d}", "split": "train", "tiers": tiers, "source": "synthetic"} for i, tiers in enumerate(chains)]
    pq.write_table(conform(rows, "hierarcaps"), root / "chains" / DATA_DIR / "part-00000.parquet")
    upload_folder(root / "chains", f"{uri}/chains")
    return {"uri": uri, "root": root, "world": world, "clip": build_tiny_clip(root / "clip", vocabulary), "chains": chains}


def test_train_and_distill_refuse_a_uri_out_before_any_work(tmp_path):
    missing = tmp_path / "no-such-input"  # read first, it would end in another error
    for command in (["train", missing, "--out", "s3://models/clip"], ["hierarcaps", "distill", missing, "--out", "gs://models/t5"]):
        result = CliRunner().invoke(app, [str(a) for a in command])
        assert result.exit_code == 2, result.output
        assert "a model is trained into a local folder; give a local path, then copy the finished folder" in result.output
        assert "Traceback" not in result.output


def test_train_on_s3_datasets_equals_the_local_run(store, tmp_path):
    """fgclip on FgGRN shards with --images on the store, and re on hierarcaps shards on the store:
    the same history and the same weights as on the local copies."""
    uri, world, clip = store["uri"], store["world"], store["clip"]
    settings = [arg for item in FAST for arg in ("--set", item)]
    runs = {
        "fgclip": ([f"{uri}/fggrn", "--images", f"{uri}/images"], [world["fggrn"], "--images", world["images"]]),
        "re": ([f"{uri}/hierarcaps"], [world["hierarcaps"]]),
    }
    for objective, (remote, local) in runs.items():
        fgdata("train", *remote, "--objective", objective, "--model", clip, "--out", tmp_path / f"{objective}-s3", *settings)
        fgdata("train", *local, "--objective", objective, "--model", clip, "--out", tmp_path / f"{objective}-local", *settings)
        on_s3, on_disk = (json.loads((tmp_path / f"{objective}-{where}" / "train.json").read_text()) for where in ("s3", "local"))
        assert on_s3["sources"] == [runs[objective][0][0]] and on_s3["steps"] == 4
        assert on_s3["data"] == on_disk["data"] and on_s3["data"]["rows_usable"] == 24
        assert on_s3["history"] == on_disk["history"] and len(on_s3["history"]) == 2
        assert same_weights(tmp_path / f"{objective}-s3" / "model.safetensors", tmp_path / f"{objective}-local" / "model.safetensors")


@pytest.fixture(scope="module")
def distilled(store, tmp_path_factory):
    """A tiny T5 distilled on the chains on the store, and on their local copy, with one seed."""
    from pipeline.models.tiny import build_tiny_t5
    from pipeline.train.distill import distillation_pairs

    root = tmp_path_factory.mktemp("distilled")
    base = build_tiny_t5(root / "t5", [text for tiers in store["chains"] for pair in distillation_pairs(tiers) for text in pair])
    settings = ["distill.max_steps=80", "distill.batch_size=32", "distill.learning_rate=3e-3", "distill.warmup_steps=10",
                "distill.eval_every=40", "distill.max_eval_chains=8", "run.progress=false"]
    flags = [arg for item in settings for arg in ("--set", item)]
    fgdata("hierarcaps", "distill", f"{store['uri']}/chains", "--base", base, "--out", root / "s3", *flags)
    fgdata("hierarcaps", "distill", store["root"] / "chains", "--base", base, "--out", root / "local", *flags)
    return root


@pytest.mark.slow
def test_distill_on_s3_chains_equals_the_local_run(store, distilled):
    on_s3, on_disk = (json.loads((distilled / where / "distill.json").read_text()) for where in ("s3", "local"))
    assert [entry["path"] for entry in on_s3["inputs"]] == [f"{store['uri']}/chains"]
    from pipeline.train.distill import held_out

    assert on_s3["chains"] == on_disk["chains"] and on_s3["chains"]["train"] == sum(not held_out(f"chain-{i:05d}", 0.05) for i in range(300))
    assert on_s3["history"] == on_disk["history"] and on_s3["held_out_exact_match"] == on_disk["held_out_exact_match"]
    assert same_weights(distilled / "s3" / "model.safetensors", distilled / "local" / "model.safetensors")


@pytest.mark.slow
def test_generate_on_s3_captions_equals_the_local_run(store, distilled, tmp_path):
    uri = store["uri"]
    captions = [{"key": f"cap-{i:03d}", "short_caption": tiers[-1]} for i, tiers in enumerate(synthetic_chains(20, seed=7))]
    captions.append({"key": "cap-blank", "short_caption": "   "})
    for shard, start in enumerate((0, 11)):
        write_caption_shard(tmp_path / "captions" / DATA_DIR / f"part-{shard:05d}.parquet", captions[start : start + 11])
    upload_folder(tmp_path / "captions", f"{uri}/captions")
    flags = ["--model", distilled / "local", "--executor", "local", "--set", "hierarcaps.batch_size=4", "--set", "run.progress=false"]
    fgdata("hierarcaps", "generate", f"{uri}/captions", f"{uri}/generated", *flags)
    fgdata("hierarcaps", "generate", tmp_path / "captions", tmp_path / "generated", *flags)
    local_rows = [row for shard in list_shards(tmp_path / "generated") for row in read_shard(shard).to_pylist()]
    assert s3_rows(f"{uri}/generated") == local_rows and len(local_rows) >= 2  # the 80-step model writes some usable chains
    assert read_rejects(f"{uri}/generated").to_pylist() == read_rejects(tmp_path / "generated").to_pylist()
    assert {r["key"] for r in read_rejects(tmp_path / "generated").to_pylist()} >= {"cap-blank"}
    assert read_json(f"{uri}/generated/{MANIFEST_FILE}")["inputs"][0]["path"] == f"{uri}/captions"


def test_eval_on_s3_datasets_equals_the_local_run_and_writes_its_json_there(store, tmp_path):
    uri, world, clip = store["uri"], store["world"], store["clip"]
    fgdata("eval", "--model", clip, "--fggrn", f"{uri}/fggrn", "--hierarcaps", f"{uri}/hierarcaps", "--limit", "20", "--out", f"{uri}/eval/results.json")
    fgdata("eval", "--model", clip, "--fggrn", world["fggrn"], "--hierarcaps", world["hierarcaps"], "--limit", "20", "--out", tmp_path / "results.json")
    on_s3 = json.loads(all_objects(f"{uri}/eval")[f"{uri.removeprefix('s3://')}/eval/results.json"])
    assert on_s3 == json.loads((tmp_path / "results.json").read_text())
    # the images came through the lineage on the store: hierarchical retrieval ran on them
    assert on_s3["fggrn"]["fg_ovd"]["boxes"] > 0 and on_s3["hierarcaps"]["images"] == 20
    refused = CliRunner().invoke(app, ["eval", "--model", str(clip), "--fggrn", f"{uri}/fggrn", "--out", f"{uri}/eval/results.json"])
    assert refused.exit_code == 2 and "already exists" in refused.output


def test_eval_reads_an_fg_ovd_jsonl_a_test_csv_and_their_images_on_s3(store, tmp_path):
    """--fg-ovd and --hierarcaps (an official test CSV) with --image-root, all on the store: the
    results equal those on the local copy, and an img_path that leads out of the root is skipped
    there as it is on disk."""
    uri = store["uri"]
    local = tmp_path / "bench"
    (local / "imgs").mkdir(parents=True)
    for number, colour in ((1, (200, 30, 30)), (2, (30, 30, 200))):
        Image.new("RGB", (96, 64), colour).save(local / "imgs" / f"COCO_val2014_{number:012d}.jpg")
    (local / "secret.png").write_bytes((local / "imgs" / "COCO_val2014_000000000001.jpg").read_bytes())
    lines = [
        {"img_path": "COCO_val2014_000000000001.jpg", "bbox": [8, 8, 40, 30], "pos_expression": "a small solid red circle", "neg_expression": ["a small solid blue circle", "a large solid red circle"]},
        {"img_path": "COCO_val2014_000000000002.jpg", "bbox": [0, 0, 96, 64], "pos_expression": "a large striped blue square", "neg_expression": ["a large striped red square"]},
        {"img_path": "../secret.png", "bbox": [0, 0, 10, 10], "pos_expression": "a red circle", "neg_expression": ["a blue circle"]},
    ]
    (local / "fg.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    url = "http://images.cocodataset.org/val2014/COCO_val2014_{:012d}.jpg"
    (local / "hierarcaps_test.csv").write_text(
        "id,captions,image_url\n"
        f"1,shape => circle => red circle => a small solid red circle,{url.format(1)}\n"
        f"2,shape => square => blue square => a large striped blue square,{url.format(2)}\n"
        f"3,shape => circle => blue circle => a small solid blue circle,{url.format(3)}\n"
    )
    upload_folder(local, f"{uri}/bench")
    results = {}
    for name, base in (("s3", f"{uri}/bench"), ("local", str(local))):
        out = tmp_path / f"{name}.json"
        fgdata("eval", "--model", store["clip"], "--fg-ovd", f"{base}/fg.jsonl", "--hierarcaps", f"{base}/hierarcaps_test.csv", "--image-root", f"{base}/imgs", "--out", out)
        results[name] = json.loads(out.read_text())
    assert results["s3"]["fg_ovd_benchmark"].pop("file") == f"{uri}/bench/fg.jsonl"
    results["local"]["fg_ovd_benchmark"].pop("file")
    assert results["s3"] == results["local"]
    benchmark, hierarchy = results["s3"]["fg_ovd_benchmark"], results["s3"]["hierarcaps"]
    assert benchmark["boxes"] == 2 and benchmark["skipped"] == {"image_outside_root": 1}
    assert hierarchy["images"] == 2 and hierarchy["skipped"] == {"skipped_image_not_found": 1}


def test_an_fg_ovd_image_root_on_s3_keeps_keys_inside_it():
    from pipeline.eval.evaluate import image_in_root

    root = storage.location("s3://bucket/bench/imgs")
    for outside in ("../secret.png", "/etc/passwd", "a/../../b.png", "s3://other/x.png"):
        path, problem = image_in_root(root, outside)
        assert path is None and problem[0] == "image_outside_root", outside
