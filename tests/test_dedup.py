"""`fgdata dedup`: planted duplicates of real photos found across shards, unrelated photos kept,
the kept image chosen by rule, the grouping (LSH bands) exact against all pairs, resume, bad input."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import SAMPLE_IMAGES, assert_dataset_invariants, make_config, read_rows, run_cli
from pipeline.core.near_duplicates import find_duplicates, ident
from pipeline.core.schemas import conform
from pipeline.core.shards import read_json, read_rejects
from pipeline.errors import FgdataError
from pipeline.runner import run_stage
from pipeline.stages.fggrn.dedup import DedupStage
from object_store import bucket, s3_server  # noqa: F401 - the S3 store fixtures
from test_cluster import cluster  # noqa: F401 - the multi-node Ray cluster fixture

PHOTOS = ["astronaut", "brick", "camera", "chelsea", "coffee", "horse", "rocket", "coins"]


def _encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def planted_variants(image: Image.Image) -> dict[str, bytes]:
    """Copies a crawl meets: re-encoded at JPEG quality 50 and 80, half size, a small colour shift,
    the same pixels as PNG."""
    shifted = np.clip(np.asarray(image).astype(np.int16) + np.array([8, -4, 4]), 0, 255).astype(np.uint8)
    return {
        "q50": _encode(image, quality=50),
        "q80": _encode(image, quality=80),
        "half": _encode(image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC), quality=90),
        "shift": _encode(Image.fromarray(shifted), quality=90),
        "png": _encode(image, "PNG"),
    }


def image_row(key: str, data: bytes, caption: str | None = None) -> dict:
    with Image.open(io.BytesIO(data)) as image:
        width, height, fmt = image.width, image.height, image.format
    return {"key": key, "image": data, "width": width, "height": height, "format": fmt, "short_caption": caption, "source": key}


def write_images(folder, shards: list[list[dict]]):
    (folder / "train").mkdir(parents=True)
    for index, rows in enumerate(shards):
        pq.write_table(conform(rows, "images"), folder / "train" / f"part-{index:05d}.parquet")
    return folder


def photo(name: str) -> Image.Image:
    return Image.open(SAMPLE_IMAGES / f"{name}.jpg").convert("RGB")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Shard 0: the originals; shard 1: their variants (duplicates across shards) and the
    astronaut once more within shard 1; unrelated photos are in both."""
    originals = [image_row(f"{name}", (SAMPLE_IMAGES / f"{name}.jpg").read_bytes(), caption=f"A photo of {name}") for name in PHOTOS[:4]]
    variants = [image_row(f"{name}-{kind}", data, caption=f"a photo of  {name.upper()}") for name in PHOTOS[:4] for kind, data in planted_variants(photo(name)).items()]
    unrelated = [image_row(name, (SAMPLE_IMAGES / f"{name}.jpg").read_bytes()) for name in PHOTOS[4:]]
    folder = write_images(tmp_path_factory.mktemp("planted") / "images", [originals + unrelated[:2], unrelated[2:] + variants])
    return folder


def test_planted_duplicates_found_across_shards_and_unrelated_photos_kept(planted, tmp_path):
    out = tmp_path / "dedup"
    summary = run_stage(DedupStage(planted), out, make_config())
    kept = {row["key"] for row in read_rows(out)}
    assert kept == set(PHOTOS)  # every original (shard 0, smallest) kept, every unrelated photo kept
    rejects = {r["key"]: r for r in read_rejects(out).to_pylist()}
    assert set(rejects) == {f"{name}-{kind}" for name in PHOTOS[:4] for kind in ("q50", "q80", "half", "shift", "png")}
    assert {r["reason"] for r in rejects.values()} == {"duplicate"}
    assert "'astronaut' in part-00000.parquet" in rejects["astronaut-q80"]["detail"]
    assert rejects["astronaut-png"]["detail"].startswith("the same pixels as 'astronaut'")
    assert "pHash distance" in rejects["brick-q50"]["detail"]
    assert summary.rows_rejected == 20
    counters = read_json(out / "_manifest.json")["counters"]
    assert counters["exact_duplicates"] == 4 and counters["near_duplicates"] == 16
    # "a photo of  ASTRONAUT" repeats "A photo of astronaut" once case and spacing are set aside
    assert counters["caption_exact_repeats"] == 5 * 4
    assert_dataset_invariants(out, expected_keys=kept | set(rejects))


