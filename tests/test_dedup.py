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
    assert read_rows(tmp_path / "cluster") == read_rows(tmp_path / "local")
    assert read_rejects(tmp_path / "cluster").to_pylist() == read_rejects(tmp_path / "local").to_pylist()
