import io
import json
import tarfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLE_IMAGES, assert_dataset_invariants, image_bytes, make_config, read_rows
from pipeline.errors import FgdataError
from pipeline.runner import run_stage
from pipeline.shards import read_json, read_rejects
from pipeline.stages.ingest import IngestStage
from test_images import png_with_header_size

pytestmark = pytest.mark.usefixtures("ray_session")


def rejects_by_key(dataset):
    return {r["key"]: r["reason"] for r in read_rejects(dataset).to_pylist()}


def test_sample_folder_ingests_every_real_photo_and_rejects_the_broken_ones(tmp_path):
    out = tmp_path / "images"
    summary = run_stage(IngestStage(SAMPLE_IMAGES), out, make_config("ingest.rows_per_shard=8"))
    photos = {p.stem for p in SAMPLE_IMAGES.glob("*.jpg")}
    assert_dataset_invariants(out, expected_keys=photos)
    assert (summary.shards_total, summary.rows_in, summary.rows_rejected) == (3, 19, 2)
    assert rejects_by_key(out) == {"broken_truncated": "decode_error", "broken_not_an_image": "not_an_image"}
    rows = {r["key"]: r for r in read_rows(out)}
    assert rows["astronaut"]["image"] == (SAMPLE_IMAGES / "astronaut.jpg").read_bytes()  # bytes kept as is
    assert (rows["coffee"]["width"], rows["coffee"]["height"], rows["coffee"]["format"]) == (512, 341, "JPEG")
    assert rows["coffee"]["short_caption"].endswith("wooden table & a blurred background")  # &amp; decoded
    assert rows["chelsea"]["short_caption"].startswith("A tabby cat")  # from the .json sidecar
    manifest = read_json(out / "_manifest.json")
    assert manifest["stage"] == "ingest" and manifest["config"]["ingest"]["rows_per_shard"] == 8
    assert manifest["counters"]["rejected_decode_error"] == 1 and manifest["inputs"][0]["path"] == str(SAMPLE_IMAGES)


def test_bad_files_and_sidecars_in_a_folder_become_rejects(tmp_path):
    source = tmp_path / "photos"
    (source / "nested").mkdir(parents=True)
    (source / "good.jpg").write_bytes(image_bytes())
    (source / "good.txt").write_text("<p>A red\x00 square</p>\n")
    (source / "nested" / "good.png").write_bytes(image_bytes(fmt="PNG"))
    (source / "zero.jpg").write_bytes(b"")
    (source / "huge.png").write_bytes(png_with_header_size(20000, 20000))
    (source / "badjson.jpg").write_bytes(image_bytes())
    (source / "badjson.json").write_text("{not json")
    (source / "twin.jpg").write_bytes(image_bytes())
    (source / "twin.png").write_bytes(image_bytes(fmt="PNG"))
    (source / "nocaption.webp").write_bytes(image_bytes(fmt="WEBP"))
    out = tmp_path / "out"
    run_stage(IngestStage(source), out, make_config())
    assert_dataset_invariants(out, expected_keys={"good", "nested/good", "zero", "huge", "badjson", "twin", "nocaption"})
    assert rejects_by_key(out) == {
        "zero": "empty_file",
        "huge": "image_too_large",
        "badjson": "bad_caption_sidecar",
        "twin": "duplicate_key",
    }
    rows = {r["key"]: r for r in read_rows(out)}
    assert rows["good"]["short_caption"] == "A red square"
    assert rows["nocaption"]["short_caption"] is None and rows["nocaption"]["format"] == "WEBP"
    assert rows["twin"]["format"] == "JPEG"  # the first in sorted order keeps the key


def test_img2dataset_files_layout_with_failed_downloads(tmp_path):
    source = tmp_path / "i2d"
    (source / "00000").mkdir(parents=True)
    for key in ("000000000", "000000001"):
        (source / "00000" / f"{key}.jpg").write_bytes(image_bytes())
        (source / "00000" / f"{key}.txt").write_text(f"caption {key}")
        (source / "00000" / f"{key}.json").write_text(json.dumps({"key": key, "caption": f"caption {key}"}))
    pq.write_table(
        pa.table(
            {
                "key": ["000000000", "000000001", "000000002"],
                "caption": ["caption 000000000", "caption 000000001", "caption 000000002"],
                "status": ["success", "success", "failed_to_download"],
                "error_message": [None, None, "HTTP 404"],
            }
        ),
        source / "00000.parquet",
    )
    out = tmp_path / "out"
    run_stage(IngestStage(source), out, make_config())
    assert_dataset_invariants(out, expected_keys={"000000000", "000000001", "000000002"})
    assert read_rejects(out).to_pylist()[0] | {"source": None} == {
        "key": "000000002", "reason": "download_failed", "detail": "img2dataset could not download it: HTTP 404", "source": None,
    }
    assert [r["short_caption"] for r in read_rows(out)] == ["caption 000000000", "caption 000000001"]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
    source = tmp_path / "wds"
    source.mkdir()
    with tarfile.open(source / "00000.tar", "w") as tar:
        add_member(tar, "000000000.jpg", image_bytes())
        add_member(tar, "000000000.txt", b"a red square")
        add_member(tar, "000000001.png", image_bytes(fmt="PNG"))
        add_member(tar, "000000001.json", json.dumps({"caption": "a png square"}).encode())
        add_member(tar, "000000002.jpg", image_bytes((300, 300))[:500])
    with tarfile.open(source / "00001.tar", "w") as tar:
        add_member(tar, "000001000.jpg", image_bytes())
    out = tmp_path / "out"
    run_stage(IngestStage(source, "webdataset"), out, make_config("ingest.rows_per_shard=2"))
    assert_dataset_invariants(out, expected_keys={"000000000", "000000001", "000000002", "000001000"})
    assert rejects_by_key(out) == {"000000002": "decode_error"}
    rows = {r["key"]: r for r in read_rows(out)}
    assert rows["000000001"]["short_caption"] == "a png square" and rows["000000001"]["format"] == "PNG"
    assert rows["000001000"]["source"].endswith("00001.tar::000001000.jpg")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_of_paths_and_captions(tmp_path, suffix):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "img" / "b.png").write_bytes(image_bytes(fmt="PNG"))
    frame = {"image_path": ["img/a.jpg", "img/b.png", "img/missing.jpg", ""], "caption": ["first", "second", "third", "fourth"]}
    table_path = tmp_path / f"list{suffix}"
    if suffix == ".csv":
        pacsv.write_csv(pa.table(frame), table_path)
    else:
        pq.write_table(pa.table(frame), table_path)
    out = tmp_path / "out"
    run_stage(IngestStage(table_path), out, make_config())
    assert_dataset_invariants(out, expected_keys={"a", "b", "missing", "row-3"})
    assert rejects_by_key(out) == {"missing": "missing_file", "row-3": "missing_image_path"}
    assert {r["key"]: r["short_caption"] for r in read_rows(out)} == {"a": "first", "b": "second"}


def test_unusable_sources_stop_before_any_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FgdataError, match="does not exist"):
        run_stage(IngestStage(tmp_path / "nowhere"), out, make_config())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FgdataError, match="holds no images"):
        run_stage(IngestStage(tmp_path / "empty"), out, make_config())
    bad_table = tmp_path / "list.csv"
    bad_table.write_text("url,caption\nhttp://x/a.jpg,a\n")
    with pytest.raises(FgdataError, match="no image path column"):
        run_stage(IngestStage(bad_table), out, make_config())
    assert not out.exists()