def test_kept_image_is_the_smallest_shard_and_key(tmp_path):
    data = (SAMPLE_IMAGES / "horse.jpg").read_bytes()
    folder = write_images(tmp_path / "images", [[image_row("z", data), image_row("m", data)], [image_row("a", data)]])
    run_stage(DedupStage(folder), tmp_path / "out", make_config())
    assert [row["key"] for row in read_rows(tmp_path / "out")] == ["m"]  # shard 0 before shard 1, then key order
    assert {r["key"]: r["detail"] for r in read_rejects(tmp_path / "out").to_pylist()} == {
        "z": "the same pixels as 'm' in part-00000.parquet, which is kept",
        "a": "the same pixels as 'm' in part-00000.parquet, which is kept",
    }


@pytest.mark.parametrize("bands,max_distance", [(5, 4), (8, 7), (3, 2), (1, 0)])
def test_banded_grouping_finds_exactly_the_pairs_all_pairs_comparison_finds(bands, max_distance):
    """Hashes planted at distances 0..max_distance+2 of each other among random ones: the groups
    match a brute-force comparison of every pair."""
    rng = np.random.default_rng(bands)
    hashes = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    for index in range(0, 200, 2):
        flips = rng.choice(64, size=index % (max_distance + 3), replace=False)
        hashes[index + 1] = hashes[index] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    idents = np.array([ident(i % 3, i) for i in range(len(hashes))], np.int64)
    found = find_duplicates(idents, hashes, bands, max_distance)
    close = [(int(a), int(b)) for (a, ha), (b, hb) in itertools.combinations(zip(idents, hashes.tolist()), 2) if (ha ^ hb).bit_count() <= max_distance]
    assert close  # planted pairs within reach, and others (index % (max_distance + 3)) beyond it
    of = dict(zip(idents.tolist(), hashes.tolist()))
    assert found == {max(a, b): (min(a, b), (of[a] ^ of[b]).bit_count()) for a, b in close}


def test_rerun_resumes_and_a_changed_input_is_refused(planted, tmp_path):
    out = tmp_path / "dedup"
    run_stage(DedupStage(planted), out, make_config())
    again = run_stage(DedupStage(planted), out, make_config())
    assert again.shards_run == 0 and again.shards_skipped == 2
    (out / "_done" / "part-00001.parquet.done").unlink()  # as if killed before shard 1 was done
    resumed = run_stage(DedupStage(planted), out, make_config())
    assert resumed.shards_run == 1 and resumed.rows_rejected == 20
    with pytest.raises(FgdataError, match="other settings"):
        run_stage(DedupStage(planted), out, make_config("dedup.max_distance=0", "dedup.bands=1"))


