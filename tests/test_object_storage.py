"""Datasets on an object store (`s3://`), against a real S3-compatible server: moto's server mode on
127.0.0.1, reached through s3fs with the endpoint and credentials from the standard AWS_*
environment, as MinIO or S3 itself would be. The shard contract, resume, the run record,
--overwrite safety, lineage and input fingerprints hold there as they do on a local disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FGDATA, SAMPLE_IMAGES, make_config, shard_worker_pids, wait_for, write_caption_shard
from object_store import all_objects, assert_s3_invariants, bucket, put_object, s3_rows, s3_server  # noqa: F401 (fixtures)

from pipeline.core import storage
from pipeline.core.schemas import conform
from pipeline.core.shards import (
    MANIFEST_FILE,
    STATS_DIR,
    finished_shards,
    list_shards,
    read_json,
    read_rejects,
    read_shard,
)
from pipeline.errors import FgdataError
from pipeline.runner import run_stage
from pipeline.stages.fggrn.ingest import IngestStage
from pipeline.stages.fggrn.phrases import PhrasesStage


# --- locations ------------------------------------------------------------------------------


def test_local_paths_stay_paths_and_uris_become_store_paths(tmp_path):
    from pathlib import Path

    assert storage.location(str(tmp_path)) == tmp_path and type(storage.location(str(tmp_path))) is type(tmp_path)
    assert storage.location(f"file://{tmp_path}") == tmp_path
    place = storage.location("s3://bucket/data/images/")
    assert not isinstance(place, Path) and str(place) == "s3://bucket/data/images"
    assert str(place / "_done" / "part-00000.parquet.done") == "s3://bucket/data/images/_done/part-00000.parquet.done"
    assert storage.is_inside(storage.location("s3://b/out/x"), storage.location("s3://b/out"))
    # a prefix of the name is not a folder above it
    assert not storage.is_inside(storage.location("s3://b/out2"), storage.location("s3://b/out"))
    assert not storage.is_inside(storage.location("s3://b/out"), tmp_path)
    with pytest.raises(FgdataError, match="s3://, gs://, hf:// URIs, not nosuchstore://"):
        storage.location("nosuchstore://bucket/x")


# The shard contract, fingerprints and --overwrite on a store: tests/test_store_contract.py (s3 and gs).


# --- stages on a store ----------------------------------------------------------------------


def caption_shards_on_s3(prefix: str, shards: int, rows: int) -> set[str]:
    keys = set()
    for shard in range(shards):
        table = pa.Table.from_pylist(
            [{"key": f"{shard:02d}-{i:04d}", "short_caption": "" if i == 3 else f"a red car next to a small dog number {i}"} for i in range(rows)]
        )
        where, filesystem = storage.arrow_target(storage.location(f"{prefix}/part-{shard:05d}.parquet"))
        pq.write_table(table, where, filesystem=filesystem)
        keys |= set(table.column("key").to_pylist())
    return keys


def test_changed_s3_input_is_refused_on_resume(bucket, tmp_path):
    keys = caption_shards_on_s3(f"{bucket}/captions", shards=2, rows=5)
    out = f"{bucket}/phrases"
    summary = run_stage(PhrasesStage(f"{bucket}/captions"), out, make_config())
    assert (summary.shards_run, summary.rows_in) == (2, 10)
    assert_s3_invariants(out, keys)
    manifest = read_json(f"{out}/{MANIFEST_FILE}")
    assert manifest["inputs"][0]["path"] == f"{bucket}/captions"
    assert storage.location(f"{out}/DATACARD.md").read_text().startswith("# Data card: phrases")
    again = run_stage(PhrasesStage(f"{bucket}/captions"), out, make_config())
    assert (again.shards_run, again.shards_skipped) == (0, 2)
    local = tmp_path / "captions"
    write_caption_shard(local / "part-00000.parquet", [{"key": "z", "short_caption": "a blue cup"}])
    where, filesystem = storage.arrow_target(storage.location(f"{bucket}/captions/part-00001.parquet"))
    pq.write_table(pq.read_table(local / "part-00000.parquet"), where, filesystem=filesystem)
    with pytest.raises(FgdataError, match="made from a different input"):
        run_stage(PhrasesStage(f"{bucket}/captions"), out, make_config())


@pytest.mark.slow
def test_fggrn_chain_end_to_end_on_s3(bucket, tmp_path):
    """ingest (local images) → phrases → ground → negatives, every dataset on s3://; ground finds
    the images through lineage on the store; image and phrase rows match the same stages on a local
    disk (the model stages are not run twice, to keep the test short)."""
    from pipeline.models.tiny import build_tiny_clip_text, build_tiny_nli
    from pipeline.stages.fggrn.ground import GroundStage
    from pipeline.stages.fggrn.negatives import NegativesStage

    texts = [p.read_text() for p in SAMPLE_IMAGES.glob("*.txt")] * 10
    clip = build_tiny_clip_text(tmp_path / "clip-text", texts)
    nli = build_tiny_nli(tmp_path / "nli", texts)
    ground = ["ground.detector=yolov8s-worldv2.yaml", f"ground.text_encoder={clip}", "ground.score_threshold=0", "ground.batch_size=4"]
    negatives = ["negatives.backend=rules", f"negatives.nli_model={nli}", "negatives.nli_rule=not_entailed", "negatives.per_region=3"]
    for root in (bucket, tmp_path / "local"):
        join = (lambda name: f"{root}/{name}") if isinstance(root, str) else (lambda name: root / name)
        run_stage(IngestStage(SAMPLE_IMAGES), join("images"), make_config("ingest.rows_per_shard=10"))
        run_stage(PhrasesStage(join("images")), join("phrases"), make_config())
    run_stage(GroundStage(f"{bucket}/phrases"), f"{bucket}/regions", make_config(*ground))
    run_stage(NegativesStage(f"{bucket}/regions"), f"{bucket}/fggrn", make_config(*negatives))
    keys = {row["key"] for row in s3_rows(f"{bucket}/images")} | {r["key"] for r in read_rejects(f"{bucket}/images").to_pylist()}
    assert (len(s3_rows(f"{bucket}/images")), len(keys)) == (17, 19)  # the sample's two broken files are rejects
    for name in ("images", "phrases", "regions", "fggrn"):
        assert_s3_invariants(f"{bucket}/{name}", keys if name == "images" else {row["key"] for row in s3_rows(f"{bucket}/images")})
    for name in ("images", "phrases"):
        local = tmp_path / "local" / name
        local_rows = [row for shard in list_shards(local) for row in read_shard(shard).to_pylist()]
        drop = ("source",)  # where the row came from names the input's location
        assert [{k: v for k, v in r.items() if k not in drop} for r in s3_rows(f"{bucket}/{name}")] == [
            {k: v for k, v in r.items() if k not in drop} for r in local_rows
        ]
    regions = read_json(f"{bucket}/regions/{MANIFEST_FILE}")
    assert [(i["path"], i.get("role")) for i in regions["inputs"]] == [(f"{bucket}/phrases", None), (f"{bucket}/images", "images")]
    assert sum(len(row["regions"]) for row in s3_rows(f"{bucket}/regions")) > 0
    assert any(region["negatives"] for row in s3_rows(f"{bucket}/fggrn") for region in row["regions"])
    assert read_json(f"{bucket}/fggrn/{MANIFEST_FILE}")["inputs"][0]["inputs"][0]["path"] == f"{bucket}/phrases"


def _phrases_on_ray(source: str, out: str) -> subprocess.Popen:
    args = [str(FGDATA), "phrases", source, out, "-s", "run.max_shards_in_flight=1", "-s", "run.progress=false", "-s", "run.executor=ray", "-s", "run.num_cpus=2"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=dict(os.environ))


@pytest.mark.slow
def test_killed_run_on_s3_resumes_without_duplicates(bucket):
    """`fgdata phrases s3://… s3://…` on Ray, killed (SIGKILL, driver and all) once some shards are
    done; the rerun skips exactly the finished shards and ends with every key once."""
    shards = 5
    keys = caption_shards_on_s3(f"{bucket}/captions", shards=shards, rows=400)
    out = f"{bucket}/phrases"
    run = _phrases_on_ray(f"{bucket}/captions", out)
    try:
        wait_for(lambda: len(finished_shards(out)) >= 2 or run.poll() is not None, 240, "two finished shards")
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL, run.stderr.read()
    wait_for(lambda: not shard_worker_pids(), 60, "the killed run's workers to exit")
    finished = finished_shards(out)
    assert 2 <= len(finished) < shards and read_json(f"{out}/{MANIFEST_FILE}") is None
    stats_before = {name: storage.location(f"{out}/{STATS_DIR}/{name.replace('.parquet', '.json')}").read_text() for name in finished}

    rerun = _phrases_on_ray(f"{bucket}/captions", out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"{len(finished)} already finished" in stdout
    # finished shards were skipped, not redone: their stats (with timings) are the same bytes
    assert {name: storage.location(f"{out}/{STATS_DIR}/{name.replace('.parquet', '.json')}").read_text() for name in finished} == stats_before
    assert_s3_invariants(out, keys)
    assert json.loads(storage.location(f"{out}/{MANIFEST_FILE}").read_text())["rows_rejected"] == shards


# --- ingest from a store --------------------------------------------------------------------


def upload_folder(local, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            put_object(f"{uri}/{path.relative_to(local).as_posix()}", path.read_bytes())


def local_rows_and_rejects(dataset) -> tuple[list[dict], list[tuple]]:
    rows = [{k: v for k, v in r.items() if k != "source"} for shard in list_shards(dataset) for r in read_shard(shard).to_pylist()]
    return rows, sorted((r["key"], r["reason"]) for r in read_rejects(dataset).to_pylist())


def test_ingest_from_an_s3_folder_equals_the_local_folder(bucket, tmp_path):
    """The sample (images with .txt/.json sidecars, two broken files) in a sub-folder, on s3 and
    on disk: the same rows (keys, bytes, captions, sizes), the same rejects, across shards."""
    local = tmp_path / "src"
    (local / "sub").mkdir(parents=True)
    for path in SAMPLE_IMAGES.iterdir():
        (local / ("sub" if path.stem.startswith("c") else "") / path.name).write_bytes(path.read_bytes())
    upload_folder(local, f"{bucket}/src")
    config = make_config("ingest.rows_per_shard=7")
    run_stage(IngestStage(local), tmp_path / "images", config)
    summary = run_stage(IngestStage(f"{bucket}/src"), f"{bucket}/images", config)
    rows, rejects = local_rows_and_rejects(tmp_path / "images")
    assert (summary.rows_out, summary.shards_total) == (17, 3)
    assert local_rows_and_rejects(f"{bucket}/images") == (rows, rejects)
    assert {"sub/chelsea", "sub/camera", "astronaut"} <= {r["key"] for r in rows}
    assert next(r for r in rows if r["key"] == "sub/chelsea")["short_caption"]  # a .json sidecar read from the store
    assert rejects == [("broken_not_an_image", "not_an_image"), ("broken_truncated", "decode_error")]
    assert {r["source"] for r in s3_rows(f"{bucket}/images")} >= {f"{bucket}/src/astronaut.jpg", f"{bucket}/src/sub/chelsea.jpg"}
    assert read_json(f"{bucket}/images/{MANIFEST_FILE}")["inputs"] == [{"path": f"{bucket}/src", "format": "folder"}]
    assert_s3_invariants(f"{bucket}/images", {r["key"] for r in rows} | {k for k, _ in rejects})


def test_ingest_from_s3_webdataset_tars_equals_local_tars(bucket, tmp_path):
    import io
    import tarfile

    local = tmp_path / "wds"
    local.mkdir()
    samples = sorted(p for p in SAMPLE_IMAGES.glob("*.jpg") if not p.stem.startswith("broken"))
    for number, chunk in enumerate((samples[:6], samples[6:])):
        with tarfile.open(local / f"{number:05d}.tar", "w") as tar:
            for path in chunk:
                for member in (path, *[p for p in (path.with_suffix(".txt"), path.with_suffix(".json")) if p.exists()]):
                    data = member.read_bytes()
                    info = tarfile.TarInfo(f"{path.stem}{member.suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    # a tar cut short in the middle of its second image: the first is kept, the second rejected
    first = samples[0].read_bytes()
    with tarfile.open(local / "whole.tar.tmp", "w") as tar:
        for name in ("zz-kept.jpg", "zz-cut.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(first)
            tar.addfile(info, io.BytesIO(first))
    padded = -(-len(first) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    (local / "00002.tar").write_bytes((local / "whole.tar.tmp").read_bytes()[: 2 * tarfile.BLOCKSIZE + padded + 4000])
    (local / "whole.tar.tmp").unlink()
    upload_folder(local, f"{bucket}/wds")
    config = make_config("ingest.rows_per_shard=5")
    run_stage(IngestStage(local), tmp_path / "images", config)
    run_stage(IngestStage(f"{bucket}/wds"), f"{bucket}/images", config)
    rows, rejects = local_rows_and_rejects(tmp_path / "images")
    assert len(rows) == len(samples) + 1 and any(r["key"] == "zz-kept" for r in rows)
    assert all(r["short_caption"] for r in rows if r["key"] != "zz-kept")  # every caption member was read
    # cut short: the tar ends inside the second image's bytes, and the tar's damage is its own reject
    assert rejects == [("00002.tar", "unreadable_tar"), ("zz-cut", "unreadable_file")]
    assert local_rows_and_rejects(f"{bucket}/images") == (rows, rejects)
    assert read_json(f"{bucket}/images/{MANIFEST_FILE}")["inputs"] == [{"path": f"{bucket}/wds", "format": "webdataset"}]


def test_hostile_objects_in_an_s3_source_become_rejects(bucket, tmp_path, monkeypatch):
    """Only objects are read: a prefix named like an image is not_a_file; a sidecar over the size
    cap, not UTF-8 or not JSON rejects its image without being fetched whole; every candidate ends
    as a row or a reject."""
    from pipeline.core import sources

    good = (SAMPLE_IMAGES / "astronaut.jpg").read_bytes()
    src = f"{bucket}/src"
    put_object(f"{src}/ok.jpg", good)
    put_object(f"{src}/ok.txt", b"an astronaut")
    put_object(f"{src}/folder.jpg/inside.txt", b"a prefix, not an image")
    put_object(f"{src}/big.jpg", good)
    put_object(f"{src}/big.txt", b"x" * 64)
    put_object(f"{src}/latin1.jpg", good)
    put_object(f"{src}/latin1.txt", "caf\xe9".encode("latin-1"))
    put_object(f"{src}/badjson.jpg", good)
    put_object(f"{src}/badjson.json", b"{not json")
    put_object(f"{src}/empty.jpg", b"")
    monkeypatch.setattr(sources, "MAX_SIDECAR_BYTES", 32)
    fetched = []
    real_cat = type(storage.location(src).fs).cat_file
    monkeypatch.setattr(type(storage.location(src).fs), "cat_file", lambda self, path, *a, **k: (fetched.append(path), real_cat(self, path, *a, **k))[1])
    run_stage(IngestStage(src), f"{bucket}/images", make_config())
    assert [r["key"] for r in s3_rows(f"{bucket}/images")] == ["ok"]
    assert s3_rows(f"{bucket}/images")[0]["short_caption"] == "an astronaut"
    reasons = {r["key"]: r["reason"] for r in read_rejects(f"{bucket}/images").to_pylist()}
    assert reasons == {"folder": "not_a_file", "big": "bad_caption_sidecar", "latin1": "bad_caption_sidecar", "badjson": "bad_caption_sidecar", "empty": "empty_file"}
    assert not [p for p in fetched if p.endswith("big.txt")]  # over the cap: never fetched


def test_changed_s3_image_changes_the_ingest_fingerprint(bucket, tmp_path):
    from pipeline.core.sources import list_items

    src = f"{bucket}/src"
    put_object(f"{src}/a.jpg", (SAMPLE_IMAGES / "astronaut.jpg").read_bytes())
    first = list_items(src, "auto", make_config().ingest)
    assert first[0].signature and "signature=" in repr(first[0])
    local = tmp_path / "src"
    local.mkdir()
    (local / "a.jpg").write_bytes((SAMPLE_IMAGES / "astronaut.jpg").read_bytes())
    assert "signature" not in repr(list_items(local, "auto", make_config().ingest)[0])  # local fingerprints unchanged
    run_stage(IngestStage(src), f"{bucket}/images", make_config())
    put_object(f"{src}/a.jpg", (SAMPLE_IMAGES / "coffee.jpg").read_bytes())
    assert list_items(src, "auto", make_config().ingest)[0].signature != first[0].signature
    with pytest.raises(FgdataError, match="made from a different input"):
        run_stage(IngestStage(src), f"{bucket}/images", make_config())


def test_fgdata_ingest_takes_an_s3_source_folder_or_table(bucket):
    from typer.testing import CliRunner

    from pipeline.cli import app

    put_object(f"{bucket}/src/a.jpg", (SAMPLE_IMAGES / "astronaut.jpg").read_bytes())
    put_object(f"{bucket}/src/a.txt", b"an astronaut")
    result = CliRunner().invoke(app, ["ingest", f"{bucket}/src", f"{bucket}/images", "-s", "run.progress=false"])
    assert result.exit_code == 0, result.output
    assert [(r["key"], r["short_caption"]) for r in s3_rows(f"{bucket}/images")] == [("a", "an astronaut")]
    put_object(f"{bucket}/src/b.jpg", b"not an image")
    result = CliRunner().invoke(app, ["ingest", f"{bucket}/src", f"{bucket}/images", "--overwrite", "-s", "run.progress=false"])
    info = CliRunner().invoke(app, ["info", f"{bucket}/images"])  # `fgdata info` reads the dataset on the store
    assert info.exit_code == 0, info.output
    assert result.exit_code == 0 and info.exit_code == 0, info.output
    lines = info.output.splitlines()  # (the test server's request log may land in the output too)
    assert lines.index(f"{bucket}/images  (images, written by `fgdata ingest`)") + 1 == lines.index("  shards: 1   rows in: 2   rows out: 1   rejected: 1")
    assert "not_an_image" in info.output and "with a caption: 1 of 1" in info.output
    # a table on the store is read too: its paths are relative to its folder there
    put_object(f"{bucket}/table.csv", b"image,caption\nsrc/a.jpg,from a table\nmissing.jpg,y\n")
    result = CliRunner().invoke(app, ["ingest", f"{bucket}/table.csv", f"{bucket}/t", "-s", "run.progress=false"])
    assert result.exit_code == 0, result.output
    assert [(r["key"], r["short_caption"]) for r in s3_rows(f"{bucket}/t")] == [("a", "from a table")]
    assert [(r["key"], r["reason"]) for r in read_rejects(f"{bucket}/t").to_pylist()] == [("missing", "missing_file")]


# --- HierarCaps on a store ------------------------------------------------------------------


@pytest.mark.slow
def test_hierarcaps_import_filter_negatives_on_s3_equal_the_local_run(bucket, tmp_path):
    """An official train CSV on s3 → import → filter (tiny NLI) → negatives, every dataset on s3,
    row for row and reject for reject what the same commands write on a local disk."""
    from synthetic import synthetic_chains
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.models.tiny import build_tiny_nli

    chains = synthetic_chains(30, seed=3)
    nli = build_tiny_nli(tmp_path / "nli", [" ".join(tiers) for tiers in chains])
    lines = ["positive,negative"] + [f'"{" => ".join(t)}","{" => ".join(reversed(t))}"' for t in chains[:20]]
    lines += ['"only => three => tiers",', '"a => b => c => d\x00",']  # rejects: too short, a NUL
    csv_bytes = ("\n".join(lines) + "\n").encode()
    generated = [
        {"key": f"g{i:03d}", "split": "train", "tiers": t, "negative_candidates": [["bird", "stone"], [f"pink {t[0]}"], [f"{t[1]} on the moon"], [t[-1] + " at night"]], "source": "test"}
        for i, t in enumerate(chains[20:])
    ]
    generated[0]["negative_candidates"] = [[], [], [], []]
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "train.csv").write_bytes(csv_bytes)
    put_object(f"{bucket}/train.csv", csv_bytes)
    pq.write_table(conform(generated, "hierarcaps"), tmp_path / "local" / "generated.parquet")
    put_object(f"{bucket}/generated/part-00000.parquet", (tmp_path / "local" / "generated.parquet").read_bytes())
    (tmp_path / "local" / "generated").mkdir()
    (tmp_path / "local" / "generated.parquet").rename(tmp_path / "local" / "generated" / "part-00000.parquet")
    sets = ["-s", f"hierarcaps.nli_model={nli}", "-s", "hierarcaps.min_negative_contradiction=0", "-s", "run.progress=false"]
    # the random NLI's scores are noise: a first local pass finds the median, so filter keeps some and rejects some
    probe = [f"{tmp_path}/local/train.csv", f"{tmp_path}/probe-imported", f"{tmp_path}/probe-filtered"]
    assert CliRunner().invoke(app, ["hierarcaps", "import", *probe[:2]]).exit_code == 0
    assert CliRunner().invoke(app, ["hierarcaps", "filter", *probe[1:], *sets, "-s", "hierarcaps.min_entailment=0"]).exit_code == 0
    weakest = sorted(min(r["entailment"]) for shard in list_shards(probe[2]) for r in read_shard(shard).to_pylist())
    median = ["-s", f"hierarcaps.min_entailment={weakest[len(weakest) // 2]}"]
    for root in (str(tmp_path / "local"), bucket):
        for args in (
            ["import", f"{root}/train.csv", f"{root}/imported", "-s", "ingest.rows_per_shard=8"],
            ["filter", f"{root}/imported", f"{root}/filtered", *sets, *median],
            ["negatives", f"{root}/generated", f"{root}/negatives", *sets, "-s", "hierarcaps.min_entailment=0"],
        ):
            result = CliRunner().invoke(app, ["hierarcaps", *args])
            assert result.exit_code == 0, (args, result.output)

    def content(dataset: str):
        rows = [{k: v for k, v in r.items() if k != "source"} for shard in list_shards(dataset) for r in read_shard(shard).to_pylist()]
        rejects = sorted((r["key"], r["reason"], r["detail"]) for r in read_rejects(dataset).to_pylist())
        return rows, rejects

    for name, (rows_out, rejected) in {"imported": (20, 2), "negatives": (9, 1)}.items():
        assert [len(part) for part in content(f"{bucket}/{name}")] == [rows_out, rejected], name
    assert content(f"{bucket}/imported")[0][0]["negative_tiers"]  # the negative column was read
    filtered = content(f"{bucket}/filtered")
    assert filtered[0] and filtered[1]  # the threshold keeps some chains and rejects others
    for name in ("imported", "filtered", "negatives"):
        assert content(f"{bucket}/{name}") == content(str(tmp_path / "local" / name)), name
        assert_s3_invariants(f"{bucket}/{name}", {r["key"] for r in s3_rows(f"{bucket}/{name}")} | {r["key"] for r in read_rejects(f"{bucket}/{name}").to_pylist()})
    assert read_json(f"{bucket}/filtered/{MANIFEST_FILE}")["inputs"][0]["path"] == f"{bucket}/imported"
    assert read_json(f"{bucket}/imported/{MANIFEST_FILE}")["inputs"] == [{"path": f"{bucket}/train.csv", "format": "hierarcaps-csv"}]


@pytest.mark.slow
def test_hierarcaps_seed_and_augment_read_captions_and_demonstrations_on_s3(bucket, tmp_path, monkeypatch):
    """seed from caption shards and from a .csv on s3, augment with demonstrations on s3 (the FAKE
    vLLM of tests/fakes answers): the same chains and rejects as from the local copies."""
    import sys
    from pathlib import Path

    from pipeline.models.tiny import build_tiny_llm
    from pipeline.stages.hierarcaps.augment import HierarcapsAugmentStage
    from pipeline.stages.hierarcaps.seed import HierarcapsSeedStage

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fakes"))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm  # the FAKE from tests/fakes

    monkeypatch.setattr(vllm, "RESPONDER", lambda prompt: "thing => red thing => red thing here" if "car" in prompt.rpartition("Caption:")[2] else "no chain")
    llm = build_tiny_llm(tmp_path / "llm", [(Path(__file__).parent.parent / "prompts" / "hierarcaps_seed.v1.txt").read_text()] * 5)
    local = tmp_path / "local"
    rows = [{"key": f"c{i}", "short_caption": f"a red car number {i}" if i % 3 else f"a dog number {i}"} for i in range(9)]
    write_caption_shard(local / "shards" / "part-00000.parquet", rows)
    (local / "captions.csv").write_text("key,caption\n" + "".join(f"{r['key']},{r['short_caption']}\n" for r in rows))
    upload_folder(local, f"{bucket}")
    settings = make_config("hierarcaps.backend=vllm", f"hierarcaps.model={llm}", "hierarcaps.demonstrations=1")

    def content(dataset) -> tuple[list, list]:
        kept = [(r["key"], r["tiers"]) for shard in list_shards(dataset) for r in read_shard(shard).to_pylist()]
        return kept, sorted((r["key"], r["reason"]) for r in read_rejects(dataset).to_pylist())

    for name in ("shards", "captions.csv"):
        run_stage(HierarcapsSeedStage(local / name), local / f"seed-{name}", settings)
        run_stage(HierarcapsSeedStage(f"{bucket}/{name}"), f"{bucket}/seed-{name}", settings)
        kept, rejects = content(f"{bucket}/seed-{name}")
        assert (len(kept), len(rejects)) == (6, 3) and (kept, rejects) == content(local / f"seed-{name}"), name
    run_stage(HierarcapsAugmentStage(local / "shards", local / "seed-shards"), local / "augmented", settings)
    run_stage(HierarcapsAugmentStage(f"{bucket}/shards", f"{bucket}/seed-shards"), f"{bucket}/augmented", settings)
    assert content(f"{bucket}/augmented") == content(local / "augmented") and content(local / "augmented")[0]
    roles = [(i["path"], i.get("role")) for i in read_json(f"{bucket}/augmented/{MANIFEST_FILE}")["inputs"]]
    assert (f"{bucket}/seed-shards", "demonstrations") in roles


def test_export_fgclip_reads_fggrn_and_image_shards_on_s3(bucket, tmp_path):
    """`fgdata export fgclip s3://…/fggrn OUT --images s3://…/images` writes the same fgclip.json
    and images as the export of the local copies."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.datasets.synthetic_world import write_world

    world = write_world(tmp_path / "world", 5, side=16)
    for kind in ("images", "fggrn"):
        upload_folder(world[kind], f"{bucket}/{kind}")
    local = CliRunner().invoke(app, ["export", "fgclip", str(world["fggrn"]), str(tmp_path / "local-out")])
    remote = CliRunner().invoke(app, ["export", "fgclip", f"{bucket}/fggrn", str(tmp_path / "s3-out"), "--images", f"{bucket}/images"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    exported = {name: sorted(p.relative_to(tmp_path / name).as_posix() for p in (tmp_path / name).rglob("*") if p.is_file()) for name in ("local-out", "s3-out")}
    assert exported["s3-out"] == exported["local-out"] and sum(n.startswith("images/") for n in exported["s3-out"]) == 5
    for name in ("fgclip.json", *(n for n in exported["s3-out"] if n.startswith("images/"))):
        assert (tmp_path / "s3-out" / name).read_bytes() == (tmp_path / "local-out" / name).read_bytes(), name
    assert "# Data card: fggrn" in (tmp_path / "s3-out" / "DATACARD.md").read_text()


def test_trainer_rows_read_fggrn_on_s3_through_its_lineage(bucket, tmp_path):
    """fgclip_sources / fgclip_rows (what `fgdata train fgclip` and `eval` stream) on s3: the image
    shards are found through the manifest's lineage on the store; the rows equal the local ones."""
    from pipeline.datasets.fggrn_rows import fgclip_rows, fgclip_sources
    from pipeline.datasets.synthetic_world import write_world

    world = write_world(tmp_path / "world", 6, side=16, rows_per_shard=4)
    for kind in ("images", "fggrn"):
        upload_folder(world[kind], f"{bucket}/{kind}")
    manifest = read_json(f"{bucket}/fggrn/{MANIFEST_FILE}")
    manifest["inputs"] = [{**entry, "path": f"{bucket}/images"} for entry in manifest["inputs"]]  # lineage on the store
    put_object(f"{bucket}/fggrn/{MANIFEST_FILE}", json.dumps(manifest).encode())
    pairs = fgclip_sources([f"{bucket}/fggrn"], None)
    assert [(str(a), str(b)) for a, b in pairs] == [(f"{bucket}/fggrn/train/{n}", f"{bucket}/images/train/{n}") for n in ("part-00000.parquet", "part-00001.parquet")]
    remote = list(fgclip_rows(pairs, max_boxes=None))
    local = list(fgclip_rows(fgclip_sources([world["fggrn"]], None), max_boxes=None))
    assert len(remote) == 6 and remote == local
