"""`fgdata import fgclip`: one rule for f_path on disk and on an object store (issue 26).

An f_path is normalised lexically (posix): `./a.jpg`, `sub/../a.jpg`, `.//a.jpg` and `a.jpg/` are the
image `a.jpg`, keyed once (a second item naming it is a `duplicate_key` reject: FineHARD has one item
per image); an absolute f_path or one that climbs out of the image folder is an `unsafe_path` reject,
before any file is looked at. The same JSON gives the same rows and rejects from a folder and from
the same files on moto's S3 server."""

from __future__ import annotations

import json
import posixpath

from conftest import image_bytes, make_config, read_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from object_store import bucket, put_object, s3_server  # noqa: F401 (fixtures)
from test_imports_on_s3 import rows_and_rejects

from pipeline.core.shards import read_rejects
from pipeline.runner import run_stage
from pipeline.stages.fggrn.import_fgclip import FgclipImagesStage, ImportFgclipStage, f_path_key

CONFIG = ("ingest.rows_per_shard=20",)
SAME_IMAGE = ["ok.jpg", "./ok.jpg", "sub/../ok.jpg", ".//ok.jpg", "ok.jpg/", "sub/./../ok.jpg"]
REFUSED = ["../ok.jpg", "sub/../../ok.jpg", "/ok.jpg", "//ok.jpg", ".", "./", "sub/..", "s3://other-bucket/ok.jpg"]


def _items(absolute: str) -> list[dict]:
    box = {"bbox": [0.1, 0.1, 0.5, 0.5], "short_expr": "a red cup", "long_expr": "a red cup on a table", "flag_short_neg": 0, "short_expr_negs": {}}
    paths = [*SAME_IMAGE, *REFUSED, absolute, "pics/b.jpg", "pics//b.jpg"]
    return [{"f_path": p, "caption": f"A red cup, item {i}.", "short_caption": "cup", "bbox_info": [box]} for i, p in enumerate(paths)]


def _write(folder, absolute: str) -> None:
    (folder / "pics").mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(image_bytes((40, 30)))
    (folder / "pics" / "b.jpg").write_bytes(image_bytes((30, 40)))
    (folder / "items.json").write_text(json.dumps(_items(absolute)))


def _reasons(dataset) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in read_rejects(dataset).to_pylist()}


def test_one_image_one_key_and_the_same_refusals_on_disk_and_on_s3(bucket, tmp_path):
    local = tmp_path / "src"
    absolute = str(local / "ok.jpg")  # inside the folder, yet absolute: refused on disk as on a store
    _write(local, absolute)
    for path in ("ok.jpg", "pics/b.jpg", "items.json"):
        put_object(f"{bucket}/src/{path}", (local / path).read_bytes())
    put_object(f"{bucket}/ok.jpg", image_bytes())  # what `../ok.jpg` would reach on the store
    (tmp_path / "ok.jpg").write_bytes(image_bytes())  # and on disk
    config = make_config(*CONFIG)
    run_stage(FgclipImagesStage(local / "items.json", local), tmp_path / "images", config)
    run_stage(ImportFgclipStage(local / "items.json", tmp_path / "images"), tmp_path / "fggrn", config)
    run_stage(FgclipImagesStage(f"{bucket}/src/items.json", f"{bucket}/src"), f"{bucket}/images", config)
    run_stage(ImportFgclipStage(f"{bucket}/src/items.json", f"{bucket}/images"), f"{bucket}/fggrn", config)

    expected = {p: "duplicate_key" for p in SAME_IMAGE[1:]} | {p: "unsafe_path" for p in [*REFUSED, absolute]} | {"pics//b.jpg": "duplicate_key"}
    for dataset in ("images", "fggrn"):
        assert [r["key"] for r in read_rows(tmp_path / dataset)] == ["ok.jpg", "pics/b.jpg"], dataset
        assert _reasons(tmp_path / dataset) == expected, dataset
        assert rows_and_rejects(f"{bucket}/{dataset}") == rows_and_rejects(tmp_path / dataset), dataset
    details = {r["key"]: r["detail"] for r in read_rejects(tmp_path / "fggrn").to_pylist()}
    assert "item 0" in details["sub/../ok.jpg"] and "'ok.jpg'" in details["sub/../ok.jpg"]
    # the first item naming the image is the one kept
    assert read_rows(tmp_path / "fggrn")[0]["long_caption"] == "A red cup, item 0."


def test_without_images_the_keys_and_refusals_are_the_same(tmp_path):
    _write(tmp_path / "src", "/abs/ok.jpg")
    run_stage(ImportFgclipStage(tmp_path / "src" / "items.json"), tmp_path / "fggrn", make_config(*CONFIG))
    assert [r["key"] for r in read_rows(tmp_path / "fggrn")] == ["ok.jpg", "pics/b.jpg"]
    assert _reasons(tmp_path / "fggrn")["../ok.jpg"] == "unsafe_path" and _reasons(tmp_path / "fggrn")["/abs/ok.jpg"] == "unsafe_path"


names = st.lists(st.sampled_from(["a", "b", ".", "/", "..", "\\", " ", "é", "s3:", "//"]), max_size=10).map("".join)


@settings(max_examples=400, deadline=None)
@given(names)
def test_f_path_key_is_relative_inside_and_stable(f_path):
    key, problem = f_path_key(f_path)
    if problem is not None:
        assert key is None and problem[0] == "unsafe_path" and problem[1]
        return
    parts = key.split("/")
    assert not key.startswith("/") and ".." not in parts and "." not in parts and "" not in parts
    assert key == posixpath.normpath(f_path) and f_path_key(key) == (key, None)  # normalised once, for good
    # any spelling of the same path gives the same key
    assert f_path_key(f"./{f_path}") == (key, None) and f_path_key(f"{key}/") == (key, None)
