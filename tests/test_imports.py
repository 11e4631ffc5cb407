"""`fgdata import fgclip | grit | hf`: round trips, every bad record a reject with its reason, and
every output readable by `datasets.load_dataset("parquet", ...)`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_dataset_invariants, image_bytes, make_config, png_bytes, read_rows
from test_hf_load import load_like_the_readme

from pipeline.core.shards import find_ancestor, read_rejects
from pipeline.datasets.fgclip_export import export_fgclip, image_file_name
from pipeline.datasets.synthetic_world import write_world
from pipeline.errors import FgdataError
from pipeline.runner import run_stage
from pipeline.stages.fggrn.import_fgclip import FgclipImagesStage, ImportFgclipStage
from pipeline.stages.fggrn.import_grit import ImportGritStage
from pipeline.stages.fggrn.import_hf import ImportHfStage

CONFIG = ("ingest.rows_per_shard=4",)


def _reasons(dataset: Path) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in read_rejects(dataset).to_pylist()}


def _load_with_datasets(dataset: Path):
    return load_like_the_readme(dataset, dataset.parent / ".hf-cache", split="train")


def test_fgclip_round_trip_keeps_boxes_phrases_and_negatives(tmp_path, ray_session):
    world = write_world(tmp_path / "world", 10, seed=3)
    export = tmp_path / "export"
    summary = export_fgclip(world["fggrn"], export, world["images"], negatives_needed=2, progress=False)
    assert summary["items"] > 0

    images, fggrn = tmp_path / "imported-images", tmp_path / "imported-fggrn"
    run_stage(FgclipImagesStage(export / "fgclip.json", export), images, make_config(*CONFIG))
    run_stage(ImportFgclipStage(export / "fgclip.json", images), fggrn, make_config(*CONFIG))
    items = json.loads((export / "fgclip.json").read_text())
    assert_dataset_invariants(images, {i["f_path"] for i in items})
    assert_dataset_invariants(fggrn, {i["f_path"] for i in items})
    assert find_ancestor(fggrn, "images") == images  # export and train find the images by lineage

    originals = {r["key"]: r for r in read_rows(world["fggrn"])}
    imported = {r["key"]: r for r in read_rows(fggrn)}
    # the export renames images: the original key is recovered through the name it gave
    by_name = {f"images/{image_file_name(k, 'PNG')}": r for k, r in originals.items()}
    compared = 0
    for key, row in imported.items():
        original = by_name[key]
        assert (row["width"], row["height"]) == (original["width"], original["height"])
        assert row["long_caption"] == original["long_caption"] and row["short_caption"] == original["short_caption"]
        wanted = {r["phrase"].lower(): r for r in original["regions"]}  # export lowercases region texts
        for region in row["regions"]:
            source = wanted[region["phrase"]]
            assert region["box_norm"] == pytest.approx(source["box_norm"], abs=1e-5)
            assert region["box"] == pytest.approx(source["box"], abs=1e-3)
            assert [n["text"] for n in region["negatives"]] == [n["text"].lower() for n in source["negatives"][:2]]
            assert region["head"] == source["head"] and region["negatives_flag"] == "ok"
            assert row["long_caption"][region["start"] : region["end"]].lower() == region["phrase"]
            compared += 1
    assert compared >= len(imported)

    # and back out again: the same JSON items (f_path names differ only by the second renaming)
    again = tmp_path / "export-again"
    export_fgclip(fggrn, again, negatives_needed=2, progress=False)
    first = {i["short_caption"]: [(b["short_expr"], b["bbox"], b["short_expr_negs"]) for b in i["bbox_info"]] for i in items}
    second = {i["short_caption"]: [(b["short_expr"], b["bbox"], b["short_expr_negs"]) for b in i["bbox_info"]] for i in json.loads((again / "fgclip.json").read_text())}
    assert first == second
    assert len(_load_with_datasets(fggrn)) == len(imported) and len(_load_with_datasets(images)) == len(imported)


def test_fgclip_bad_records_are_rejects(tmp_path, ray_session):
    good_box = {"bbox": [0.1, 0.1, 0.5, 0.5], "short_expr": "a red cup", "long_expr": "a red cup", "flag_short_neg": 1, "short_expr_negs": {"0": "a blue cup", "1": "a green cup"}}
    items = [
        {"f_path": "a.jpg", "caption": "A red cup on a table.", "short_caption": "cup", "bbox_info": [good_box]},
        {"f_path": "nan-box.jpg", "caption": "x", "bbox_info": [{**good_box, "bbox": [0.1, float("nan"), 0.5, 0.5]}]},
        {"f_path": "inverted.jpg", "caption": "x", "bbox_info": [{**good_box, "bbox": [0.5, 0.5, 0.1, 0.1]}]},
        {"f_path": "text-box.jpg", "caption": "x", "bbox_info": [{**good_box, "bbox": "0 0 1 1"}]},
        {"f_path": "no-caption.jpg", "bbox_info": []},
        {"caption": "no f_path"},
        {"f_path": "bad-negs.jpg", "caption": "x", "bbox_info": [{**good_box, "short_expr_negs": {"0": 5}}]},
        {"f_path": "no-expr.jpg", "caption": "x", "bbox_info": [{**good_box, "short_expr": ""}]},
        {"f_path": "entry.jpg", "caption": "x", "bbox_info": ["not an object"]},
        {"f_path": "a.jpg", "caption": "again", "bbox_info": []},
        [1, 2],
    ]
    path = tmp_path / "finehard.json"
    path.write_text(json.dumps(items))  # json writes NaN, as Python-made FineHARD files can
    out = tmp_path / "fggrn"
    run_stage(ImportFgclipStage(path), out, make_config(*CONFIG))
    assert _reasons(out) == {
        "nan-box.jpg": "box_not_finite", "inverted.jpg": "box_not_positive_size", "text-box.jpg": "box_not_four_numbers",
        "no-caption.jpg": "missing_caption", "finehard-000000005": "missing_f_path", "bad-negs.jpg": "bad_negatives",
        "no-expr.jpg": "missing_short_expr", "entry.jpg": "bad_bbox_info", "finehard-000000010": "bad_record",
    } | {"a.jpg": "duplicate_key"}
    (row,) = read_rows(out)
    region = row["regions"][0]
    assert (row["width"], region["box"], region["start"], region["end"], region["head"]) == (0, [], 0, 9, "cup")
    assert [n["text"] for n in region["negatives"]] == ["a blue cup", "a green cup"] and math.isnan(region["negatives"][0]["entailment"])
    with pytest.raises(FgdataError, match="cannot read"):
        (tmp_path / "broken.json").write_text("[{")
        run_stage(ImportFgclipStage(tmp_path / "broken.json"), tmp_path / "never", make_config())


def test_fgclip_images_never_read_outside_the_folder(tmp_path, ray_session):
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(image_bytes())
    (tmp_path / "secret.jpg").write_bytes(image_bytes())
    items = [{"f_path": p, "caption": "c", "bbox_info": []} for p in ("ok.jpg", "../secret.jpg", str(tmp_path / "secret.jpg"), "missing.jpg", "nul\u0000.jpg")]
    (tmp_path / "items.json").write_text(json.dumps(items))
    out = tmp_path / "images"
    run_stage(FgclipImagesStage(tmp_path / "items.json", folder), out, make_config())
    assert [r["key"] for r in read_rows(out)] == ["ok.jpg"]
    assert _reasons(out) == {
        "../secret.jpg": "unsafe_path", str(tmp_path / "secret.jpg"): "unsafe_path", "missing.jpg": "missing_file", "nul\u0000.jpg": "unsafe_path",
    }


def _grit_rows() -> list[dict]:
    caption = "a dog on a red sofa"
    good = [[0, 5, 0.1, 0.2, 0.5, 0.9, 0.8], [9, 19, 0.0, 0.5, 1.0, 1.0, 0.7]]
    return [
        {"id": 1, "url": "http://x/1.jpg", "caption": caption, "width": 200, "height": 100, "ref_exps": good, "noun_chunks": good[:1]},
        {"id": 2, "url": "http://x/2.jpg", "caption": caption, "width": 200, "height": 100, "ref_exps": [[0, 50, 0.1, 0.1, 0.2, 0.2, 0.9]], "noun_chunks": []},
        {"id": 3, "url": "http://x/3.jpg", "caption": caption, "width": 200, "height": 100, "ref_exps": [[0, 5, 0.5, 0.5, 0.1, 0.1, 0.9]], "noun_chunks": []},
        {"id": 4, "url": "http://x/4.jpg", "caption": caption, "width": 200, "height": 100, "ref_exps": [[0, 5, 0.1, 0.1, 0.2, 0.2, 1.5]], "noun_chunks": []},
        {"id": 5, "url": "http://x/5.jpg", "caption": None, "width": 200, "height": 100, "ref_exps": [], "noun_chunks": []},
        {"id": 6, "url": "http://x/6.jpg", "caption": caption, "width": 200, "height": 100, "ref_exps": [[0, 5, 0.1]], "noun_chunks": []},
        {"id": 1, "url": "http://x/7.jpg", "caption": caption, "width": 200, "height": 100, "ref_exps": [], "noun_chunks": []},
    ]


def test_grit_import_round_trips_spans_and_boxes(tmp_path, ray_session):
    path = tmp_path / "grit.parquet"
    rows = _grit_rows()
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "regions"
    run_stage(ImportGritStage(path), out, make_config(*CONFIG))
    assert _reasons(out) == {"2": "bad_span", "3": "box_not_positive_size", "4": "bad_score", "5": "missing_caption", "6": "bad_expressions"} | {"1": "duplicate_key"}
    (row,) = read_rows(out)
    assert row["key"] == "1" and row["phrase_source"] == "short_caption" and (row["width"], row["height"]) == (200, 100)
    # back to GRIT's own layout: the same spans, boxes and scores
    back = [[r["start"], r["end"], *r["box_norm"], r["score"]] for r in row["regions"]]
    assert [v for entry in back for v in entry] == pytest.approx([v for entry in rows[0]["ref_exps"] for v in entry], abs=1e-6)
    assert [r["phrase"] for r in row["regions"]] == ["a dog", "a red sofa"] and [r["head"] for r in row["regions"]] == ["dog", "sofa"]
    assert row["regions"][0]["box"] == pytest.approx([20, 20, 100, 90], abs=1e-4)
    assert len(_load_with_datasets(out)) == 1

    chunks = tmp_path / "chunks"
    run_stage(ImportGritStage(path, "noun_chunks"), chunks, make_config(*CONFIG))
    assert [len(r["regions"]) for r in read_rows(chunks)] == [1, 0, 0, 0, 0]  # 5 rows: 1 has a caption-less reject, 1 repeats a key


def test_grit_keys_join_download_keys(tmp_path):
    from pipeline.stages.fggrn.download import plan_url_records

    path = tmp_path / "grit.parquet"
    pq.write_table(pa.Table.from_pylist(_grit_rows()), path)
    planned = ImportGritStage(path).plan(make_config("ingest.rows_per_shard=4"))
    assert [p["key"] for u in planned for p in u.payload] == [r["key"] for r in plan_url_records(path)]


def test_hf_save_to_disk_and_parquet_layouts(tmp_path, ray_session):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"), "id": datasets.Value("string")})
    records = {
        "image": [{"bytes": png_bytes(), "path": None}, {"bytes": b"not an image", "path": None}, {"bytes": png_bytes(2), "path": None}],
        "caption": ["a blue square", "junk", "tiny"],
        "id": ["a", "b", "c"],
    }
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(records, features=features)}).save_to_disk(str(saved))
    out = tmp_path / "images"
    run_stage(ImportHfStage(saved, "images"), out, make_config(*CONFIG))
    assert [(r["key"], r["short_caption"], r["width"]) for r in read_rows(out)] == [("a", "a blue square", 16)]
    assert _reasons(out) == {"b": "not_an_image", "c": "image_too_small"}
    assert_dataset_invariants(out, {"a", "b", "c"})
    assert _load_with_datasets(out)[0]["key"] == "a"

    # Image cells that name a file: read inside the dataset folder only
    paths = tmp_path / "by-path"
    paths.mkdir()
    (paths / "pic.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    cells = [{"bytes": None, "path": p} for p in ("pic.png", "../secret.png", str(tmp_path / "secret.png"), "gone.png", "nul\u0000.png")]
    pq.write_table(pa.table({"image": cells, "key": ["in", "up", "absolute", "gone", "nul"]}), paths / "train.parquet")
    by_path = tmp_path / "by-path-images"
    run_stage(ImportHfStage(paths, "images"), by_path, make_config())
    assert [r["key"] for r in read_rows(by_path)] == ["in"]
    assert _reasons(by_path) == {"up": "unsafe_path", "absolute": "unsafe_path", "gone": "missing_file", "nul": "missing_file"}

    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.table({"caption": ["a long caption", "  "], "short_caption": ["short", None]}), hub / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"caption": ["test split"], "short_caption": [None]}), hub / "test-00000-of-00001.parquet")
    captions = tmp_path / "captions"
    run_stage(ImportHfStage(hub.parent, "captions"), captions, make_config(*CONFIG))
    (row,) = read_rows(captions)
    assert (row["key"], row["long_caption"], row["short_caption"], row["caption_model"]) == ("train-000000000", "a long caption", "short", "imported:hub")
    assert _reasons(captions) == {"train-000000001": "missing_caption"}
    with pytest.raises(FgdataError, match="no image"):
        run_stage(ImportHfStage(hub.parent, "images"), tmp_path / "never", make_config())


@pytest.mark.slow
def test_cli_import_and_download_commands(tmp_path):
    from conftest import run_cli

    path = tmp_path / "grit.parquet"
    pq.write_table(pa.Table.from_pylist(_grit_rows()), path)
    result = run_cli("import", "grit", str(path), str(tmp_path / "regions"), "--set", "run.num_cpus=1", "--set", "run.progress=false")
    assert result.returncode == 0, result.stderr
    assert "7 rows in, 1 out, 6 rejected" in result.stdout
    (tmp_path / "broken.json").write_text("[{")
    for args in (("import", "fgclip", str(tmp_path / "broken.json"), str(tmp_path / "x")), ("download", str(tmp_path / "broken.json"), str(tmp_path / "y"))):
        failed = run_cli(*args, "--set", "run.num_cpus=1")
        assert failed.returncode == 2 and "cannot read it" in failed.stderr and "Traceback" not in failed.stderr
