"""The input-reading commands on an object store (moto's S3 server): `fgdata import fgclip | grit |
hf`, `fgdata ingest` from img2dataset output and from tables, and `fgdata download`'s URL list. Each
input is read on s3 and from the same files on disk: the same rows, the same rejects."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, make_config, png_bytes
from object_store import bucket, put_object, s3_server  # noqa: F401 (fixtures)
from test_download import server  # noqa: F401 (the local HTTP server fixture)

from pipeline.core import storage
from pipeline.core.shards import (
    MANIFEST_FILE,
    list_shards,
    read_json,
    read_rejects,
    read_shard,
)
from pipeline.errors import FgdataError
from pipeline.runner import run_stage
from pipeline.stages.fggrn.download import DownloadStage
from pipeline.stages.fggrn.import_fgclip import FgclipImagesStage, ImportFgclipStage
from pipeline.stages.fggrn.import_grit import ImportGritStage
from pipeline.stages.fggrn.import_hf import ImportHfStage
from pipeline.stages.fggrn.ingest import IngestStage

# columns that name where a row came from: the s3 run names objects, the local run files
WHERE = ("source", "grounding", "negatives_settings", "caption_model")


class Rows(list):
    """Rows that compare by repr, so the NaN scores of imported negatives equal each other."""

    def __eq__(self, other):
        return repr(self) == repr(other)


def rows_and_rejects(dataset) -> tuple[list[dict], list[tuple]]:
    rows = Rows({k: v for k, v in r.items() if k not in WHERE} for shard in list_shards(dataset) for r in read_shard(shard).to_pylist())
    return rows, sorted((r["key"], r["reason"]) for r in read_rejects(dataset).to_pylist())


def upload(local, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            put_object(f"{uri}/{path.relative_to(local).as_posix()}", path.read_bytes())


def cli(*args: str):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, [*args, "-s", "run.progress=false", "-s", "run.executor=local"])


# --- import fgclip ------------------------------------------------------------------------------


def _fgclip_files(folder):
    """FG-CLIP JSON with good items, bad records and f_paths that lead nowhere or outside, and its images."""
    box = {"bbox": [0.1, 0.1, 0.5, 0.5], "short_expr": "a red cup", "long_expr": "a red cup", "flag_short_neg": 1, "short_expr_negs": {"0": "a blue cup", "1": "a green cup"}}
    items = [
        {"f_path": "pics/a.jpg", "caption": "A red cup on a table.", "short_caption": "cup", "bbox_info": [box]},
        {"f_path": "pics/sub/b.jpg", "caption": "A red cup in a sink.", "short_caption": "sink", "bbox_info": [box]},
        {"f_path": "pics/broken.jpg", "caption": "A red cup.", "bbox_info": [box]},
        {"f_path": "pics/missing.jpg", "caption": "A red cup.", "bbox_info": [box]},
        {"f_path": "../secret.jpg", "caption": "A red cup.", "bbox_info": []},
        {"f_path": "/etc/passwd", "caption": "A red cup.", "bbox_info": []},
        {"f_path": "pics/a-box.jpg", "caption": "x", "bbox_info": [{**box, "bbox": [0.5, 0.5, 0.1, 0.1]}]},
        {"caption": "no f_path"},
        [1, 2],
    ]
    (folder / "pics" / "sub").mkdir(parents=True)
    (folder / "pics" / "a.jpg").write_bytes(image_bytes((80, 60)))
    (folder / "pics" / "sub" / "b.jpg").write_bytes(image_bytes((40, 50)))
    (folder / "pics" / "a-box.jpg").write_bytes(image_bytes((40, 50)))
    (folder / "pics" / "broken.jpg").write_bytes(b"not an image")
    (folder / "items.json").write_text(json.dumps(items))
    return items


def test_import_fgclip_json_and_images_on_s3_equal_the_local_run(bucket, tmp_path):
    local = tmp_path / "src"
    _fgclip_files(local)
    upload(local, f"{bucket}/src")
    (tmp_path / "secret.jpg").write_bytes(image_bytes())  # outside the folder: never read
    put_object(f"{bucket}/secret.jpg", image_bytes())
    config = make_config("ingest.rows_per_shard=4")
    run_stage(FgclipImagesStage(local / "items.json", local), tmp_path / "images", config)
    run_stage(ImportFgclipStage(local / "items.json", tmp_path / "images"), tmp_path / "fggrn", config)
    run_stage(FgclipImagesStage(f"{bucket}/src/items.json", f"{bucket}/src"), f"{bucket}/images", config)
    run_stage(ImportFgclipStage(f"{bucket}/src/items.json", f"{bucket}/images"), f"{bucket}/fggrn", config)

    images, image_rejects = rows_and_rejects(tmp_path / "images")
    assert [(r["key"], r["width"]) for r in images] == [("pics/a.jpg", 80), ("pics/sub/b.jpg", 40), ("pics/a-box.jpg", 40)]
    assert dict(image_rejects) == {
        "pics/broken.jpg": "not_an_image", "pics/missing.jpg": "missing_file", "../secret.jpg": "unsafe_path",
        "/etc/passwd": "unsafe_path", "items-000000007": "missing_f_path", "items-000000008": "bad_record",
    }
    assert rows_and_rejects(f"{bucket}/images") == (images, image_rejects)
    fggrn, fggrn_rejects = rows_and_rejects(tmp_path / "fggrn")
    assert [(r["key"], r["width"], r["regions"][0]["head"]) for r in fggrn] == [("pics/a.jpg", 80, "cup"), ("pics/sub/b.jpg", 40, "cup")]
    assert dict(fggrn_rejects)["pics/a-box.jpg"] == "box_not_positive_size" and dict(fggrn_rejects)["pics/missing.jpg"] == "image_rejected"
    assert rows_and_rejects(f"{bucket}/fggrn") == (fggrn, fggrn_rejects)
    inputs = read_json(f"{bucket}/fggrn/{MANIFEST_FILE}")["inputs"]
    assert [i["path"] for i in inputs] == [f"{bucket}/src/items.json", f"{bucket}/images"]


def test_cli_import_fgclip_takes_uris_and_puts_the_image_shards_beside_out(bucket, tmp_path):
    local = tmp_path / "src"
    _fgclip_files(local)
    upload(local, f"{bucket}/src")
    result = cli("import", "fgclip", f"{bucket}/src/items.json", f"{bucket}/fggrn", "--images", f"{bucket}/src")
    assert result.exit_code == 0, result.output
    assert [r["key"] for r in rows_and_rejects(f"{bucket}/fggrn-images")[0]] == ["pics/a.jpg", "pics/sub/b.jpg", "pics/a-box.jpg"]
    assert [r["key"] for r in rows_and_rejects(f"{bucket}/fggrn")[0]] == ["pics/a.jpg", "pics/sub/b.jpg"]
    missing = cli("import", "fgclip", f"{bucket}/src/nothing.json", f"{bucket}/never")
    assert missing.exit_code == 2 and "nothing.json does not exist" in missing.output
    folder = cli("import", "fgclip", f"{bucket}/src/pics", f"{bucket}/never")  # a prefix is not a file
    assert folder.exit_code == 2 and "pics is not a file" in folder.output
    assert not storage.location(f"{bucket}/never").exists()


# --- import grit --------------------------------------------------------------------------------


def _grit_table() -> pa.Table:
    caption = "a dog on a red sofa"
    good = [[0, 5, 0.1, 0.2, 0.5, 0.9, 0.8], [9, 19, 0.0, 0.5, 1.0, 1.0, 0.7]]
    rows = [
        {"id": 1, "caption": caption, "width": 200, "height": 100, "ref_exps": good, "noun_chunks": good[:1]},
        {"id": 2, "caption": caption, "width": 200, "height": 100, "ref_exps": [[0, 50, 0.1, 0.1, 0.2, 0.2, 0.9]], "noun_chunks": []},
        {"id": 3, "caption": None, "width": 200, "height": 100, "ref_exps": [], "noun_chunks": []},
        {"id": 4, "caption": caption, "width": 300, "height": 300, "ref_exps": good[1:], "noun_chunks": []},
        {"id": 1, "caption": caption, "width": 200, "height": 100, "ref_exps": [], "noun_chunks": []},
    ]
    return pa.Table.from_pylist(rows)


def test_import_grit_parquet_on_s3_equals_the_local_file(bucket, tmp_path):
    pq.write_table(_grit_table(), tmp_path / "grit.parquet")
    put_object(f"{bucket}/grit.parquet", (tmp_path / "grit.parquet").read_bytes())
    config = make_config("ingest.rows_per_shard=2")
    run_stage(ImportGritStage(tmp_path / "grit.parquet"), tmp_path / "regions", config)
    result = cli("import", "grit", f"{bucket}/grit.parquet", f"{bucket}/regions", "-s", "ingest.rows_per_shard=2")
    assert result.exit_code == 0, result.output
    rows, rejects = rows_and_rejects(tmp_path / "regions")
    assert [(r["key"], [x["phrase"] for x in r["regions"]]) for r in rows] == [("1", ["a dog", "a red sofa"]), ("4", ["a red sofa"])]
    assert rejects == [("1", "duplicate_key"), ("2", "bad_span"), ("3", "missing_caption")]
    assert rows_and_rejects(f"{bucket}/regions") == (rows, rejects)
    assert read_json(f"{bucket}/regions/{MANIFEST_FILE}")["inputs"][0]["path"] == f"{bucket}/grit.parquet"


# --- import hf ----------------------------------------------------------------------------------


def test_import_hf_hub_parquet_layout_on_s3_equals_the_local_folder(bucket, tmp_path):
    """Two files of the train split (small row groups, so a shard reads only some), a test split
    left out, Image cells holding bytes or naming files: inside the folder, outside, missing."""
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "pic.png").write_bytes(png_bytes(20))
    cells = [{"bytes": png_bytes(), "path": None}, {"bytes": b"junk", "path": None}, {"bytes": None, "path": "pic.png"}, {"bytes": None, "path": "../secret.png"}]
    cells += [{"bytes": None, "path": "/etc/passwd"}, {"bytes": None, "path": "gone.png"}, {"bytes": png_bytes(2), "path": None}]
    first = pa.table({"image": cells[:4], "caption": ["a", "b", "c", "d"], "key": ["bytes", "junk", "named", "up"]})
    second = pa.table({"image": cells[4:], "caption": ["e", "f", "g"], "key": ["absolute", "gone", "tiny"]})
    pq.write_table(first, hub / "data" / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(second, hub / "data" / "train-00001-of-00002.parquet", row_group_size=2)
    pq.write_table(pa.table({"image": [{"bytes": png_bytes(), "path": None}], "caption": ["test"], "key": ["test-row"]}), hub / "data" / "test-00000-of-00001.parquet")
    upload(hub, f"{bucket}/hub")
    put_object(f"{bucket}/secret.png", png_bytes())
    config = make_config("ingest.rows_per_shard=3")
    run_stage(ImportHfStage(hub, "images"), tmp_path / "images", config)
    result = cli("import", "hf", f"{bucket}/hub", f"{bucket}/images", "-s", "ingest.rows_per_shard=3")
    assert result.exit_code == 0, result.output
    rows, rejects = rows_and_rejects(tmp_path / "images")
    assert [(r["key"], r["width"], r["short_caption"]) for r in rows] == [("bytes", 16, "a"), ("named", 20, "c")]
    assert rejects == [("absolute", "unsafe_path"), ("gone", "missing_file"), ("junk", "not_an_image"), ("tiny", "image_too_small"), ("up", "unsafe_path")]
    assert rows_and_rejects(f"{bucket}/images") == (rows, rejects)
    assert len(list_shards(f"{bucket}/images")) == 3
    # a prefix has no time of its own: a changed object in it still changes the input
    run_stage(ImportHfStage(f"{bucket}/hub", "images"), f"{bucket}/images", config)  # unchanged: resumes
    changed = io.BytesIO()
    pq.write_table(second.set_column(1, "caption", pa.array(["new", "new", "new"])), changed, row_group_size=2)  # same rows, new captions
    put_object(f"{bucket}/hub/data/train-00001-of-00002.parquet", changed.getvalue())
    with pytest.raises(FgdataError, match="made from a different input"):
        run_stage(ImportHfStage(f"{bucket}/hub", "images"), f"{bucket}/images", config)

    captions = cli("import", "hf", f"{bucket}/hub/data/test-00000-of-00001.parquet", f"{bucket}/captions", "--kind", "captions", "--split", "test")
    assert captions.exit_code == 0, captions.output
    assert [(r["key"], r["long_caption"]) for r in rows_and_rejects(f"{bucket}/captions")[0]] == [("test-row", "test")]


def test_import_hf_save_to_disk_folder_on_s3_equals_the_local_folder(bucket, tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"), "id": datasets.Value("string")})
    records = {"image": [{"bytes": png_bytes(), "path": None}, {"bytes": b"junk", "path": None}, {"bytes": png_bytes(24), "path": None}], "caption": ["x", "y", "z"], "id": ["a", "b", "c"]}
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(records, features=features)}).save_to_disk(str(saved))
    upload(saved, f"{bucket}/saved")
    config = make_config("ingest.rows_per_shard=2")
    run_stage(ImportHfStage(saved, "images"), tmp_path / "images", config)
    run_stage(ImportHfStage(f"{bucket}/saved", "images"), f"{bucket}/images", config)
    rows, rejects = rows_and_rejects(tmp_path / "images")
    assert [(r["key"], r["width"]) for r in rows] == [("a", 16), ("c", 24)] and rejects == [("b", "not_an_image")]
    assert rows_and_rejects(f"{bucket}/images") == (rows, rejects)


# --- ingest: img2dataset output and tables ------------------------------------------------------


def test_ingest_img2dataset_output_on_s3_equals_the_local_folder(bucket, tmp_path, monkeypatch):
    """img2dataset's files layout: downloaded images with sidecars, a failed download, a row marked
    success whose file is gone, a sidecar over the size cap (never fetched) and a prefix named like
    an image: each a row or a reject, as on disk."""
    from pipeline.core import sources

    local = tmp_path / "i2d"
    (local / "00000" / "000000004.jpg").mkdir(parents=True)  # a folder with an image's name
    (local / "00000" / "000000004.jpg" / "x.txt").write_text("inside")
    for key in ("000000000", "000000001", "000000005"):
        (local / "00000" / f"{key}.jpg").write_bytes(image_bytes())
        (local / "00000" / f"{key}.txt").write_text(f"caption {key}")
    (local / "00000" / "000000005.txt").write_text("x" * 100)  # over the cap set below
    keys = ["000000000", "000000001", "000000002", "000000003", "000000004", "000000005"]
    table = {"key": keys, "caption": [f"caption {k}" for k in keys], "status": ["success", "success", "failed_to_download", "success", "success", "success"]}
    pq.write_table(pa.table({**table, "error_message": [None, None, "HTTP 404", None, None, None]}), local / "00000.parquet")
    upload(local, f"{bucket}/i2d")
    monkeypatch.setattr(sources, "MAX_SIDECAR_BYTES", 64)
    fetched = []
    fs_type = type(storage.location(f"{bucket}/i2d").fs)
    real_cat = fs_type.cat_file
    monkeypatch.setattr(fs_type, "cat_file", lambda self, path, *a, **k: (fetched.append(path), real_cat(self, path, *a, **k))[1])
    config = make_config("ingest.rows_per_shard=2")
    run_stage(IngestStage(local), tmp_path / "images", config)
    run_stage(IngestStage(f"{bucket}/i2d"), f"{bucket}/images", config)
    rows, rejects = rows_and_rejects(tmp_path / "images")
    assert [(r["key"], r["short_caption"]) for r in rows] == [("000000000", "caption 000000000"), ("000000001", "caption 000000001")]
    assert rejects == [("000000002", "download_failed"), ("000000003", "missing_file"), ("000000004", "not_a_file"), ("000000005", "bad_caption_sidecar")]
    assert rows_and_rejects(f"{bucket}/images") == (rows, rejects)
    assert not [p for p in fetched if p.endswith("000000005.txt")]  # over the cap: never fetched
    assert read_json(f"{bucket}/images/{MANIFEST_FILE}")["inputs"] == [{"path": f"{bucket}/i2d", "format": "img2dataset"}]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_ingest_table_on_s3_equals_the_local_table(bucket, tmp_path, suffix):
    """A table of image paths relative to it (one missing, one a folder, one blank) read on s3 as on
    disk; on s3 a local path in it and `..` above the bucket are refused, a URI is read."""
    local = tmp_path / "t"
    (local / "img" / "dir.jpg").mkdir(parents=True)
    (local / "img" / "dir.jpg" / "x").write_bytes(b"x")
    (local / "img" / "a.jpg").write_bytes(image_bytes())
    (local / "img" / "b.png").write_bytes(image_bytes(fmt="PNG"))
    (local / "img" / "junk.jpg").write_bytes(b"not an image")
    frame = {"image_path": ["img/a.jpg", "./img/b.png", "img/missing.jpg", "img/dir.jpg", "img/junk.jpg", ""], "caption": ["a", "b", "c", "d", "e", "f"]}
    (pq.write_table if suffix == ".parquet" else lambda t, p: t.to_pandas().to_csv(p, index=False))(pa.table(frame), local / f"list{suffix}")
    upload(local, f"{bucket}/t")
    config = make_config("ingest.rows_per_shard=4")
    run_stage(IngestStage(local / f"list{suffix}"), tmp_path / "images", config)
    run_stage(IngestStage(f"{bucket}/t/list{suffix}"), f"{bucket}/images", config)
    rows, rejects = rows_and_rejects(tmp_path / "images")
    assert [(r["key"], r["short_caption"]) for r in rows] == [("a", "a"), ("b", "b")]
    assert rejects == [("dir", "not_a_file"), ("junk", "not_an_image"), ("missing", "missing_file"), ("row-5", "missing_image_path")]
    assert rows_and_rejects(f"{bucket}/images") == (rows, rejects)
    assert {r["source"] for r in read_shard(list_shards(f"{bucket}/images")[0]).to_pylist()} == {f"{bucket}/t/img/a.jpg", f"{bucket}/t/img/b.png"}

    put_object(f"{bucket}/elsewhere/c.jpg", image_bytes())
    (tmp_path / "secret.jpg").write_bytes(image_bytes())
    hostile = pa.table({"image_path": [f"{bucket}/elsewhere/c.jpg", str(tmp_path / "secret.jpg"), "../../../x.jpg"], "caption": ["by uri", "local", "up"]})
    (pq.write_table if suffix == ".parquet" else lambda t, p: t.to_pandas().to_csv(p, index=False))(hostile, tmp_path / f"hostile{suffix}")
    put_object(f"{bucket}/t/hostile{suffix}", (tmp_path / f"hostile{suffix}").read_bytes())
    run_stage(IngestStage(f"{bucket}/t/hostile{suffix}"), f"{bucket}/hostile", config)
    assert [(r["key"], r["short_caption"]) for r in rows_and_rejects(f"{bucket}/hostile")[0]] == [("c", "by uri")]
    assert rows_and_rejects(f"{bucket}/hostile")[1] == [("row-1", "unsafe_path"), ("row-2", "unsafe_path")]


# --- download -----------------------------------------------------------------------------------


def test_download_url_list_and_out_on_s3_and_a_rerun_requests_only_the_failures(bucket, tmp_path, server):
    """The URL list of test_download on s3, OUT on s3 (its attempts are staged there): the
    rows and rejects of the local run; a rerun through the CLI requests only the failed URLs again."""
    from collections import Counter

    from test_download import _url_list

    base, requests = server
    urls, expected = _url_list(tmp_path, base)
    put_object(f"{bucket}/lists/urls.parquet", urls.read_bytes())
    settings = ("download.timeout=0.5", "download.threads=8", "ingest.rows_per_shard=5", "download.allow_private_addresses=true")
    run_stage(DownloadStage(urls, tmp_path / "images"), tmp_path / "images", make_config(*settings))
    local_rows, local_rejects = rows_and_rejects(tmp_path / "images")
    assert dict(local_rejects) == {k: why for k, why in expected.items() if why}
    result = cli("download", f"{bucket}/lists/urls.parquet", f"{bucket}/images", *[a for s in settings for a in ("-s", s)])
    assert result.exit_code == 0, result.output
    rows, rejects = rows_and_rejects(f"{bucket}/images")
    # the test server fails /flaky.jpg only the first time it is asked: the local run asked first
    assert [r for r in rejects if r[0] != "flaky"] == [r for r in local_rejects if r[0] != "flaky"] and ("flaky", "http_503") in local_rejects
    assert [r for r in rows if r["key"] != "flaky"] == local_rows and "flaky" in {r["key"] for r in rows}
    staged = storage.location(f"{bucket}/images/_download/part-00000/attempt-0")
    assert (staged / "_complete").is_file() and (staged / "00000.parquet").is_file()
    assert read_json(f"{bucket}/images/{MANIFEST_FILE}")["inputs"] == [{"path": f"{bucket}/lists/urls.parquet", "format": "url-list"}]

    before = Counter(requests)
    again = cli("download", f"{bucket}/lists/urls.parquet", f"{bucket}/images", *[a for s in settings for a in ("-s", s)])
    assert again.exit_code == 0 and "retrying the failed downloads of" in again.output, again.output
    assert {path for path in requests if requests[path] > before[path]} == {"/missing.jpg", "/slow.jpg", "/cut-short.jpg"}
    assert rows_and_rejects(f"{bucket}/images") == (rows, rejects)


def test_a_partial_download_attempt_on_a_store_does_not_count(bucket):
    """Without its `_complete` object (a worker killed mid-download) an attempt's files are ignored
    and the next attempt gets a new number."""
    from pipeline.stages.fggrn.download import _attempts, _staged_results

    staging = f"{bucket}/images/_download/part-00000"
    table = pa.table({"fgdata_key": ["a"], "key": ["000000000"], "status": ["success"], "error_message": [None]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    put_object(f"{staging}/attempt-0/00000.parquet", buffer.getvalue())
    put_object(f"{staging}/attempt-0/00000/000000000.img", image_bytes())
    assert _staged_results(storage.location(staging)) == {}
    assert [p.name for p in _attempts(storage.location(staging))] == ["attempt-0"]
    put_object(f"{staging}/attempt-0/_complete", b"")
    assert _staged_results(storage.location(staging))["a"]["problem"] is None