def test_a_new_shard_that_changes_an_unchanged_shards_decisions_is_refused(planted, tmp_path):
    """The decisions are part of each shard's fingerprint: a copy of coffee (kept in shard 1) added in
    a shard listed first makes shard 1's coffee a duplicate, though shard 1's file did not change."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(planted, images)
    out = tmp_path / "dedup"
    run_stage(DedupStage(images), out, make_config())
    write_images(tmp_path / "extra", [[image_row("copy", (SAMPLE_IMAGES / "coffee.jpg").read_bytes())]])
    shutil.copy(tmp_path / "extra" / "train" / "part-00000.parquet", images / "train" / "part-00000-a.parquet")  # sorts first
    with pytest.raises(FgdataError, match="made from a different input"):
        run_stage(DedupStage(images), out, make_config())


# --- pass 1 kept in OUT/_dedup_hashes: a rerun decodes no image it decoded before ---------------


@pytest.fixture
def decodes(monkeypatch):
    """The images pass 1 decodes (calls of image_hashes), hashing in this process even when an
    earlier test left Ray running."""
    import ray

    from pipeline.stages.fggrn import dedup

    calls: list[int] = []
    real = dedup.image_hashes
    monkeypatch.setattr(dedup, "image_hashes", lambda data: calls.append(1) or real(data))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return calls


def outcome(out) -> tuple:
    return read_rows(out), read_rejects(out).to_pylist(), read_json(out / "_manifest.json")["counters"]


PLANTED_IMAGES = 6 + 22  # the distinct keys of the planted shards


def test_a_rerun_after_a_kill_decodes_no_image_and_decides_the_same(planted, tmp_path, decodes):
    out = tmp_path / "dedup"
    run_stage(DedupStage(planted), out, make_config())
    assert len(decodes) == PLANTED_IMAGES
    assert sorted(p.name for p in (out / "_dedup_hashes").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    first = outcome(out)
    for done in ("_done/part-00001.parquet.done", "train/part-00001.parquet", "_manifest.json"):  # killed in pass 3
        (out / done).unlink()
    decodes.clear()
    resumed = run_stage(DedupStage(planted), out, make_config())
    assert len(decodes) == 0 and (resumed.shards_run, resumed.shards_skipped) == (1, 1)
    assert outcome(out) == first
    assert_dataset_invariants(out)
    # the decisions from the kept hashes are those of a plan that hashes every image (no OUT)
    kept = DedupStage(planted)
    kept.output_dir = out
    assert [u.payload for u in kept.plan(make_config())] == [u.payload for u in DedupStage(planted).plan(make_config())]
    # nothing of it is data: `datasets` and `fgdata info` see the rows of train/ only
    import datasets

    from pipeline.datasets.info import describe_dataset

    loaded = datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / ".hf-cache"))
    assert list(loaded) == ["train"] and sorted(loaded["train"]["key"]) == sorted(r["key"] for r in first[0])
    assert "_dedup_hashes" not in describe_dataset(out)


def test_a_changed_input_shard_alone_is_hashed_again_and_decided_by_its_new_content(planted, tmp_path, decodes):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(planted, images)
    out = tmp_path / "dedup"
    run_stage(DedupStage(images), out, make_config())
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "_dedup_hashes").iterdir()}
    # killed before shard 1 was done; then shard 1 rewritten: its rocket is now the astronaut's photo
    (out / "_done" / "part-00001.parquet.done").unlink()
    shard = images / "train" / "part-00001.parquet"
    rows = pq.read_table(shard).to_pylist()
    astronaut = (SAMPLE_IMAGES / "astronaut.jpg").read_bytes()
    pq.write_table(conform([{**r, "image": astronaut} if r["key"] == "rocket" else r for r in rows], "images"), shard)
    decodes.clear()
    run_stage(DedupStage(images), out, make_config())
    assert len(decodes) == len(rows)  # shard 1's images, none of shard 0's
    assert (out / "_dedup_hashes" / "part-00000.parquet").stat().st_mtime_ns == kept["part-00000.parquet"]
    assert (out / "_dedup_hashes" / "part-00001.parquet").stat().st_mtime_ns != kept["part-00001.parquet"]
    rejects = {r["key"]: r["detail"] for r in read_rejects(out).to_pylist()}
    assert rejects["rocket"] == "the same pixels as 'astronaut' in part-00000.parquet, which is kept"
    run_stage(DedupStage(images), tmp_path / "fresh", make_config())  # the same input, nothing kept
    assert outcome(out) == outcome(tmp_path / "fresh")


@pytest.mark.parametrize("damage", ["truncated", "not_parquet", "another_shards", "empty_file", "null_hash"])
def test_a_damaged_or_foreign_kept_result_is_hashed_again_not_a_traceback(planted, tmp_path, decodes, damage):
    out = tmp_path / "dedup"
    run_stage(DedupStage(planted), out, make_config())
    first = outcome(out)
    entry = out / "_dedup_hashes" / "part-00001.parquet"
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "not_parquet":
        entry.write_text("not parquet")
    elif damage == "another_shards":  # a valid result, made from shard 0
        entry.write_bytes((out / "_dedup_hashes" / "part-00000.parquet").read_bytes())
    elif damage == "empty_file":
        entry.write_bytes(b"")
    else:  # readable, made from this shard, but a hash missing
        table = pq.read_table(entry)
        pq.write_table(table.set_column(2, "phash", pa.array([None] * table.num_rows, pa.uint64())), entry)
    decodes.clear()
    again = run_stage(DedupStage(planted), out, make_config())
    assert len(decodes) == PLANTED_IMAGES - 6 and again.shards_skipped == 2  # shard 1's images alone
    assert outcome(out) == first
    decodes.clear()
    run_stage(DedupStage(planted), out, make_config())
    assert len(decodes) == 0  # the entry was written again, whole


def test_overwrite_deletes_the_kept_hashes_and_refuses_a_user_file_among_them(planted, tmp_path, decodes):
    from pipeline.core.shards import claim_output

    out = tmp_path / "dedup"
    run_stage(DedupStage(planted), out, make_config())
    (out / "_dedup_hashes" / ".part-00000.parquet.tmp-1234abcd").write_bytes(b"a killed task's temporary file")
    decodes.clear()
    run_stage(DedupStage(planted), out, make_config(), overwrite=True)
    assert len(decodes) == PLANTED_IMAGES  # --overwrite redoes pass 1 too
    assert sorted(p.name for p in (out / "_dedup_hashes").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    claim_output(out, "dedup", "other settings", overwrite=True)
    assert not (out / "_dedup_hashes").exists()
    run_stage(DedupStage(planted), out, make_config(), overwrite=True)
    for foreign in ("_dedup_hashes/notes.txt", "_dedup_hashes/part-00000 copy.parquet", "_dedup_hashes/mine/part-00000.parquet"):
        (out / foreign).parent.mkdir(parents=True, exist_ok=True)
        (out / foreign).write_text("mine")
        with pytest.raises(FgdataError, match=f"holds files fgdata did not write \\({foreign}\\)"):
            claim_output(out, "dedup", "other settings", overwrite=True)
        (out / foreign).unlink()
    assert (out / "_dedup_hashes" / "part-00000.parquet").exists()


def test_kept_hashes_on_s3_are_read_back_by_a_rerun(planted, bucket, tmp_path, decodes):
    from object_store import all_objects, put_object

    from pipeline.core import storage

    for shard in sorted((planted / "train").glob("*.parquet")):
        put_object(f"{bucket}/images/train/{shard.name}", shard.read_bytes())
    out = f"{bucket}/dedup"
    run_stage(DedupStage(f"{bucket}/images"), out, make_config())
    assert len(decodes) == PLANTED_IMAGES
    assert [key.rsplit("/", 1)[1] for key in all_objects(f"{out}/_dedup_hashes")] == ["part-00000.parquet", "part-00001.parquet"]
    storage.location(f"{out}/_done/part-00001.parquet.done").unlink()
    decodes.clear()
    again = run_stage(DedupStage(f"{bucket}/images"), out, make_config())
    assert len(decodes) == 0 and again.shards_run == 1
    run_stage(DedupStage(planted), tmp_path / "local", make_config())
    decided = [[(r["key"], r["reason"], r["detail"]) for r in read_rejects(where).to_pylist()] for where in (out, tmp_path / "local")]
    assert decided[0] == decided[1] and len(decided[0]) == 20


def test_undecodable_images_missing_and_repeated_keys_are_rejects(tmp_path):
    good = (SAMPLE_IMAGES / "coins.jpg").read_bytes()
    rows = [image_row("ok", good), {**image_row("ok", good)}, {**image_row("bad", good), "image": b"not an image"},
            {**image_row("cut", good), "image": good[: len(good) // 3]}]
    folder = write_images(tmp_path / "images", [rows])
    table = pq.read_table(folder / "train" / "part-00000.parquet")
    pq.write_table(table.set_column(0, "key", pa.array(["ok", "ok", "bad", None])), folder / "train" / "part-00000.parquet")
    run_stage(DedupStage(folder), tmp_path / "out", make_config())
    assert [row["key"] for row in read_rows(tmp_path / "out")] == ["ok"]
    assert sorted((r["key"], r["reason"]) for r in read_rejects(tmp_path / "out").to_pylist()) == [
        ("<row 3>", "missing_key"), ("bad", "not_an_image"), ("ok", "duplicate_key"),
    ]


def test_dedup_on_ray_gives_the_local_result(planted, tmp_path, ray_session):
    run_stage(DedupStage(planted), tmp_path / "local", make_config())
    import ray

    from pipeline.runner import ensure_ray

    ensure_ray(make_config().run)
    assert ray.is_initialized()
    run_stage(DedupStage(planted), tmp_path / "ray", make_config("run.executor=ray", "dedup.partitions=3"))
    assert read_rows(tmp_path / "ray") == read_rows(tmp_path / "local")
    assert read_rejects(tmp_path / "ray").to_pylist() == read_rejects(tmp_path / "local").to_pylist()
    # the tasks kept pass 1 as the local run did, and a rerun on Ray reads it (writes nothing again)
    entries = sorted((tmp_path / "ray" / "_dedup_hashes").iterdir())
    assert [pq.read_table(p) for p in entries] == [pq.read_table(tmp_path / "local" / "_dedup_hashes" / p.name) for p in entries]
    written = [p.stat().st_mtime_ns for p in entries]
    (tmp_path / "ray" / "_done" / "part-00000.parquet.done").unlink()
    again = run_stage(DedupStage(planted), tmp_path / "ray", make_config("run.executor=ray", "dedup.partitions=3"))
    assert again.shards_run == 1 and [p.stat().st_mtime_ns for p in entries] == written
    assert read_rows(tmp_path / "ray") == read_rows(tmp_path / "local")


def test_an_unreadable_shard_on_ray_is_one_line_error(planted, tmp_path, ray_session):
    import shutil

    from pipeline.runner import ensure_ray

    images = tmp_path / "images"
    shutil.copytree(planted, images)
    shard = images / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 4 : len(data) // 2] = b"\x55" * (len(data) // 2 - len(data) // 4)  # pages damaged, footer intact
    shard.write_bytes(bytes(data))
    ensure_ray(make_config().run)
    with pytest.raises(FgdataError) as raised:
        run_stage(DedupStage(images), tmp_path / "out", make_config("run.executor=ray", "run.max_retries=0"))
    assert type(raised.value) is FgdataError  # not Ray's wrapper, whose text is a remote traceback
    assert str(raised.value).startswith(f"{shard}: cannot read shard") and "\n" not in str(raised.value)


def test_cli_refuses_a_folder_without_images_and_bad_settings(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("dedup", str(tmp_path / "empty"), str(tmp_path / "out"), "--executor", "local")
    assert result.returncode == 2 and "no part-*.parquet shards" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("dedup", str(tmp_path / "empty"), str(tmp_path / "out"), "--set", "dedup.max_distance=5")
    assert result.returncode == 2 and "dedup.max_distance=5 must be less than dedup.bands=5" in result.stderr


@pytest.mark.slow
def test_dedup_on_a_multi_node_cluster_gives_the_local_result(planted, tmp_path, cluster):
    """Hashing, the band shuffle and the shards on a head node without CPUs and two worker nodes
    (tests/test_cluster.py's cluster), joined through RAY_ADDRESS as a user's job would be."""
    import os
    import subprocess

    from conftest import FGDATA

    ray_cluster, _ = cluster
    run_stage(DedupStage(planted), tmp_path / "local", make_config())
    command = [str(FGDATA), "dedup", str(planted), str(tmp_path / "cluster"), "-s", "run.progress=false", "-s", "dedup.partitions=4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
    assert done.returncode == 0, done.stderr
    assert read_json(tmp_path / "cluster" / "_manifest.json")["executor"] == "ray"
    assert sorted(p.name for p in (tmp_path / "cluster" / "_dedup_hashes").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]  # by the workers
    assert read_rows(tmp_path / "cluster") == read_rows(tmp_path / "local")
    assert read_rejects(tmp_path / "cluster").to_pylist() == read_rejects(tmp_path / "local").to_pylist()
